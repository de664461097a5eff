"""config.json, read per model family into a `ModelConfig` (model_config.py): `parse_family`.

config.json spells the same idea differently per family (`num_experts`, `num_local_experts`,
`n_routed_experts`; `rope_theta` at the top level or inside `rope_parameters`) and across transformers
versions. This module is the one place that knows those spellings: Qwen3-MoE, Mixtral, DeepSeek-V3 (and
Kimi K2, its architecture under another name) and Llama 4.

Llama 4's text model (`model_type: llama4_text`, transformers' Llama4ForCausalLM) is read as transformers'
Llama4TextConfig reads it, defaults included: MoE layers every `interleave_moe_layer_step` (or the
`moe_layers` list), layers without rotary embeddings every `no_rope_layer_interval` (`no_rope_layers`:
1 where a layer HAS rotary embeddings), chunked attention in the layers with them (`layer_types`). A
multimodal Llama 4 config.json (`model_type: llama4`) is read as its `text_config`.

Every field is read through config_fields.py (integers are integers, not bools, not 1.7, not "64", within
its caps; floats are finite), and the facts between fields are checked before anything is sized from them:
here, heads divide into key/value heads, expert groups divide the experts and experts per token fit in the
chosen groups; in model_config.check_sizes, experts per token against the routed experts and the model's
overall size. Each problem is an `Invalid` naming the field; `ModelConfig.from_dict` makes it a
`ConfigError` naming the file.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kubemoe_runtime.engines.torch.load.config_fields import (
    MAX_COUNT,
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    Fields,
    Invalid,
    integer,
    show,
)
from kubemoe_runtime.engines.torch.load.model_config import (
    LLAMA4_TYPES,
    SUPPORTED_DTYPES,
    ModelConfig,
    check_sizes,
)


def parse_family(arch: str, cfg: dict[str, Any]) -> ModelConfig:
    """config.json's object, whose `model_type` is `arch` (one of SUPPORTED_ARCHITECTURES), as a
    ModelConfig; an `Invalid` naming the field where it is not one this runtime can serve."""
    if arch == "llama4":
        return _parse_llama4_multimodal(cfg)
    return _parse(arch, cfg)


def _head_dim(f: Fields, *, hidden: int, num_heads: int) -> int:
    """head_dim, or hidden_size / num_attention_heads where absent; even (rotary embeddings rotate pairs)."""
    if f.raw("head_dim", default=None) is None:
        field, value = "head_dim (hidden_size / num_attention_heads)", hidden // num_heads
    else:
        field, value = f.key("head_dim"), f.raw("head_dim")
    head_dim = integer(field, value, lo=2, hi=MAX_WIDTH)
    if head_dim % 2:
        raise Invalid(field, f"{head_dim} is odd; rotary embeddings need an even head size")
    return head_dim


def _parse(arch: str, cfg: dict[str, Any]) -> ModelConfig:
    f = Fields(cfg)
    num_layers = f.integer("num_hidden_layers", hi=MAX_COUNT)
    num_heads = f.integer("num_attention_heads", hi=MAX_COUNT)
    hidden = f.integer("hidden_size")
    num_kv_heads = f.integer("num_key_value_heads", default=num_heads, hi=num_heads)
    if num_heads % num_kv_heads:
        raise Invalid(
            f.key("num_key_value_heads"),
            f"{num_kv_heads} does not divide num_attention_heads {num_heads}; give a divisor of it",
        )
    rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope = Fields(f.obj(rope_key), f"{rope_key}.")
    rope_type = rope.raw("rope_type", "type", default="default")
    if rope_type not in ("default", "llama3"):
        raise Invalid(
            rope.key("rope_type", "type"),
            f"rope type {show(rope_type)} is not supported yet (only default and llama3 RoPE)",
        )
    rope_llama3 = None
    if rope_type == "llama3":
        rope_llama3 = (
            rope.number("factor"),
            rope.number("low_freq_factor"),
            rope.number("high_freq_factor"),
            float(rope.integer("original_max_position_embeddings", hi=MAX_POSITIONS)),
        )
    default_theta = 500000.0 if arch in LLAMA4_TYPES else 10000.0  # transformers' defaults
    if cfg.get("rope_theta") is not None:
        rope_theta = f.number("rope_theta")
    else:
        rope_theta = rope.number("rope_theta", default=default_theta)
    eos = cfg.get("eos_token_id")
    eos_field = f.key("eos_token_id")
    if isinstance(eos, list):
        eos_ids = tuple(integer(f"{eos_field}[{i}]", v, lo=0, hi=MAX_VOCAB) for i, v in enumerate(eos))
    else:
        eos_ids = () if eos is None else (integer(eos_field, eos, lo=0, hi=MAX_VOCAB),)
    dtype = f.raw("dtype", "torch_dtype", default="bfloat16")
    if dtype not in SUPPORTED_DTYPES:
        raise Invalid(
            f.key("dtype", "torch_dtype"),
            f"{show(dtype)} is not a dtype the torch engine runs; it runs {', '.join(SUPPORTED_DTYPES)}",
        )
    common: dict[str, Any] = {
        "arch": arch,
        "vocab_size": f.integer("vocab_size", hi=MAX_VOCAB),
        "hidden_size": hidden,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "rms_norm_eps": f.number("rms_norm_eps", default=1e-5 if arch in LLAMA4_TYPES else 1e-6),
        "rope_theta": rope_theta,
        "max_position_embeddings": f.integer("max_position_embeddings", default=4096, hi=MAX_POSITIONS),
        "tie_word_embeddings": f.flag("tie_word_embeddings", False),
        "dtype": str(dtype),
        "eos_token_ids": eos_ids,
        "top_k": f.integer("num_experts_per_tok", hi=MAX_COUNT),
        "rope_llama3": rope_llama3,
    }
    if arch == "qwen3_moe":
        experts_key: tuple[str, ...] = ("num_experts", "num_local_experts")
        step = f.integer("decoder_sparse_step", default=1, hi=MAX_COUNT)
        dense_only = set(f.integers("mlp_only_layers", lo=0, hi=MAX_COUNT) or [])
        model = ModelConfig(
            **common,
            head_dim=_head_dim(f, hidden=hidden, num_heads=num_heads),
            dense_intermediate_size=f.integer("intermediate_size"),
            moe_intermediate_size=f.integer("moe_intermediate_size"),
            n_routed_experts=f.integer(*experts_key, hi=MAX_COUNT),
            n_shared_experts=0,
            moe_layers=tuple(i not in dense_only and (i + 1) % step == 0 for i in range(num_layers)),
            scoring="softmax",
            norm_topk_prob=f.flag("norm_topk_prob", False),
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            qk_norm=True,
            rope_interleave=False,
        )
    elif arch == "mixtral":
        experts_key = ("num_local_experts", "num_experts")
        model = ModelConfig(
            **common,
            head_dim=_head_dim(f, hidden=hidden, num_heads=num_heads),
            dense_intermediate_size=0,
            moe_intermediate_size=f.integer("intermediate_size"),
            n_routed_experts=f.integer(*experts_key, hi=MAX_COUNT),
            n_shared_experts=0,
            moe_layers=(True,) * num_layers,
            scoring="softmax",
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            qk_norm=False,
            rope_interleave=False,
        )
    elif arch == "llama4_text":
        experts_key = ("num_local_experts",)
        model = _parse_llama4_text(f, common)
    else:  # deepseek_v3 and kimi_k2 (DEEPSEEK_V3_TYPES)
        experts_key = ("n_routed_experts", "num_local_experts")
        model = _parse_deepseek_v3(f, common, experts_key=experts_key)
    check_sizes(model, experts=f.key(*experts_key))
    return model


def _parse_deepseek_v3(f: Fields, common: dict[str, Any], *, experts_key: tuple[str, ...]) -> ModelConfig:
    scoring = f.raw("scoring_func", default="sigmoid")
    topk_method = f.raw("topk_method", default="noaux_tc")
    if scoring != "sigmoid" or topk_method != "noaux_tc":
        raise Invalid(
            f.key("scoring_func"),
            f"scoring_func {show(scoring)} with topk_method {show(topk_method)} is not supported "
            "(DeepSeek-V3's router: sigmoid, noaux_tc)",
        )
    num_layers = common["num_layers"]
    first_dense = f.integer("first_k_dense_replace", default=0, lo=0, hi=MAX_COUNT)
    freq = f.integer("moe_layer_freq", default=1, hi=MAX_COUNT)
    rope_dim = f.integer("qk_rope_head_dim", lo=2)
    if rope_dim % 2:
        raise Invalid(f.key("qk_rope_head_dim"), f"{rope_dim} is odd; rotary embeddings need an even size")
    q_lora = f.raw("q_lora_rank", default=None)
    n_experts = f.integer(*experts_key, hi=MAX_COUNT)
    n_group = f.integer("n_group", default=1, hi=MAX_COUNT)
    topk_group = f.integer("topk_group", default=1, hi=MAX_COUNT)
    # Group-limited routing scores a group by the sum of its two best experts (model/moe.py).
    if n_experts % n_group or n_experts // n_group < 2:
        raise Invalid(
            f.key("n_group"),
            f"{n_group} groups of the {n_experts} routed experts ({f.key(*experts_key)}): the groups must "
            "divide the experts, at least 2 experts each",
        )
    if topk_group > n_group:
        raise Invalid(
            f.key("topk_group"), f"{topk_group} is more than n_group {n_group}; give 1 to {n_group}"
        )
    if common["top_k"] > topk_group * (n_experts // n_group):
        most = topk_group * (n_experts // n_group)
        raise Invalid(
            f.key("num_experts_per_tok"),
            f"{common['top_k']} is more than the {most} experts of topk_group {topk_group} groups; "
            f"give 1 to {most}",
        )
    return ModelConfig(
        **common,
        head_dim=rope_dim,
        dense_intermediate_size=f.integer("intermediate_size"),
        moe_intermediate_size=f.integer("moe_intermediate_size"),
        n_routed_experts=n_experts,
        n_shared_experts=f.integer("n_shared_experts", default=0, lo=0, hi=MAX_COUNT),
        moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(num_layers)),
        scoring="sigmoid",
        norm_topk_prob=f.flag("norm_topk_prob", True),
        routed_scaling_factor=f.number("routed_scaling_factor", default=1.0),
        n_group=n_group,
        topk_group=topk_group,
        qk_norm=False,
        rope_interleave=f.flag("rope_interleave", True),
        q_lora_rank=None if q_lora is None else f.integer("q_lora_rank"),
        kv_lora_rank=f.integer("kv_lora_rank"),
        qk_nope_head_dim=f.integer("qk_nope_head_dim"),
        qk_rope_head_dim=rope_dim,
        v_head_dim=f.integer("v_head_dim"),
    )


def _parse_llama4_text(f: Fields, common: dict[str, Any]) -> ModelConfig:
    """Llama4TextConfig's reading of config.json (its __post_init__ defaults where a key is absent)."""
    num_layers = common["num_layers"]
    step = f.integer("interleave_moe_layer_step", default=1, hi=MAX_COUNT)
    moe = f.integers("moe_layers", lo=0, hi=MAX_COUNT)
    moe_set = set(range(step - 1, num_layers, step)) if moe is None else set(moe)
    interval = f.integer("no_rope_layer_interval", default=4, hi=MAX_COUNT)
    # no_rope_layers[i] is 1 where layer i HAS rotary embeddings (transformers' name); empty: the default.
    rope_flags = f.integers("no_rope_layers", lo=0, hi=1) or [
        int((i + 1) % interval != 0) for i in range(num_layers)
    ]
    if len(rope_flags) != num_layers:
        raise Invalid(
            f.key("no_rope_layers"), f"no_rope_layers has {len(rope_flags)} entries for {num_layers} layers"
        )
    chunk = f.raw("attention_chunk_size", default=None)
    chunk_size = 0 if chunk is None else f.integer("attention_chunk_size", hi=MAX_POSITIONS)
    layer_types = f.raw("layer_types", default=None) or [
        "chunked_attention" if flag and chunk is not None else "full_attention" for flag in rope_flags
    ]
    if (
        not isinstance(layer_types, list)
        or len(layer_types) != num_layers
        or not all(kind in ("chunked_attention", "full_attention") for kind in layer_types)
    ):
        raise Invalid(
            f.key("layer_types"),
            f"layer_types {show(layer_types)}: expected chunked_attention or full_attention for each layer",
        )
    chunked = tuple(i for i, kind in enumerate(layer_types) if kind == "chunked_attention")
    if chunked and chunk_size <= 0:
        raise Invalid(
            f.key("attention_chunk_size"),
            "layer_types has chunked_attention layers but attention_chunk_size is not set",
        )
    if f.flag("attention_bias", False):
        raise Invalid(f.key("attention_bias"), "attention_bias is not supported")
    return ModelConfig(
        **common,
        head_dim=_head_dim(f, hidden=common["hidden_size"], num_heads=common["num_heads"]),
        dense_intermediate_size=f.integer("intermediate_size_mlp"),
        moe_intermediate_size=f.integer("intermediate_size"),
        n_routed_experts=f.integer("num_local_experts", hi=MAX_COUNT),
        n_shared_experts=1,  # every Llama 4 MoE layer has one shared expert of the routed experts' size
        moe_layers=tuple(i in moe_set for i in range(num_layers)),
        scoring="sigmoid_top",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        qk_norm=False,
        rope_interleave=True,  # rotary pairs are adjacent dims (transformers' complex form)
        nope_layers=tuple(i for i, flag in enumerate(rope_flags) if not flag),
        chunked_layers=chunked,
        attention_chunk_size=chunk_size if chunked else 0,
        qk_l2_norm=f.flag("use_qk_norm", True),
        attn_temperature_tuning=f.flag("attn_temperature_tuning", True),
        floor_scale=f.number("floor_scale", default=8192.0),
        attn_scale=f.number("attn_scale", default=0.1, positive=False),
        expert_input_weighted=True,
    )


def _parse_llama4_multimodal(cfg: dict[str, Any]) -> ModelConfig:
    """Llama4ForConditionalGeneration's config.json: its language model, from `text_config` (top-level
    keys such as tie_word_embeddings and torch_dtype where text_config lacks them)."""
    text = Fields(cfg).obj("text_config")
    if not text:
        raise Invalid(
            "text_config", "missing; a multimodal Llama 4 config.json keeps its language model there"
        )
    outer = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
    merged = {**outer, **{k: v for k, v in text.items() if v is not None}, "model_type": "llama4_text"}
    try:
        model = _parse("llama4_text", merged)
    except Invalid as err:  # name a field of text_config as such
        if err.field.split(".")[0].split("[")[0].split(" ")[0] in text:
            raise Invalid(f"text_config.{err.field}", err.problem) from err
        raise
    return replace(model, arch="llama4", weight_prefix="language_model.")
