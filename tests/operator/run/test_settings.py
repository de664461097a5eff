"""The operator's settings, from its flags."""

from __future__ import annotations

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
