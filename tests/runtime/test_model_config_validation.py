"""config.json as untrusted input: every field the runtime sizes anything from is checked when it is read,
and every problem is one ConfigError naming the file, the field and what would do (never a
ZeroDivisionError, a TypeError, a 1.7 truncated to 1, or a count that allocates terabytes later). The file
itself is read as shards are: a regular file inside the checkpoint folder, of bounded size.

Real config.json files of every architecture still load: the Hub's (DeepSeek-V3, Kimi K2, Mixtral, Qwen3,
Llama 4 Scout and Maverick) and every tiny checkpoint the tests generate."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemoe_runtime.engines.torch.load import model_config
from kubemoe_runtime.engines.torch.load.config_fields import (
    MAX_COUNT,
    MAX_EXPERT_LAYERS,
    MAX_VOCAB,
    MAX_WIDTH,
)
from kubemoe_runtime.engines.torch.load.model_config import ConfigError, ModelConfig
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES

from ..operator.local.test_local_up import DEEPSEEK_V3, MIXTRAL_8X7B, QWEN3_30B_A3B
from .test_catalog_cross_check import KIMI_K2, PUBLIC
from .test_llama4 import MAVERICK_TEXT, SCOUT_TEXT

# The tiny Qwen3-MoE checkpoint's config.json (tools/checkpoints.py), the keys the runtime reads.
QWEN = {
    "model_type": "qwen3_moe",
    "dtype": "bfloat16",
    "torch_dtype": "bfloat16",
    "eos_token_id": 2,
    "head_dim": 32,
    "hidden_size": 64,
    "intermediate_size": 96,
    "max_position_embeddings": 512,
    "mlp_only_layers": [0],
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "rope_theta": 10000.0,
    "decoder_sparse_step": 1,
    "tie_word_embeddings": False,
    "vocab_size": 512,
}
DEEPSEEK = {k: v for k, v in DEEPSEEK_V3.items() if k != "quantization_config"}


def _refused(cfg: Any, field: str, problem: str) -> None:
    """`cfg` is refused by a ConfigError that names config.json and `field`, then says `problem`."""
    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_dict(cfg)
    message = str(caught.value)
    assert message.startswith(f"config.json: {field}: "), message
    assert problem in message, message


# -- each field ------------------------------------------------------------------------------------

BAD_QWEN = {
    "heads-0": ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads", "0 is out of range"),
    "hidden-negative": ({"hidden_size": -64}, "hidden_size", "-64 is out of range; give an integer from 1"),
    "hidden-fraction": ({"hidden_size": 1.7}, "hidden_size", "1.7 is not an integer"),
    "hidden-string": ({"hidden_size": "abc"}, "hidden_size", "'abc' is not an integer"),
    "hidden-digits": ({"hidden_size": "64"}, "hidden_size", "'64' is not an integer"),
    "hidden-bool": ({"hidden_size": True}, "hidden_size", "True is not an integer"),
    "hidden-huge": ({"hidden_size": MAX_WIDTH + 1}, "hidden_size", f"give an integer from 1 to {MAX_WIDTH}"),
    "layers-list": ({"num_hidden_layers": [3]}, "num_hidden_layers", "[3] is not an integer"),
    "experts-1e9": (
        {"num_experts": 10**9, "num_local_experts": 10**9},
        "num_experts",
        f"1000000000 is out of range; give an integer from 1 to {MAX_COUNT}",
    ),
    "experts-negative": ({"num_experts": -1, "num_local_experts": None}, "num_experts", "-1 is out of range"),
    "experts-absent": (
        {"num_experts": None, "num_local_experts": None},
        "num_experts",
        "missing (nor num_local_experts)",
    ),
    "top-k-over-experts": (
        {"num_experts_per_tok": 100},
        "num_experts_per_tok",
        "100 is more than the 8 routed experts (num_experts); give 1 to 8",
    ),
    "top-k-0": ({"num_experts_per_tok": 0}, "num_experts_per_tok", "0 is out of range"),
    "kv-heads-not-dividing": (
        {"num_key_value_heads": 3},
        "num_key_value_heads",
        "3 does not divide num_attention_heads 4",
    ),
    "kv-heads-over-heads": ({"num_key_value_heads": 8}, "num_key_value_heads", "8 is out of range"),
    "head-dim-odd": ({"head_dim": 33}, "head_dim", "33 is odd"),
    "head-dim-derived-0": (
        {"head_dim": None, "hidden_size": 2, "num_attention_heads": 4, "num_key_value_heads": 4},
        "head_dim (hidden_size / num_attention_heads)",
        "0 is out of range",
    ),
    "sparse-step-0": ({"decoder_sparse_step": 0}, "decoder_sparse_step", "0 is out of range"),
    "rope-a-list": ({"rope_parameters": [1]}, "rope_parameters", "a JSON array, not an object"),
    "rope-theta-0": ({"rope_theta": 0}, "rope_theta", "0 is not a positive finite number"),
    "mlp-only-an-int": ({"mlp_only_layers": 5}, "mlp_only_layers", "5 is not a list of integers"),
    "mlp-only-strings": ({"mlp_only_layers": ["0"]}, "mlp_only_layers[0]", "'0' is not an integer"),
    "eos-strings": ({"eos_token_id": ["x"]}, "eos_token_id[0]", "'x' is not an integer"),
    "eos-a-string": ({"eos_token_id": "2"}, "eos_token_id", "'2' is not an integer"),
    "eos-negative": ({"eos_token_id": [-1]}, "eos_token_id[0]", "-1 is out of range"),
    "eps-nan": ({"rms_norm_eps": math.nan}, "rms_norm_eps", "nan is not a positive finite number"),
    "eps-inf": ({"rms_norm_eps": math.inf}, "rms_norm_eps", "inf is not a positive finite number"),
    "eps-0": ({"rms_norm_eps": 0}, "rms_norm_eps", "0 is not a positive finite number"),
    "eps-string": ({"rms_norm_eps": "1e-6"}, "rms_norm_eps", "'1e-6' is not a positive finite number"),
    "positions-negative": ({"max_position_embeddings": -1}, "max_position_embeddings", "-1 is out of range"),
    "moe-width-1e9": ({"moe_intermediate_size": 10**9}, "moe_intermediate_size", "is out of range"),
    "vocab-huge": ({"vocab_size": MAX_VOCAB + 1}, "vocab_size", "is out of range"),
    "dtype-float64": ({"dtype": "float64"}, "dtype", "'float64' is not a dtype the torch engine runs"),
    "torch-dtype-int8": (
        {"dtype": None, "torch_dtype": "int8"},
        "torch_dtype",
        "'int8' is not a dtype the torch engine runs; it runs bfloat16, float16, float32",
    ),
    "tie-a-string": ({"tie_word_embeddings": "false"}, "tie_word_embeddings", "'false' is not true or false"),
    "rope-yarn": (
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
        "rope_parameters.rope_type",
        "rope type 'yarn' is not supported yet",
    ),
    "too-many-parameters": (
        {"hidden_size": 2**20, "vocab_size": 2**24, "head_dim": 64},
        "sizes",
        "describe a model of about",
    ),
}


@pytest.mark.parametrize(("change", "field", "problem"), BAD_QWEN.values(), ids=BAD_QWEN.keys())
def test_a_bad_field_is_refused_by_name(change: dict[str, Any], field: str, problem: str) -> None:
    _refused({**QWEN, **change}, field, problem)


BAD_DEEPSEEK = {
    "groups-not-dividing": ({"n_group": 3}, "n_group", "3 groups of the 256 routed experts"),
    "one-expert-a-group": ({"n_group": 256, "topk_group": 8}, "n_group", "at least 2 experts each"),
    "topk-group-over-groups": ({"topk_group": 9}, "topk_group", "9 is more than n_group 8"),
    "top-k-over-chosen-groups": (
        {"n_group": 8, "topk_group": 1, "num_experts_per_tok": 33},
        "num_experts_per_tok",
        "33 is more than the 32 experts of topk_group 1 groups",
    ),
    "rope-dim-odd": ({"qk_rope_head_dim": 63}, "qk_rope_head_dim", "63 is odd"),
    "q-lora-0": ({"q_lora_rank": 0}, "q_lora_rank", "0 is out of range"),
    "first-dense-negative": ({"first_k_dense_replace": -1}, "first_k_dense_replace", "-1 is out of range"),
    "freq-0": ({"moe_layer_freq": 0}, "moe_layer_freq", "0 is out of range"),
    "scaling-nan": ({"routed_scaling_factor": math.nan}, "routed_scaling_factor", "nan is not a positive"),
    "router-softmax": ({"scoring_func": "softmax"}, "scoring_func", "scoring_func 'softmax'"),
}


@pytest.mark.parametrize(("change", "field", "problem"), BAD_DEEPSEEK.values(), ids=BAD_DEEPSEEK.keys())
def test_a_bad_deepseek_field_is_refused_by_name(change: dict[str, Any], field: str, problem: str) -> None:
    _refused({**DEEPSEEK, **change}, field, problem)


def test_llama4_fields_are_checked_and_named_inside_text_config() -> None:
    multimodal: dict[str, Any] = PUBLIC["meta-llama/Llama-4-Scout-17B-16E-Instruct"]
    rope: dict[str, Any] = dict(SCOUT_TEXT["rope_scaling"])  # type: ignore[call-overload]
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"hidden_size": -1}, "text_config.hidden_size", "-1 is out of range"),
        ({"no_rope_layers": [2] * 48}, "text_config.no_rope_layers[0]", "2 is out of range"),
        ({"attention_chunk_size": 0}, "text_config.attention_chunk_size", "0 is out of range"),
        ({"floor_scale": 0}, "text_config.floor_scale", "0 is not a positive finite number"),
        ({"rope_scaling": {**rope, "factor": "16"}}, "text_config.rope_scaling.factor", "'16' is not"),
    ]
    for text, field, problem in cases:
        _refused({**multimodal, "text_config": {**SCOUT_TEXT, **text}}, field, problem)
        _refused({**SCOUT_TEXT, **text}, field.removeprefix("text_config."), problem)
    _refused({**multimodal, "text_config": []}, "text_config", "a JSON array, not an object")
    _refused({**multimodal, "text_config": None}, "text_config", "missing")


@pytest.mark.parametrize("doc", [[], "qwen3_moe", 5, None, True], ids=repr)
def test_a_document_that_is_not_an_object_is_refused(doc: Any) -> None:
    with pytest.raises(ConfigError, match=r"^config\.json: a JSON \w+, not an object"):
        ModelConfig.from_dict(doc)


def test_expert_instances_are_capped_over_the_layers() -> None:
    """Each cap alone would allow 2**16 experts in each of 2**16 layers: tables of 2**32 entries."""
    many = {
        "num_experts": MAX_COUNT,
        "num_hidden_layers": 64,
        "mlp_only_layers": [],
        "moe_intermediate_size": 1,
    }
    _refused({**QWEN, **many}, "num_experts", f"the {MAX_EXPERT_LAYERS} expert instances")


# -- real files still load -------------------------------------------------------------------------


def test_the_hubs_config_json_files_load() -> None:
    no_yarn = {k: v for k, v in KIMI_K2.items() if k != "rope_scaling"}  # refused by name: no YaRN yet
    deepseek, kimi = ModelConfig.from_dict(DEEPSEEK), ModelConfig.from_dict(no_yarn)
    assert (deepseek.n_routed_experts, deepseek.n_group, deepseek.topk_group, deepseek.top_k) == (
        256,
        8,
        4,
        8,
    )
    assert sum(deepseek.moe_layers) == 58
    assert (kimi.n_routed_experts, kimi.hidden_size, kimi.vocab_size) == (384, 7168, 163840)
    mixtral, qwen = ModelConfig.from_dict(MIXTRAL_8X7B), ModelConfig.from_dict(QWEN3_30B_A3B)
    assert (mixtral.head_dim, mixtral.num_kv_heads, mixtral.n_routed_experts) == (128, 8, 8)
    assert (qwen.n_routed_experts, qwen.vocab_size, qwen.num_kv_heads) == (128, 151936, 4)
    for text in (SCOUT_TEXT, MAVERICK_TEXT):
        assert ModelConfig.from_dict(text).max_position_embeddings == 10485760
    for name in PUBLIC:
        if "Llama-4" in name:
            assert ModelConfig.from_dict(PUBLIC[name]).arch == "llama4"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_tiny_checkpoint_loads_and_its_bad_copy_is_refused(
    checkpoints: dict[str, Path], arch: str
) -> None:
    raw = json.loads((checkpoints[arch] / "config.json").read_text())
    cfg = ModelConfig.load(checkpoints[arch])
    assert cfg == ModelConfig.from_dict(raw, source=str(checkpoints[arch] / "config.json"))
    assert 1 <= cfg.top_k <= cfg.n_routed_experts
    _refused({**raw, "hidden_size": -64}, "hidden_size", "-64 is out of range")
    _refused({**raw, "num_experts_per_tok": 9}, "num_experts_per_tok", "9 is more than the")
    _refused({**raw, "num_attention_heads": 0}, "num_attention_heads", "0 is out of range")


def test_integral_floats_and_int_flags_read_as_a_json_writer_meant_them() -> None:
    cfg = ModelConfig.from_dict({**QWEN, "hidden_size": 64.0, "max_position_embeddings": 512.0})
    assert (cfg.hidden_size, cfg.max_position_embeddings) == (64, 512)
    assert type(cfg.hidden_size) is int
    # The Hub's Llama 4 says attn_temperature_tuning: 4 (transformers reads it as true).
    assert ModelConfig.from_dict({**SCOUT_TEXT, "attn_temperature_tuning": 4}).attn_temperature_tuning


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(
    base=st.sampled_from([QWEN, DEEPSEEK, MIXTRAL_8X7B, SCOUT_TEXT, PUBLIC[next(iter(PUBLIC))]]),
    changes=st.dictionaries(
        st.sampled_from(
            sorted({*QWEN, *DEEPSEEK, *SCOUT_TEXT, "text_config", "num_local_experts", "rope_scaling"})
        ),
        JSON,
        min_size=1,
        max_size=3,
    ),
)
def test_any_field_value_loads_sanely_or_is_a_config_error(
    base: dict[str, Any], changes: dict[str, Any]
) -> None:
    try:
        cfg = ModelConfig.from_dict({**base, **changes})
    except ConfigError as err:
        message = str(err)
    else:
        message = ""
    if message:  # named by a check (not by the catch-all for what the checks missed)
        assert message.startswith("config.json: ")
        assert "cannot read it" not in message, message
        return
    dims = (cfg.hidden_size, cfg.num_layers, cfg.head_dim, cfg.vocab_size)
    assert all(type(n) is int and n >= 1 for n in dims)
    assert cfg.num_heads % cfg.num_kv_heads == 0
    assert 1 <= cfg.top_k <= cfg.n_routed_experts <= MAX_COUNT
    assert cfg.n_routed_experts % cfg.n_group == 0
    assert cfg.topk_group <= cfg.n_group
    assert math.isfinite(cfg.rms_norm_eps)
    assert cfg.rms_norm_eps > 0
    assert all(type(i) is int for i in cfg.eos_token_ids)
    assert cfg.dtype in ("bfloat16", "float16", "float32")


# -- the file --------------------------------------------------------------------------------------


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN))
    return folder


def _load_refused(model: Path, problem: str) -> str:
    """ModelConfig.load refuses `model` naming its config.json, and serve's pre-start check says so."""
    from kubemoe_runtime.pod.settings import parse_args
    from kubemoe_runtime.serve import model_problem

    with pytest.raises(ConfigError) as caught:
        ModelConfig.load(model)
    message = str(caught.value)
    assert message.startswith(f"{model / 'config.json'}: "), message
    assert problem in message, message
    settings_, _ = parse_args(["--model", str(model)])
    assert model_problem(settings_) == f"--model: {message}"
    return message


