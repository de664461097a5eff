"""The README's troubleshooting table documents every condition reason the operator sets, and its
install command sets every image a cluster pulls."""

from __future__ import annotations

from pathlib import Path

from kubemoe_operator.autoscale import loop
from kubemoe_operator.reconcile import cluster_rules, status
from kubemoe_operator.run.settings import DEFAULT_IMAGE

README = Path(__file__).resolve().parents[3] / "README.md"


def test_every_condition_reason_is_in_the_troubleshooting_table() -> None:
    text = README.read_text()
    table = text[text.index("## Troubleshooting") :]
    reasons = {
        v
        for module in (status, loop, cluster_rules)
        for k, v in vars(module).items()
        if k.startswith("REASON_") and isinstance(v, str)
    }
    assert reasons
    missing = sorted(r for r in reasons if f"`{r}`" not in table)
    assert not missing, f"document these reasons in README.md's troubleshooting table: {missing}"


def test_the_install_command_sets_the_operator_and_runtime_images() -> None:
    """Left at its default, runtimeImage names an image no registry serves (DEFAULT_IMAGE)."""
    text = README.read_text()
    section = text[text.index("## Install on a cluster") : text.index("## Walk-through")]
    install = section[section.index("helm install") :]
    install = install[: install.index("```")]
    assert "--set image.repository=$REGISTRY/kubemoe-operator" in install
    assert "--set runtimeImage=$REGISTRY/kubemoe-runtime:" in install
    assert DEFAULT_IMAGE.split(":")[0] not in install
