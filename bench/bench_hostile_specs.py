"""The planner on hostile specs: the examples with up to four fields set to any value the CRD admits
(tests/operator/crd_strategy.py's hostile_specs, 600 specs, a fixed draw), each parsed and planned
or refused, against the reference of planning the four example manifests as written, in this process.

The operator plans on its event loop, so the slowest hostile spec is what one tenant could hold every
other reconcile up by; the goal is under 50 ms.

Run: `PYTHONPATH=. .venv/bin/python bench/bench_hostile_specs.py` (`make bench`).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.crd_strategy import EXAMPLES, base_spec, hostile_specs

HEADER = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "bench"}}
SPECS = 600
REFERENCE_ROUNDS = 100


def cpu() -> str:
    """The CPU's model and the vector flags that matter on these machines (every bench says which)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?"
    )
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    have = " ".join(f for f in wanted if f in flags) or "none of interest"
    return f"{model} ({platform.machine()}); flags: {have}"


def plan_seconds(spec: dict[str, Any]) -> tuple[float, bool]:
    start = time.perf_counter()
    planned = False
    with contextlib.suppress(ManifestError):
        plan_manifest(parse_manifest({**HEADER, "spec": spec}))
        planned = True
    return time.perf_counter() - start, planned


def main() -> None:
    print(f"# {cpu()}")
    bases = [base_spec(name) for name in EXAMPLES]
    reference = [plan_seconds(spec)[0] for _ in range(REFERENCE_ROUNDS) for spec in bases]
    ref_ms = statistics.mean(reference) * 1e3
    hostile: list[tuple[float, bool]] = []

    @settings(max_examples=SPECS, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(hostile_specs())
    def run(spec: dict[str, Any]) -> None:
        hostile.append(plan_seconds(spec))

    run()
    times = sorted(t for t, _ in hostile)
    planned = sum(1 for _, ok in hostile if ok)
    p99 = times[int(0.99 * (len(times) - 1))] * 1e3
    print(
        f"reference: the {len(bases)} examples as written, {ref_ms:.3f} ms per plan ({len(reference)} runs)"
    )
    print(f"hostile: {len(times)} specs ({planned} planned, {len(times) - planned} refused)")
    mean_ms = statistics.mean(times) * 1e3
    print(f"  mean {mean_ms:.3f} ms ({mean_ms / ref_ms:.2f}x reference)")
    print(f"  p99  {p99:.3f} ms ({p99 / ref_ms:.2f}x)")
    print(f"  max  {times[-1] * 1e3:.3f} ms ({times[-1] * 1e3 / ref_ms:.2f}x); goal under 50 ms")


if __name__ == "__main__":
    main()
