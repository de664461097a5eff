"""`python -m e2e.cluster up|env|down` as a user runs it: prints where to look, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from e2e.cluster import build, kwok

NAME = "kubemoe-lifecycle"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "e2e.cluster", "--name", NAME, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _live_processes_mentioning(text: str) -> list[str]:
    """Command lines of live (not zombie) processes that mention text."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if state != "Z" and text in cmdline and int(proc.name) != os.getpid():
            found.append(cmdline)
    return found


def test_up_env_down_leaves_no_stray_process() -> None:
    build.ensure_built()
    root = kwok.cluster_dir(NAME)
    try:
        up = _cli("up", "--nodes", "2", "--gpus-per-node", "4", "--gpu-product", "NVIDIA-A100-SXM4-80GB")
        assert up.returncode == 0, up.stderr
        assert f"kubeconfig: {kwok.kubeconfig_path(NAME)}" in up.stdout
        assert "LeaderWorkerSet controller and webhooks ready" in up.stderr

        env = _cli("env")
        assert env.returncode == 0, env.stderr
        assert f"export KUBECONFIG={kwok.kubeconfig_path(NAME)}" in env.stdout

        handle = kwok.existing(NAME)
        assert handle is not None
        gpus = handle.kubectl(
            "get", "nodes", "-o", r"jsonpath={.items[*].status.capacity.nvidia\.com/gpu}"
        ).stdout
        assert gpus.split() == ["4", "4"]
        # Every component runs from the cluster's own directory: that is how we find them again.
        assert len(_live_processes_mentioning(str(root))) >= 5
    finally:
        down = _cli("down")
    assert down.returncode == 0, down.stderr
    assert not root.exists()
    assert _live_processes_mentioning(str(root)) == []
    assert _cli("env").returncode == 1
