"""Autoscaling metrics (mode operator) on a role of an engine that runs its own server (sglang, tgi): the
operator's autoscaler reads only kubemoe_* series, which the runtime serves for torch and re-exports for
vLLM; SGLang's and TGI's servers export their own (sglang:*, tgi_*), so every metric would be missing
and the role would never scale. Refused naming the metrics, in Python and as a CRD rule; mode external
(an HPA on the engine's own series) and prefill's perDecode without metrics (it reads none) stay."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.engines import BY_KIND, describe
from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.gen.crd import crd
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import REPO

SGLANG = REPO / "examples" / "engines" / "sglang-deepseek-v3.yaml"
TGI = REPO / "examples" / "engines" / "tgi-mixtral-8x7b.yaml"
QUEUE = {"minReplicas": 1, "maxReplicas": 4, "metrics": [{"type": "queue-depth", "target": 32}]}


def _with(path: Path, role: str, autoscaling: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    data["spec"]["roles"][role]["autoscaling"] = copy.deepcopy(autoscaling)
    return data


@pytest.mark.parametrize(("path", "role"), [(SGLANG, "decode"), (SGLANG, "prefill"), (TGI, "worker")])
def test_metrics_on_an_own_server_engine_are_refused_naming_them(path: Path, role: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(_with(path, role, QUEUE))
    (problem,) = err.value.problems
    assert problem.field == f"spec.roles.{role}.autoscaling.metrics"
    assert "kubemoe_*" in problem.message
    assert "never scale" in problem.message
    assert "mode: external" in problem.fix


def test_mode_external_and_per_decode_alone_still_plan_on_sglang() -> None:
    data = _with(SGLANG, "decode", {"mode": "external"})
    data["spec"]["roles"]["prefill"]["autoscaling"] = {"maxReplicas": 4, "perDecode": {"min": 1, "max": 1}}
    plan_manifest(parse_manifest(data))
    plan_manifest(parse_manifest(_with(TGI, "worker", {"mode": "external"})))


def test_vllm_keeps_operator_autoscaling_on_metrics() -> None:
    data = _with(SGLANG, "decode", QUEUE)
    data["spec"]["engine"] = {"kind": "vllm", "maxModelLen": 32768}
    data["spec"]["serving"]["kvTransfer"]["connector"] = "nixl"
    plan_manifest(parse_manifest(data))


def _spec_rules() -> list[dict[str, str]]:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules: list[dict[str, str]] = schema["x-kubernetes-validations"]
    return rules


@pytest.mark.parametrize("kind", ["sglang", "tgi"])
@pytest.mark.parametrize("role", ["prefill", "decode", "worker"])
def test_the_crd_refuses_them_too(kind: str, role: str) -> None:
    scale = f"self.roles.{role}.autoscaling"
    (rule,) = [
        r
        for r in _spec_rules()
        if r.get("fieldPath") == f".roles.{role}.autoscaling.metrics" and f"'{kind}'" in r["rule"]
    ]
    assert rule["rule"] == (
        f"self.engine.kind != '{kind}' || !has(self.roles.{role}) || !has({scale})"
        f" || !has({scale}.metrics) || size({scale}.metrics) == 0"
    )
    assert "kubemoe_*" in rule["message"]


def test_no_crd_rule_limits_the_engines_that_export_kubemoe_series() -> None:
    for kind in ("vllm", "torch"):
        assert not [
            r for r in _spec_rules() if f"'{kind}'" in r["rule"] and "autoscaling.metrics" in r["rule"]
        ]


def test_the_engine_table_says_so() -> None:
    rows = {kind: dict(describe(e)) for kind, e in BY_KIND.items()}
    assert rows["vllm"]["autoscaling metrics (mode operator)"] == "yes"
    assert rows["sglang"]["autoscaling metrics (mode operator)"].startswith("no")
    assert rows["tgi"]["autoscaling metrics (mode operator)"].startswith("no")
