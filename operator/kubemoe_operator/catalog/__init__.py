"""The model and accelerator catalogs (data files in this package) and how a spec resolves against them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml
from pydantic import Field

from kubemoe_operator.api.base import ApiModel
from kubemoe_operator.api.model_config import ModelConfig
from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.api.spec import AcceleratorSpec, ModelSpec
from kubemoe_operator.catalog.facts import GIB, GpuFacts, ModelFacts

__all__ = ["Catalog", "GpuFacts", "ModelFacts", "load_catalog", "resolve_gpu", "resolve_model"]

# What a model must state (inline or in the catalog) before the planner can size it.
REQUIRED = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "vocab_size",
    "num_routed_experts",
    "experts_per_token",
    "moe_intermediate_size",
)

# Counts of some kind of layer (spec.model.config field, what they are, where config.json says): none may
# exceed num_layers.
LAYER_COUNTS = (
    (
        "sliding_window_layers",
        "sliding-window layers",
        "count the sliding_attention entries of layer_types in the model's config.json.",
    ),
    (
        "chunked_attention_layers",
        "chunked-attention layers",
        "count the 1 entries of no_rope_layers in the model's config.json.",
    ),
    ("num_dense_layers", "dense layers", "copy first_k_dense_replace from the model's config.json."),
)

# Chunked local attention by architecture (the catalog's `architecture`, config.json's `architectures[0]`):
# (attention_chunk_size, one layer in how many attends globally), where spec.model.config (or the
# checkpoint's config.json) does not say (attentionChunkSize, chunkedAttentionLayers): the defaults of
# transformers' Llama4TextConfig, which the published Llama 4 checkpoints keep: attention_chunk_size 8192,
# and no_rope_layers empty, so a NoPE layer with full attention every no_rope_layer_interval = 4 layers
# (3, 7, ..., 47) and the other 36 of 48 in chunks, as vLLM's Llama4Attention builds them.
CHUNKED_ATTENTION: dict[str, tuple[int, int]] = {
    "Llama4ForConditionalGeneration": (8192, 4),
    "Llama4ForCausalLM": (8192, 4),
}


class ModelEntry(ApiModel):
    name: str
    aliases: list[str] = Field(default_factory=list)
    reference: str
    config: ModelConfig


class GpuEntry(ApiModel):
    name: str
    memory_mib: int = Field(ge=0, alias="memoryMiB")
    reserve_gib: float = Field(ge=0, alias="reserveGiB")
    resource: str | None
    label_key: str | None = None
    product_labels: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class Catalog:
    models: tuple[ModelEntry, ...]
    gpus: tuple[GpuEntry, ...]

    def model(self, name: str) -> ModelEntry | None:
        """By name or alias, ignoring case; 'ORG/NAME' also matches an entry named NAME."""
        wanted = {name.lower(), name.rsplit("/", 1)[-1].lower()}
        for entry in self.models:
            keys = {k.lower() for k in (entry.name, entry.name.rsplit("/", 1)[-1], *entry.aliases)}
            if wanted & keys:
                return entry
        return None

    def gpu(self, name: str) -> GpuEntry | None:
        """By catalog name or node label value, ignoring case."""
        for entry in self.gpus:
            if name.lower() in {k.lower() for k in (entry.name, *entry.product_labels)}:
                return entry
        return None


def _read(name: str) -> Any:
    return yaml.safe_load(resources.files(__package__).joinpath(name).read_text())


@cache
def load_catalog() -> Catalog:
    """The catalogs shipped with the package (read once)."""
    models = tuple(ModelEntry.model_validate(m) for m in _read("models.yaml")["models"])
    gpus = tuple(GpuEntry.model_validate(g) for g in _read("gpus.yaml")["gpus"])
    return Catalog(models=models, gpus=gpus)


def _shape_problems(merged: dict[str, Any]) -> list[Problem]:
    """Facts that cannot describe one model together (catalog and inline config merged)."""
    out = []
    heads, hidden = merged["num_attention_heads"], merged["hidden_size"]
    kv = merged.get("num_key_value_heads", heads)
    if "head_dim" not in merged and hidden % heads:
        out.append(
            Problem(
                field="spec.model.config.headDim",
                message=f"hiddenSize {hidden} is not a multiple of numAttentionHeads {heads}, "
                "so the head size is not hiddenSize / numAttentionHeads.",
                fix="give headDim from the model's config.json (or correct hiddenSize or numAttentionHeads).",
            )
        )
    if kv > heads or heads % kv:
        out.append(
            Problem(
                field="spec.model.config.numKeyValueHeads",
                message=f"{kv} key/value heads do not divide the {heads} attention heads.",
                fix="copy num_key_value_heads from the model's config.json.",
            )
        )
    experts, top_k = merged["num_routed_experts"], merged["experts_per_token"]
    if top_k > experts:
        out.append(
            Problem(
                field="spec.model.config.expertsPerToken",
                message=f"{top_k} experts per token but the model has {experts} routed experts.",
                fix="copy num_experts_per_tok from the model's config.json.",
            )
        )
    layers = merged["num_layers"]
    for key, what, fix in LAYER_COUNTS:
        if merged.get(key, 0) > layers:
            out.append(
                Problem(
                    field=f"spec.model.config.{_alias(key)}",
                    message=f"{merged[key]} {what} but only {layers} layers.",
                    fix=fix,
                )
            )
    return out or _bounded_layer_problems(merged)


def _alias(key: str) -> str:
    """spec.model.config's name for a ModelConfig field (numLayers for num_layers)."""
    return ModelConfig.model_fields[key].alias or key


