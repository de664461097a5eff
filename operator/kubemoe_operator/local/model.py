"""The model a local run loads: a file:// source or a plain path; the tiny example's checkpoint is
generated on first use (by `kubemoe-runtime tiny-checkpoint`: the operator never imports the runtime),
into a folder beside its place that is renamed into place once complete. A folder without config.json
and weights is not a checkpoint (`checkpoint_problem`): never loaded, never generated over.

The checkpoint's config.json also gives the planner the model's facts (`checkpoint_config`), so a
manifest for a local folder needs no inline spec.model.config. The operator cannot import the runtime's
config.json reader (engines/torch/load/model_config.py), and wants other facts (sizes, not kernels), so
it has its own small mapping onto spec.model.config, whose fields name the keys they come from."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubemoe_operator.api.model_config import ModelConfig
from kubemoe_operator.api.resource import ModelDeployment

# config.json architectures the runtime's tiny-checkpoint generator writes.
TINY_ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Llama4ForCausalLM": "llama4_text",
}
TINY_PREFIX = "tiny-"
# The dtype `kubemoe-runtime tiny-checkpoint` writes; for another one ensure_model runs the generator's
# module (which takes --dtype) with the runtime's own interpreter.
TINY_DEFAULT_DTYPE = "bfloat16"
TINY_GENERATOR_MODULE = "kubemoe_runtime.tools.checkpoints"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ModelSourceError(ValueError):
    pass


def local_model_path(source: str, *, cwd: Path) -> Path:
    """file://PATH (relative to `cwd` unless absolute, file:///abs) or a plain path -> an absolute path."""
    scheme, sep, rest = source.partition("://")
    if sep and scheme != "file":
        raise ModelSourceError(
            f"kubemoe up loads local checkpoints; {source!r} is a {scheme}:// source — "
            "give model.source as file://PATH, or pass --model PATH"
        )
    path = Path(rest if sep else source)
    return path if path.is_absolute() else (cwd / path).resolve()


def _runtime_python(runtime: str) -> Path | None:
    """The interpreter installed beside the `kubemoe-runtime` script (its virtualenv's), if any."""
    for name in ("python", "python3"):
        python = Path(runtime).parent / name
        if python.is_file():
            return python
    return None


def tiny_checkpoint_commands(path: Path, *, arch: str, dtype: str | None, runtime: str) -> list[list[str]]:
    """The commands that can write the tiny checkpoint, best first: in the manifest's dtype, so that its
    config.json agrees with spec.model.config (the generator's module, which takes --dtype, run by the
    interpreter beside `kubemoe-runtime`); last, `kubemoe-runtime tiny-checkpoint` (its default dtype)."""
    plain = [runtime, "tiny-checkpoint", str(path), "--arch", arch]
    python = _runtime_python(runtime)
    if dtype is None or dtype == TINY_DEFAULT_DTYPE or python is None:
        return [plain]
    return [[str(python), "-m", TINY_GENERATOR_MODULE, str(path), "--arch", arch, "--dtype", dtype], plain]


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors (or PyTorch .bin) shards."""
    return sorted(p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern) if p.is_file())


def missing_shards(path: Path) -> list[str]:
    """Shards model.safetensors.index.json names that are not there (a copy or a write cut short)."""
    index = path / SAFETENSORS_INDEX
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return []
    names = {str(v) for v in weight_map.values()} if isinstance(weight_map, dict) else set()
    return sorted(n for n in names if not (path / n).is_file())


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a checkpoint kubemoe up can load (None when it is one): no config.json, no
    weights beside it, or shards its index names that are missing."""
    if not path.exists():
        return "nothing there"
    if not path.is_dir():
        return "not a folder"
    if not (path / "config.json").is_file():
        return "no config.json there"
    if not weight_files(path):
        return f"config.json but no weights ({' or '.join(WEIGHT_PATTERNS)}) there"
    if missing := missing_shards(path):
        return f"{SAFETENSORS_INDEX} names shards that are not there: {', '.join(missing[:3])}"
    return None


def is_tiny(model_name: str, architecture: str | None) -> bool:
    """A model `kubemoe up` generates on first use: named tiny-..., of an architecture the generator knows."""
    return model_name.startswith(TINY_PREFIX) and architecture in TINY_ARCHITECTURES


