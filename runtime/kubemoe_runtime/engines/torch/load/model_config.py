"""The facts the runtime needs from a checkpoint's config.json, in one typed, architecture-neutral record.

`ModelConfig` is that record; beside it, what every family shares: the supported model types and dtypes,
`ConfigError`, and the checks on a model as a whole (`check_sizes`: experts per token against the routed
experts, the overall size). `ModelConfig.load` reads config.json; `ModelConfig.from_dict` checks that it
holds one object of a supported `model_type`, then hands it to config_families.py, the one place that
knows each family's spellings.

config.json is untrusted input (a checkpoint comes from wherever the user points). It is read as a
regular file inside the checkpoint folder, of at most MAX_CONFIG_BYTES (checkpoint_files.py), and every
field the runtime uses is checked before anything is sized from it (config_families.py, with
config_fields.py's typed reads). Every problem is a `ConfigError` naming the file and the field and saying
what would be valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from kubemoe_runtime.engines.torch.load.checkpoint_files import read_checkpoint_file
from kubemoe_runtime.engines.torch.load.config_fields import (
    MAX_EXPERT_LAYERS,
    MAX_PARAMETERS,
    Invalid,
    json_type,
    show,
)

SUPPORTED_ARCHITECTURES: Final = ("qwen3_moe", "mixtral", "deepseek_v3", "kimi_k2", "llama4_text", "llama4")

# Llama 4's text model alone (Llama4ForCausalLM), and the Hub's multimodal checkpoints
# (Llama4ForConditionalGeneration: the language model's config in `text_config`, its tensors under
# `language_model.`, beside a vision encoder the torch engine does not load).
LLAMA4_TYPES: Final = ("llama4_text", "llama4")

# Model types that are DeepSeek-V3's architecture under another name: Kimi K2's config.json says
# `model_type: kimi_k2` (its remote code is DeepSeek-V3's; transformers loads it as DeepseekV3ForCausalLM).
DEEPSEEK_V3_TYPES: Final = ("deepseek_v3", "kimi_k2")

# The checkpoint dtypes the torch engine runs (model/engine.py's DTYPES, --dtype's choices).
SUPPORTED_DTYPES: Final = ("bfloat16", "float16", "float32")

MAX_CONFIG_BYTES: Final = 16 << 20  # a real config.json is a few KB

Scoring = Literal["softmax", "sigmoid", "sigmoid_top"]
"""How the gate weighs experts: softmax over all, then top-K (Qwen3-MoE, Mixtral); sigmoid, biased and
group-limited choice (DeepSeek-V3, Kimi K2); sigmoid of each of the top-K logits (Llama 4)."""


class ConfigError(ValueError):
    """config.json is missing, malformed, or describes a model this runtime does not support."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # attention head size; for MLA the rope part (qk_rope_head_dim)
    dense_intermediate_size: int  # the MLP of non-MoE layers
    moe_intermediate_size: int  # one routed expert's hidden size
    n_routed_experts: int
    n_shared_experts: int
    top_k: int
    moe_layers: tuple[bool, ...]  # per layer: routed MoE (True) or dense MLP (False)
    scoring: Scoring
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_group: int
    topk_group: int
    qk_norm: bool
    rms_norm_eps: float
    rope_theta: float
    rope_interleave: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str  # the checkpoint's dtype, e.g. "bfloat16"
    eos_token_ids: tuple[int, ...]
    # Multi-head latent attention (DeepSeek); zero / None elsewhere.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Llama 3 rope scaling (Llama 4): factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings; None: plain rotary frequencies.
    rope_llama3: tuple[float, float, float, float] | None = None
    # Llama 4; empty / off elsewhere.
    nope_layers: tuple[int, ...] = ()  # layers without rotary embeddings
    chunked_layers: tuple[int, ...] = ()  # layers attending only within their chunk of positions
    attention_chunk_size: int = 0
    qk_l2_norm: bool = False  # queries and keys L2-normalised (no weight) after rotary, in rotary layers
    attn_temperature_tuning: bool = False  # no-rotary layers scale queries up with the position
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    expert_input_weighted: bool = False  # the routing weight scales an expert's input, not its output
    weight_prefix: str = ""  # before every checkpoint tensor name ("language_model." in a multimodal one)

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def fused_experts(self) -> bool:
        """Each MoE layer stores every routed expert in two tensors (Llama 4), not three per expert."""
        return self.arch in LLAMA4_TYPES

    @classmethod
    def load(cls, model_dir: Path | str) -> ModelConfig:
        """`model_dir`'s config.json: a regular file inside the folder, at most MAX_CONFIG_BYTES."""
        root = Path(model_dir)
        path = root / "config.json"
        try:
            data = read_checkpoint_file(root, "config.json", limit=MAX_CONFIG_BYTES)
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: not found") from err
        except OSError as err:
            raise ConfigError(f"{path}: cannot read it ({err})") from err
        except ValueError as err:  # CheckpointFileError: outside the folder, not a file, too big
            raise ConfigError(str(err)) from err
        try:
            raw = json.loads(data)
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err}); config.json is JSON in UTF-8") from err
        except (ValueError, RecursionError) as err:  # RecursionError: nesting too deep
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, cfg: object, *, source: str = "config.json") -> ModelConfig:
        if not isinstance(cfg, dict):
            raise ConfigError(
                f"{source}: a JSON {json_type(cfg)}, not an object; config.json holds one object of the "
                "model's settings"
            )
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: model_type {show(arch)} is not supported; expected one of "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # Imported here, not at the top: config_families.py imports this module (it builds ModelConfigs).
        from kubemoe_runtime.engines.torch.load.config_families import parse_family

        try:
            return parse_family(str(arch), cfg)
        except Invalid as err:
            raise ConfigError(f"{source}: {err}") from err
        except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError) as err:
            # A problem no check above names (a gap in them): still one line naming the file.
            raise ConfigError(f"{source}: cannot read it ({type(err).__name__}: {err})") from err


