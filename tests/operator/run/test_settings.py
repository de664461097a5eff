"""The operator's settings, from its flags."""

from __future__ import annotations

import pytest

from kubemoe_operator.run.settings import parse_settings


def test_settings_from_flags() -> None:
    settings, verbose = parse_settings(
        ["-n", "a", "-n", "b", "--resync-seconds", "5", "--no-leader-election"]
    )
    assert settings.namespaces == ("a", "b")
    assert not settings.clusterwide
    assert settings.resync_seconds == 5
    assert settings.field_manager == "kubemoe-operator"
    assert not settings.leader_election
    assert settings.identity
    assert not verbose


def test_pod_monitor_labels_are_checked_and_may_not_be_kubemoes(capsys: pytest.CaptureFixture[str]) -> None:
    settings, _ = parse_settings(["--pod-monitor-label", "release=prom", "--pod-monitor-label", "team=ml"])
    assert settings.pod_monitor_labels == {"release": "prom", "team": "ml"}
    for bad, named in [
        ("kubemoe.io/deployment=x", "--pod-monitor-label[kubemoe.io/deployment]: "),
        ("release=not a value", "--pod-monitor-label.labels[release]: "),
        ("release", "--pod-monitor-label 'release': write KEY=VALUE"),
    ]:
        with pytest.raises(SystemExit):
            parse_settings(["--pod-monitor-label", bad])
        assert named in capsys.readouterr().err