def _generate(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the generator; on any exception (Ctrl-C, SIGTERM) kill it and wait until it is gone, so that
    nothing writes into its output folder once the caller removes it."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def ensure_model(
    path: Path,
    *,
    model_name: str,
    architecture: str | None,
    runtime: str,
    dtype: str | None = None,
    source_field: str = "spec.model.source",
    announce: Callable[[str], None] = lambda line: None,
) -> bool:
    """Make sure `path` holds a checkpoint (config.json and weights). A missing tiny model (name `tiny-...`,
    an architecture the generator knows) is generated, in `dtype` (the manifest's spec.model.config.dtype)
    where it can be, after `announce`-ing it; returns whether it was. It is written to a folder beside
    `path` and renamed into place when complete: an interrupted generation leaves nothing at `path`.
    Anything else missing or incomplete is a ModelSourceError naming `source_field` and the fix."""
    problem = checkpoint_problem(path)
    if problem is None:
        return False
    present = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if present or not is_tiny(model_name, architecture):
        fix = (
            f"remove it (rm -r {path}) and run kubemoe up again to generate it anew"
            if present and is_tiny(model_name, architecture)
            else f"point {source_field} at a Hugging Face checkpoint folder (config.json and *.safetensors)"
            + (", or remove that folder if a copy or download was cut short" if present else "")
        )
        raise ModelSourceError(f"{source_field}: {path} is not a checkpoint ({problem}); {fix}")
    arch = TINY_ARCHITECTURES[architecture or ""]
    announce(f"generating the tiny random checkpoint {model_name} at {path} ...")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        for command in tiny_checkpoint_commands(partial, arch=arch, dtype=dtype, runtime=runtime):
            result = _generate(command)
            if result.returncode == 0 or "No module named 'kubemoe_runtime" not in result.stderr:
                break  # written, or failed for a reason the next command would share
        if result.returncode != 0:
            raise ModelSourceError(
                f"generating the tiny checkpoint at {path} failed:\n{result.stderr[-2000:]}"
            )
        partial.chmod(0o755)  # mkdtemp's 0700: as a folder the generator made itself
        try:
            partial.replace(path)  # replaces an empty folder at path; fails on a full one
        except OSError:
            if checkpoint_problem(path) is not None:  # not another `kubemoe up` that got there first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return True


# --- the checkpoint's own config.json -> spec.model.config ----------------------------------------

# ModelConfig field <- the config.json keys it comes from, first present wins (api/model_config.py
# documents the same keys per field). Keys a model family spells its own way are handled below.
_KEYS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers",),
    "hidden_size": ("hidden_size",),
    "num_attention_heads": ("num_attention_heads",),
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "q_lora_rank": ("q_lora_rank",),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_rope_head_dim": ("qk_rope_head_dim",),
    "qk_nope_head_dim": ("qk_nope_head_dim",),
    "v_head_dim": ("v_head_dim",),
    "num_routed_experts": ("n_routed_experts", "num_experts", "num_local_experts"),
    "num_shared_experts": ("n_shared_experts",),
    "experts_per_token": ("num_experts_per_tok",),
    "num_dense_layers": ("first_k_dense_replace",),
    "moe_layer_step": ("interleave_moe_layer_step", "moe_layer_freq", "decoder_sparse_step"),
    "vocab_size": ("vocab_size",),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "max_position_embeddings": ("max_position_embeddings",),
}
_QUANTIZED = {"fp8": "fp8", "mxfp4": "mxfp4"}  # quantization_config.quant_method -> weight dtype