def _parameters(c: ModelConfig) -> int:
    """About how many parameters `c` describes (embeddings, attention, experts, dense MLPs)."""
    d, h = c.hidden_size, c.num_heads
    if c.uses_mla:
        qk = h * (c.qk_nope_head_dim + c.qk_rope_head_dim)
        q = d * qk if c.q_lora_rank is None else c.q_lora_rank * (d + qk)
        kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * h * (
            c.qk_nope_head_dim + c.v_head_dim
        )
        attention = q + kv + h * c.v_head_dim * d
    else:
        attention = d * c.head_dim * 2 * (h + c.num_kv_heads)
    moe = sum(c.moe_layers)
    experts = moe * (c.n_routed_experts + c.n_shared_experts) * 3 * d * c.moe_intermediate_size
    dense = (c.num_layers - moe) * 3 * d * c.dense_intermediate_size
    embeddings = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
    return embeddings + c.num_layers * attention + experts + moe * c.n_routed_experts * d + dense


def check_sizes(c: ModelConfig, *, experts: str) -> None:
    """What no single field shows: experts per token against the experts, the model's overall size; an
    `Invalid` naming the field where either is out of bounds (`experts`: the routed experts' field)."""
    if c.top_k > c.n_routed_experts:
        raise Invalid(
            "num_experts_per_tok",
            f"{c.top_k} is more than the {c.n_routed_experts} routed experts ({experts}); "
            f"give 1 to {c.n_routed_experts}",
        )
    moe = sum(c.moe_layers)
    if moe * c.n_routed_experts > MAX_EXPERT_LAYERS:
        raise Invalid(
            experts,
            f"{c.n_routed_experts} routed experts in each of {moe} MoE layers is more than the "
            f"{MAX_EXPERT_LAYERS} expert instances this runtime accepts",
        )
    if (n := _parameters(c)) > MAX_PARAMETERS:
        raise Invalid(
            "sizes",
            f"hidden_size, vocab_size, the layer, head and expert counts and the intermediate sizes "
            f"describe a model of about {n:.3g} parameters, more than the {MAX_PARAMETERS:.3g} this "
            "runtime accepts (Kimi K2 has 1.04e12)",
        )
