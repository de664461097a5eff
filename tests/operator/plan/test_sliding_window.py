"""A sliding-window attention layer keeps only part of a sequence where the engine's KV cache knows it:
vLLM's hybrid KV cache manager keeps window - 1 + its in-flight tokens there (127 + 2 x 8192 = 16511 for
gpt-oss on an H100, half of whose 36 layers slide over 128 tokens), on GPUs, with no KV connector or
NIXL. Counted as full layers, gpt-oss-120b at its 131072-token context was refused on one H100, where
vLLM serves it; counted as kept where vLLM turns the manager off (LMCache, the example connector, cpu) or
in another engine, the plan would promise a context the engine then refuses at start."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.spec import AcceleratorSpec
from kubemoe_operator.catalog import load_catalog, resolve_gpu, resolve_model
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.plan.sizing import engine_kv, vllm_in_flight_tokens
from tests.operator.helpers import BASE

GPT_OSS = {"name": "openai/gpt-oss-120b", "source": "hf://openai/gpt-oss-120b"}
KEPT = 128 - 1 + vllm_in_flight_tokens(resolve_gpu(AcceleratorSpec(type="H100"), load_catalog()))


def one_h100(**engine: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["spec"].update(
        model=copy.deepcopy(GPT_OSS),  # a test may add a config to it
        engine=engine,
        accelerator={"type": "H100", "perPod": 1},
        serving={"mode": "colocated"},
        roles={"worker": {"parallelism": {"tensor": 1, "data": 1, "expert": 1}}},
    )
    return data


def disaggregated(connector: str) -> dict[str, Any]:
    data = one_h100()
    parallelism = {"tensor": 1, "data": 1, "expert": 1}
    data["spec"]["serving"] = {"mode": "disaggregated", "kvTransfer": {"connector": connector}}
    role: dict[str, Any] = {"parallelism": parallelism}
    if connector == "lmcache":  # the store both roles' LMCache share (api/lmcache.py)
        role["pod"] = {"env": [{"name": "LMCACHE_REMOTE_URL", "value": "redis://kv:6379"}]}
    data["spec"]["roles"] = {"prefill": role, "decode": role}
    return data


def test_gpt_oss_at_its_whole_context_fits_one_h100_in_vllm() -> None:
    for data in (one_h100(), disaggregated("nixl")):
        for role in plan_manifest(parse_manifest(data)).roles:
            assert role.memory.max_model_len == 131072
            assert role.memory.kv_tokens >= 131072


def test_where_vllm_keeps_every_token_the_sliding_layers_count_in_full() -> None:
    with pytest.raises(ManifestError) as err:
        plan_manifest(parse_manifest(disaggregated("lmcache")))  # LMCache: no hybrid KV cache manager
    assert {p.field for p in err.value.problems} == {"spec.engine.maxModelLen"}


def test_sliding_layers_cost_what_vllm_keeps_of_them() -> None:
    md = parse_manifest(one_h100())
    catalog = load_catalog()
    model = resolve_model(md.spec.model, catalog)
    gpu = resolve_gpu(md.spec.accelerator, catalog)
    assert (model.sliding_window, model.sliding_window_layers) == (128, 18)
    full_layer = 2 * model.num_key_value_heads * model.head_dim * 2  # K and V, bf16
    kept = engine_kv(model, engine="vllm", gpu=gpu, connector=None)
    assert kept.sliding_kept == KEPT
    assert kept.kv_bytes_per_token(tensor=1, max_len=KEPT) == 36 * full_layer  # within what it keeps
    long = kept.kv_bytes_per_token(tensor=1, max_len=131072)
    assert long == pytest.approx((18 + 18 * KEPT / 131072) * full_layer)
    for other in (
        engine_kv(model, engine="vllm", gpu=gpu, connector="lmcache"),
        engine_kv(model, engine="sglang", gpu=gpu, connector=None),
    ):
        assert other.sliding_kept is None
        assert other.kv_bytes_per_token(tensor=1, max_len=131072) == 36 * full_layer


def test_the_suggested_max_model_len_fits() -> None:
    """Past the kept tokens only the full layers grow: the longest sequence is not the token count at
    the refused length (which a shorter length would raise, refusing the suggestion again)."""
    data = one_h100(maxModelLen=131072, gpuMemoryUtilization=0.85)
    with pytest.raises(ManifestError) as err:
        plan_manifest(parse_manifest(data))
    (problem,) = err.value.problems
    match = re.search(r"maxModelLen <= (\d+)", problem.fix)
    assert match, problem.fix
    longest = int(match.group(1))
    plan_manifest(parse_manifest(one_h100(maxModelLen=longest, gpuMemoryUtilization=0.85)))
    with pytest.raises(ManifestError):
        plan_manifest(parse_manifest(one_h100(maxModelLen=longest + 2, gpuMemoryUtilization=0.85)))


def test_more_sliding_layers_than_layers_is_refused_naming_the_field() -> None:
    data = one_h100()
    data["spec"]["model"]["config"] = {"slidingWindowLayers": 40}
    with pytest.raises(ManifestError) as err:
        plan_manifest(parse_manifest(data))
    (problem,) = err.value.problems
    assert problem.field == "spec.model.config.slidingWindowLayers"
    assert "40 sliding-window layers but only 36 layers" in problem.message


@pytest.mark.parametrize(
    ("gpu", "batched"),
    [("B200", 16384), ("MI300X", 16384), ("H200", 8192), ("H100", 8192), ("A100-80GB", 2048), ("L40S", 2048)],
)
def test_vllm_holds_two_batches_of_its_default_step_on_each_gpu(gpu: str, batched: int) -> None:
    """vLLM 0.32's default max_num_batched_tokens follows the device's memory (and skips A100s), and async
    scheduling keeps two batches in flight: on a B200 a sliding layer holds 127 + 32768 tokens, not 16511."""
    catalog = load_catalog()
    facts = resolve_gpu(AcceleratorSpec(type=gpu), catalog)
    assert vllm_in_flight_tokens(facts) == 2 * batched
    model = engine_kv(
        resolve_model(parse_manifest(one_h100()).spec.model, catalog),
        engine="vllm",
        gpu=facts,
        connector=None,
    )
    assert model.sliding_kept == 127 + 2 * batched


@pytest.mark.parametrize(
    ("args", "in_flight"),
    [
        (["--max-num-batched-tokens", "4096"], 8192),
        (["--max_num_batched_tokens=4096"], 8192),
        (["--no-async-scheduling"], 8192),
        (["--max-num-batched-tokens=2048", "--no-async-scheduling"], 2048),
        (["--no-async-scheduling", "--async-scheduling"], 16384),
        (["--enable-prefix-caching"], 16384),
    ],
)
def test_extra_args_that_change_vllms_step_change_what_sliding_layers_hold(
    args: list[str], in_flight: int
) -> None:
    """The step's tokens and async scheduling are the user's to set (extraArgs): the plan counts them."""
    (role,) = plan_manifest(parse_manifest(one_h100(extraArgs=args))).roles
    model = resolve_model(parse_manifest(one_h100()).spec.model, load_catalog())
    kept = replace(model, sliding_kept=127 + in_flight)
    assert role.memory.kv_bytes_per_token == pytest.approx(kept.kv_bytes_per_token(tensor=1, max_len=131072))


@pytest.mark.parametrize(
    ("args", "hybrid"),
    [
        (["--disable-hybrid-kv-cache-manager"], False),
        (["--disable_hybrid_kv_cache_manager", "--no-disable-hybrid-kv-cache-manager"], True),
        (["--kv-offloading-size", "64", "--kv-offloading-backend", "lmcache"], False),
        (
            ["--kv-offloading-size", "64", "--kv-offloading-backend", "native"],
            True,
        ),  # it supports the manager
    ],
)
def test_extra_args_that_turn_the_hybrid_manager_off_count_sliding_layers_in_full(
    args: list[str], hybrid: bool
) -> None:
    """vLLM keeps only the window where its hybrid KV cache manager runs: not where extraArgs turn it off,
    nor with LMCache's offloading connector (LMCacheMPConnector does not support it; vLLM's own does)."""
    catalog = load_catalog()
    md = parse_manifest(one_h100(extraArgs=args))
    model = resolve_model(md.spec.model, catalog)
    gpu = resolve_gpu(md.spec.accelerator, catalog)
    kept = engine_kv(model, engine="vllm", gpu=gpu, connector=None, extra_args=args)
    assert (kept.sliding_kept is not None) == hybrid
