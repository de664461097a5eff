"""Leader election: when a Lease is free to take."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubemoe_operator.kube.leader import lease_free_for

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.parametrize(
    ("spec", "free"),
    [
        ({}, True),
        ({"holderIdentity": "me", "renewTime": _ts(T0), "leaseDurationSeconds": 15}, True),
        ({"holderIdentity": "other", "renewTime": _ts(T0), "leaseDurationSeconds": 15}, False),
        (
            {
                "holderIdentity": "other",
                "renewTime": _ts(T0 - timedelta(seconds=16)),
                "leaseDurationSeconds": 15,
            },
            True,
        ),
    ],
)
def test_lease_is_free_when_unheld_mine_or_expired(spec: dict[str, object], free: bool) -> None:
    assert lease_free_for(spec, identity="me", now=T0) is free
