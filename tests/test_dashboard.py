"""The Grafana dashboard (charts/kubemoe/dashboards/kubemoe.json, #20) queries only series the code
exports: every PromQL expression it holds (panels and variables) is taken apart by a small tokenizer
below, and each metric name it names must be one the real registries export (the runtime's catalog:
ServingMetrics, the NVML collector, the vLLM front, the router; and OperatorMetrics). Where the
Prometheus test binary is cached (`make prometheus`), promtool parses every expression too.

The tokenizer, not a PyPI PromQL parser: `promql-parser` (Rust bindings) is on the registry, but a
dependency for one test is more than the ~40 lines below, which the first test pins on hard cases.
A metric name is an identifier outside strings, label matchers `{...}` and ranges `[...]`, not
followed by `(` (a function), not a keyword, and not in a `by`/`without`/`on`/`ignoring`/
`group_left`/`group_right` label list.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.gen.metrics_reference import operator_metrics, read_catalog
from kubemoe_runtime.metrics_catalog import catalog_json
from tests.operator.helpers import REPO

DASHBOARD = REPO / "charts" / "kubemoe" / "dashboards" / "kubemoe.json"
PROMTOOL = Path.home() / ".cache" / "kubemoe" / "prometheus" / "usr" / "bin" / "promtool"

KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"inf", "nan", "atan2"}
)
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk"}
    | {"quantile", "limitk", "limit_ratio"}
)
TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      |(?P<var>\$\{?\w+\}?)
      |(?P<duration>\d+(?:ms|s|m|h|d|w|y)\b)
      |(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      |(?P<open>[({\[])|(?P<close>[)}\]])
      |(?P<space>\s+)
      |(?P<other>.)""",
    re.VERBOSE,
)


def _tokens(expr: str) -> list[tuple[str, str]]:
    return [(m.lastgroup or "", m.group()) for m in TOKEN.finditer(expr) if m.lastgroup != "space"]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    tokens = _tokens(expr)
    names: set[str] = set()
    skip_depth = 0  # inside {...} or [...], or a label list's (...)
    skip_closers: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "open" and (text in "{[" or skip_depth):
            skip_depth += 1
            skip_closers.append(text)
        elif kind == "close" and skip_depth:
            skip_depth -= 1
            skip_closers.pop()
        elif skip_depth or kind != "ident":
            pass
        elif text.lower() in LABEL_LISTS:
            if nxt == "(":  # the label list that follows
                skip_depth += 1
                skip_closers.append("(")
                i += 1
        elif text.lower() in KEYWORDS or nxt == "(" or (text in AGGREGATIONS and nxt in LABEL_LISTS):
            pass  # a keyword, a function, or an aggregation written `sum by (x) (...)`
        else:
            names.add(text)
        i += 1
    return names


def test_the_tokenizer_finds_the_metric_names_and_nothing_else() -> None:
    cases = {
        'histogram_quantile(0.9, sum by (le, role) (rate(a_bucket{x="y}{[(b)]", z=~"$v"}[5m])))': {
            "a_bucket"
        },
        "sum(rate(a_total[$__rate_interval])) by (code) / ignoring(code) group_left(role) b": {
            "a_total",
            "b",
        },
        "a offset 5m and on(x) b unless c > bool 3 or vllm:num_requests_waiting": {
            "a",
            "b",
            "c",
            "vllm:num_requests_waiting",
        },
        "count by (role) (count by (role, group) (x{r=~'.+'})) * 1e3 + Inf - NaN": {"x"},
        "max without (rank) (y) / on() group_right z[1h:5m]": {"y", "z"},
        "topk by (role) (3, w)": {"w"},
    }
    for expr, want in cases.items():
        assert metric_names(expr) == want, expr


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out += [panel, *panel.get("panels", [])]
    return [p for p in out if p["type"] != "row"]


LABEL_VALUES = re.compile(r"^label_values\((?P<expr>.+),\s*(?P<label>[A-Za-z_]\w*)\s*\)$")


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panels' targets, and the selector of each label_values() variable."""
    out = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            found = LABEL_VALUES.match(var["query"]["query"])
            assert found, f"variable {var['name']}: not label_values(SELECTOR, LABEL)"
            assert var["definition"] == var["query"]["query"]
            out.append(found["expr"])
    return out


def exported() -> set[str]:
    """Every series name the code exports (counters' _total, histograms' _bucket/_sum/_count)."""
    every = [*read_catalog(catalog_json()).metrics, *operator_metrics()]
    return {name for m in every for name in m.series()}


def test_every_query_names_a_metric_the_code_exports() -> None:
    names = exported()
    assert "kubemoe_gpu_utilization_ratio" in names
    assert "kubemoe_operator_autoscale_decisions_total" in names
    used: set[str] = set()
    for expr in queries(_dashboard()):
        found = metric_names(expr)
        assert found, f"no metric in {expr!r}"
        assert found <= names, f"{sorted(found - names)} in {expr!r}: not exported by the code"
        used |= found
    assert len(used) >= 20


def test_the_panels_the_issue_lists() -> None:
    used = set().union(*(metric_names(q) for q in queries(_dashboard())))
    for name in (
        "kubemoe_requests_finished_total",  # requests
        "kubemoe_router_requests_total",
        "kubemoe_time_to_first_token_seconds_bucket",  # TTFT / ITL
        "kubemoe_inter_token_latency_seconds_bucket",
        "kubemoe_generation_tokens_total",  # tokens/s per role
        "kubemoe_prompt_tokens_total",
        "kubemoe_kv_cache_usage_ratio",  # KV usage
        "kubemoe_requests_waiting",  # queue
        "kubemoe_operator_autoscale_desired_replicas",  # groups desired
        "kubemoe_operator_autoscale_decisions_total",  # autoscaler decisions
        "kubemoe_gpu_utilization_ratio",  # GPU utilisation
        "kubemoe_expert_load_imbalance_max",  # expert imbalance
    ):
        assert name in used, name


def test_each_panel_selects_one_deployment_of_one_namespace() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "deployment", "role"} <= set(variables)
    assert variables["role"]["multi"] is True
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'namespace="$namespace"' in expr, (panel["title"], expr)
            router = 'pod=~"$deployment-router-' in expr
            assert router or 'deployment="$deployment"' in expr, (panel["title"], expr)


def _cells(panel: dict[str, Any]) -> set[tuple[int, int]]:
    g = panel["gridPos"]
    return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}


def test_no_two_panels_overlap_and_all_fit_the_grid() -> None:
    seen: set[tuple[int, int]] = set()
    for panel in _dashboard()["panels"]:
        cells = _cells(panel)
        assert not cells & seen, panel["title"]
        assert all(0 <= x < 24 for x, _ in cells), panel["title"]
        seen |= cells


@pytest.mark.skipif(not PROMTOOL.exists(), reason="no cached promtool (`make prometheus` caches one)")
def test_promtool_parses_every_query(tmp_path: Path) -> None:
    """Grafana's variables stand in as values: $__rate_interval a duration, the rest inside strings."""
    rules = []
    for i, expr in enumerate(queries(_dashboard())):
        concrete = expr.replace("$__rate_interval", "5m")
        rules.append({"record": f"kubemoe:dashboard_query_{i}", "expr": concrete})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout
