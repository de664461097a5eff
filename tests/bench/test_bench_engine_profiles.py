"""bench_engine's avx2 profile as vLLM runs it: with the profile's environment (avx2_site/ first on its
path, torch's and oneDNN's caps), vLLM's CPU platform loads its AVX2 library, as on an AVX2-only CPU. On an
AVX-512 machine it would otherwise load its AVX-512 one, whose oneDNN matmuls die under the caps; on an
AVX2 machine the site changes nothing, so the test holds on either kind."""

from __future__ import annotations

import json
import os
import platform

import bench_engine
import pytest

from tests.engine_python import VLLM

LOADED = """
import json, torch
from vllm.platforms import current_platform
current_platform.import_kernels()
maps = [line.split()[-1] for line in open("/proc/self/maps")]
libraries = sorted({path.rsplit("/", 1)[-1] for path in maps if "/vllm/_C" in path})
print(json.dumps({
    "libraries": libraries,
    "aten": torch.backends.cpu.get_cpu_capability(),
    "avx512": torch.cpu._is_avx512_supported(),
    "amx": torch.cpu._is_amx_tile_supported(),
}))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the avx2 profile is for x86-64 CPUs")
def test_vllm_in_the_avx2_profile_loads_its_avx2_library() -> None:
    seen = json.loads(VLLM.run(LOADED, env=bench_engine.vllm_env("avx2")).strip().splitlines()[-1])
    assert seen == {"libraries": ["_C_AVX2.abi3.so"], "aten": "AVX2", "avx512": False, "amx": False}


def test_only_the_avx2_profile_puts_the_site_first_on_vllms_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert bench_engine.vllm_env("native") == {}
    env = bench_engine.vllm_env("avx2")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(bench_engine.AVX2_SITE), "/elsewhere"]
    assert (bench_engine.AVX2_SITE / "sitecustomize.py").is_file()
    assert {k: v for k, v in env.items() if k != "PYTHONPATH"} == bench_engine.PROFILES["avx2"]