def _first(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def facts_from_config_json(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The spec.model.config fields (snake_case) a Hugging Face config.json states; what it leaves out
    is left out here too (the catalog or the defaults fill it in, as for an inline config)."""
    if isinstance(cfg.get("text_config"), Mapping):  # multimodal (Llama 4): the language model's part
        cfg = {**cfg, **cfg["text_config"]}
    facts: dict[str, Any] = {}
    architectures = cfg.get("architectures")
    if isinstance(architectures, list) and architectures:
        facts["architecture"] = architectures[0]
    for name, keys in _KEYS.items():
        if (value := _first(cfg, keys)) is not None:
            facts[name] = value
    # The width of one routed expert: moe_intermediate_size where the model has dense layers too
    # (DeepSeek, Qwen3: intermediate_size is then theirs); Llama 4 names the dense one
    # intermediate_size_mlp; Mixtral and gpt-oss have only intermediate_size, the experts'.
    if cfg.get("moe_intermediate_size") is not None:
        facts["moe_intermediate_size"] = cfg["moe_intermediate_size"]
        if cfg.get("intermediate_size") is not None:
            facts["intermediate_size"] = cfg["intermediate_size"]
    elif cfg.get("intermediate_size_mlp") is not None:
        facts["moe_intermediate_size"] = cfg.get("intermediate_size")
        facts["intermediate_size"] = cfg["intermediate_size_mlp"]
        # Llama 4: every MoE layer has one shared expert, which its config.json has no key for
        facts.setdefault("num_shared_experts", 1)
    elif cfg.get("intermediate_size") is not None:
        facts["moe_intermediate_size"] = cfg["intermediate_size"]
    # Qwen3-MoE lists its dense layers (mlp_only_layers); the planner counts layers, so a count does.
    dense = cfg.get("mlp_only_layers")
    if isinstance(dense, list) and dense and "num_dense_layers" not in facts:
        facts["num_dense_layers"] = len(set(dense))
    dtype = _first(cfg, ("dtype", "torch_dtype"))
    if dtype in ("float32", "bfloat16", "float16"):
        facts["dtype"] = dtype
    # Sliding-window layers (gpt-oss): each caches at most sliding_window tokens; only layer_types says
    # which layers slide (Qwen2/3 configs carry a sliding_window they do not use).
    layer_types, window = cfg.get("layer_types"), cfg.get("sliding_window")
    if isinstance(layer_types, list) and isinstance(window, int) and "sliding_attention" in layer_types:
        facts["sliding_window"] = window
        facts["sliding_window_layers"] = layer_types.count("sliding_attention")
    # Chunked attention (Llama 4): no_rope_layers marks the chunked (RoPE) layers 1; transformers fills an
    # empty one with every no_rope_layer_interval-th layer global. attention_chunk_size null: none chunk.
    if "attention_chunk_size" in cfg:
        chunk, layers = cfg["attention_chunk_size"], cfg.get("num_hidden_layers")
        marks, interval = cfg.get("no_rope_layers"), cfg.get("no_rope_layer_interval", 4)
        if chunk is None:
            facts["chunked_attention_layers"] = 0
        elif isinstance(chunk, int):
            facts["attention_chunk_size"] = chunk
            if isinstance(marks, list) and marks:
                facts["chunked_attention_layers"] = sum(1 for m in marks if m)
            elif isinstance(layers, int) and isinstance(interval, int) and interval > 0:
                facts["chunked_attention_layers"] = layers - layers // interval
    quant = cfg.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, Mapping) else None
    if method in _QUANTIZED:
        facts["expert_weight_dtype" if method == "mxfp4" else "weight_dtype"] = _QUANTIZED[method]
    return facts


def checkpoint_config(path: Path) -> ModelConfig | None:
    """spec.model.config as the checkpoint at `path` states it (its config.json), or None when it has
    no config.json yet. ModelSourceError naming the file when it is not JSON or a value is out of range."""
    config_json = path / "config.json"
    if not config_json.is_file():
        return None
    try:
        raw = json.loads(config_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSourceError(f"{config_json}: cannot read it ({err})") from None
    if not isinstance(raw, dict):
        raise ModelSourceError(f"{config_json}: not a JSON object")
    try:
        return ModelConfig.model_validate(facts_from_config_json(raw))
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        field = ModelConfig.model_fields[name].alias or name if name in ModelConfig.model_fields else name
        raise ModelSourceError(f"{config_json}: {field} {first.get('input')!r}: {first['msg']}") from None


def with_checkpoint_facts(md: ModelDeployment, facts: ModelConfig) -> tuple[ModelDeployment, list[str]]:
    """The manifest with spec.model.config filled in from the checkpoint's config.json: the catalog
    entry, then config.json, then the manifest's own inline values (each overrides the one before, as
    inline values override the catalog). Also, one line per inline value config.json disagrees with."""
    inline = md.spec.model.config.model_dump(exclude_none=True) if md.spec.model.config else {}
    from_file = facts.model_dump(exclude_none=True)
    conflicts = [
        f"{ModelConfig.model_fields[k].alias or k} {inline[k]} (config.json: {v})"
        for k, v in from_file.items()
        if k in inline and inline[k] != v
    ]
    merged = ModelConfig.model_validate(from_file | inline)
    model = md.spec.model.model_copy(update={"config": merged})
    return md.model_copy(update={"spec": md.spec.model_copy(update={"model": model})}), conflicts