def test_a_config_json_linked_to_dev_zero_is_refused_without_reading_it(model: Path) -> None:
    (model / "config.json").unlink()
    (model / "config.json").symlink_to("/dev/zero")
    _load_refused(model, "a link to /dev/zero, outside the checkpoint folder")


def test_a_config_json_linked_outside_the_folder_is_refused(model: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    shutil.move(model / "config.json", outside)
    (model / "config.json").symlink_to(outside)
    _load_refused(model, f"a link to {outside}, outside the checkpoint folder")


def test_links_inside_the_folder_and_a_hub_cache_snapshot_load(model: Path, tmp_path: Path) -> None:
    shutil.move(model / "config.json", model / "real.json")
    (model / "config.json").symlink_to("real.json")
    assert ModelConfig.load(model).hidden_size == 64
    snapshot, blobs = tmp_path / "models--org--m" / "snapshots" / "abc", tmp_path / "models--org--m" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    shutil.copy(model / "real.json", blobs / "sha")
    (snapshot / "config.json").symlink_to(Path("..") / ".." / "blobs" / "sha")
    assert ModelConfig.load(snapshot).hidden_size == 64


def test_a_config_json_that_is_not_a_regular_file_is_refused(model: Path) -> None:
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")  # opening it for reading must not wait for a writer
    _load_refused(model, "not a regular file")
    (model / "config.json").unlink()
    (model / "config.json").mkdir()
    _load_refused(model, "not a regular file")


def test_a_config_json_over_the_limit_is_refused(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_config, "MAX_CONFIG_BYTES", 4096)
    (model / "config.json").write_text(json.dumps(QWEN) + " " * 4096)
    _load_refused(model, "over the 4096-byte limit")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"\xff": 1}', "not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"{bad", "not valid JSON"),
        (b"[]", "a JSON array, not an object"),
        (json.dumps({**QWEN, "num_attention_heads": 0, "head_dim": None}).encode(), "num_attention_heads: 0"),
        (json.dumps({**QWEN, "torch_dtype": "float64", "dtype": None}).encode(), "torch_dtype: 'float64'"),
    ],
    ids=["bad-utf8", "deep", "bad-json", "a-list", "heads-0", "float64"],
)
def test_a_malformed_config_json_is_one_error_naming_it(model: Path, content: bytes, problem: str) -> None:
    (model / "config.json").write_bytes(content)
    _load_refused(model, problem)
