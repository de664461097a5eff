"""The router's API keys as the operator hands them over (spec.router.apiKeySecret): a Secret volume, whose
file the kubelet replaces by swapping a `..data` symlink, read again on the next request; without a key a
request is a 401 in OpenAI's shape, while /health, /ready and /metrics stay open."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from kubemoe_runtime.router.app import build_router_app
from kubemoe_runtime.router.auth import ApiKeys
from kubemoe_runtime.router.main import RouterSettings, build


def secret_volume(root: Path, keys: str, *, version: int) -> None:
    """What the kubelet's AtomicWriter does: the files in a new directory, `..data` swapped to it."""
    data = root / f"..v{version}"
    data.mkdir()
    (data / "api-key").write_text(keys)
    link = root / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, root / "..data")
    if not (root / "api-key").is_symlink():
        (root / "api-key").symlink_to("..data/api-key")


def test_a_swapped_secret_volume_rotates_the_keys(tmp_path: Path) -> None:
    secret_volume(tmp_path, "old-key\n", version=1)
    keys = ApiKeys(tmp_path / "api-key")
    assert keys.allows("Bearer old-key")
    secret_volume(tmp_path, "new-key-1\nnew-key-2\n", version=2)
    assert keys.allows("Bearer new-key-2")
    assert not keys.allows("Bearer old-key")


def test_a_key_file_that_is_not_utf8_keeps_the_keys_last_read(tmp_path: Path) -> None:
    """A Secret updated with bytes that are not UTF-8: the keys read before stay, not a 500 on every
    request; at start-up the same file is refused, naming it."""
    secret_volume(tmp_path, "good-key\n", version=1)
    keys = ApiKeys(tmp_path / "api-key")
    (tmp_path / "..v2").mkdir()
    (tmp_path / "..v2" / "api-key").write_bytes(b"\xff\xfe-not-text\n")
    os.replace(tmp_path / "..data", tmp_path / "..old")
    (tmp_path / "..data").symlink_to("..v2")
    assert keys.allows("Bearer good-key")
    assert not keys.allows("Bearer \xff")
    with pytest.raises(ValueError, match=r"api-key is not UTF-8 text .*write one key a line"):
        ApiKeys(tmp_path / "api-key")


def test_without_a_key_only_the_probes_and_metrics_answer(tmp_path: Path) -> None:
    secret_volume(tmp_path, "k1\n", version=1)
    settings = RouterSettings(
        served_model_names=("m",),
        host="127.0.0.1",
        port=0,
        policy="round-robin",
        services={"worker": ("127.0.0.1:9",)},
        api_key_file=tmp_path / "api-key",
        refresh_interval=60,
        health_interval=60,
        max_attempts=1,
    )
    app = build_router_app(build(settings, environ={}))
    with TestClient(app) as http:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "k1"}):
            response = http.post("/v1/completions", json={"prompt": "p"}, headers=headers)
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key"
            assert set(error) == {"message", "type", "param", "code"}
            assert http.get("/v1/models", headers=headers).status_code == 401
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 503  # open, and honest: no backend answers
        assert http.get("/metrics").status_code == 200
        models = http.get("/v1/models", headers={"authorization": "Bearer k1"})
        assert models.status_code == 200