def _chunked_attention(merged: dict[str, Any]) -> tuple[int | None, int]:
    """(attention_chunk_size, chunked layers) as spec.model.config or the catalog states them, else the
    architecture's defaults (CHUNKED_ATTENTION); (None, 0) where no layer attends in chunks."""
    layers = merged["num_layers"]
    default_chunk, global_every = CHUNKED_ATTENTION.get(merged.get("architecture", ""), (None, 0))
    chunk_size = merged.get("attention_chunk_size", default_chunk)
    chunked = merged.get("chunked_attention_layers", layers - layers // global_every if global_every else 0)
    return (chunk_size, chunked) if chunk_size and chunked else (None, 0)


def _bounded_layer_problems(merged: dict[str, Any]) -> list[Problem]:
    """Sliding-window and chunked-attention layers are different layers: more of them together than the
    model has layers would leave fewer than none keeping every token (negative KV sizes in the plan)."""
    layers, sliding = merged["num_layers"], merged.get("sliding_window_layers", 0)
    chunked = _chunked_attention(merged)[1]
    if sliding + chunked <= layers:
        return []
    given = "" if "chunked_attention_layers" in merged else f" ({merged.get('architecture')}'s default)"
    return [
        Problem(
            field=f"spec.model.config.{_alias('sliding_window_layers')}",
            message=f"{_alias('sliding_window_layers')} {sliding} + {_alias('chunked_attention_layers')} "
            f"{chunked}{given} = {sliding + chunked} layers, but the model has only {_alias('num_layers')} "
            f"{layers}: a layer slides or attends in chunks, not both.",
            fix="count them from the model's config.json (sliding_attention entries of layer_types, 1 "
            "entries of no_rope_layers) so that together they are at most numLayers; set the other to 0 "
            "if the model has one kind only.",
        )
    ]


def resolve_model(spec: ModelSpec, catalog: Catalog) -> ModelFacts:
    """Catalog entry for spec.name, overridden field by field by spec.config."""
    entry = catalog.model(spec.name)
    merged: dict[str, Any] = entry.config.model_dump(exclude_none=True) if entry else {}
    if spec.config is not None:
        merged |= spec.config.model_dump(exclude_none=True)
    missing = [f for f in REQUIRED if f not in merged]
    if merged.get("kv_lora_rank") is not None and "qk_rope_head_dim" not in merged:
        missing.append("qk_rope_head_dim")
    if missing:
        fields = ", ".join(ModelConfig.model_fields[f].alias or f for f in missing)
        known = ", ".join(e.name for e in catalog.models)
        if entry is None and spec.config is None:
            problem = Problem(
                field="spec.model.name",
                message=f"{spec.name!r} is not in the model catalog and spec.model.config is not given.",
                fix=f"use a catalog model ({known}), or give spec.model.config with {fields} "
                "from the model's config.json.",
            )
        else:
            problem = Problem(
                field="spec.model.config",
                message=f"missing {fields} (not in the catalog entry for {spec.name!r} either).",
                fix="add them from the model's config.json.",
            )
        raise ManifestError([problem])
    if problems := _shape_problems(merged):
        raise ManifestError(problems)
    heads = merged["num_attention_heads"]
    dtype = merged.get("dtype", "bfloat16")
    layers = merged["num_layers"]
    chunk_size, chunked = _chunked_attention(merged)
    weight_dtype = merged.get("weight_dtype", dtype)
    return ModelFacts(
        name=spec.name,
        reference=entry.reference if entry else "spec.model.config",
        num_layers=layers,
        hidden_size=merged["hidden_size"],
        num_attention_heads=heads,
        num_key_value_heads=merged.get("num_key_value_heads", heads),
        head_dim=merged.get("head_dim", merged["hidden_size"] // heads),
        num_routed_experts=merged["num_routed_experts"],
        num_shared_experts=merged.get("num_shared_experts", 0),
        experts_per_token=merged["experts_per_token"],
        moe_intermediate_size=merged["moe_intermediate_size"],
        intermediate_size=merged.get("intermediate_size", merged["moe_intermediate_size"]),
        num_dense_layers=merged.get("num_dense_layers", 0),
        moe_layer_step=merged.get("moe_layer_step", 1),
        vocab_size=merged["vocab_size"],
        tie_word_embeddings=merged.get("tie_word_embeddings", False),
        max_position_embeddings=merged.get("max_position_embeddings"),
        dtype=dtype,
        weight_dtype=weight_dtype,
        expert_weight_dtype=merged.get("expert_weight_dtype", weight_dtype),
        q_lora_rank=merged.get("q_lora_rank"),
        kv_lora_rank=merged.get("kv_lora_rank"),
        qk_rope_head_dim=merged.get("qk_rope_head_dim"),
        qk_nope_head_dim=merged.get("qk_nope_head_dim"),
        v_head_dim=merged.get("v_head_dim"),
        params_total_b=merged.get("params_total_b"),
        params_active_b=merged.get("params_active_b"),
        sliding_window=merged.get("sliding_window"),
        sliding_window_layers=merged.get("sliding_window_layers", 0),
        attention_chunk_size=chunk_size,
        chunked_layers=chunked,
    )


def resolve_gpu(spec: AcceleratorSpec, catalog: Catalog) -> GpuFacts:
    """Catalog entry for spec.type; spec.memoryGiB overrides or stands in for it."""
    entry = catalog.gpu(spec.type)
    if entry is None and spec.memory_gib is None:
        known = ", ".join(g.name for g in catalog.gpus)
        raise ManifestError(
            [
                Problem(
                    field="spec.accelerator.type",
                    message=f"unknown accelerator type {spec.type!r}.",
                    fix=f"use one of {known}, or set spec.accelerator.memoryGiB for another GPU.",
                )
            ]
        )
    if spec.resource is not None and entry is not None and entry.resource is None:
        raise ManifestError(
            [
                Problem(
                    field="spec.accelerator.resource",
                    message=f"accelerator type {entry.name} runs on CPUs and requests no device.",
                    fix="remove spec.accelerator.resource, or set spec.accelerator.type to the GPU's type.",
                )
            ]
        )
    if entry is None:
        return GpuFacts(
            name=spec.type,
            memory_gib=spec.memory_gib or 0.0,
            reserve_gib=2.0,
            resource=spec.resource or "nvidia.com/gpu",
        )
    memory = spec.memory_gib if spec.memory_gib is not None else entry.memory_mib * 1024**2 / GIB
    return GpuFacts(
        name=entry.name,
        memory_gib=memory,
        reserve_gib=entry.reserve_gib,
        resource=spec.resource or entry.resource,
        product_labels=tuple(entry.product_labels),
        label_key=entry.label_key,
    )
