"""`kubemoe completion bash|zsh` and `kubectl moe completion` (#20): the generated scripts, loaded into a
real bash (and zsh, where installed) and asked what they complete, as the shell asks on Tab."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kubemoe_operator.cli import kubectl_moe, kubemoe
from kubemoe_operator.cli.completion import script

BASH = shutil.which("bash")
ZSH = shutil.which("zsh")


def _script(tmp_path: Path, command: str, shell: str = "bash") -> Path:
    module = kubemoe if command == "kubemoe" else kubectl_moe
    path = tmp_path / f"{command}.{shell}"
    path.write_text(script(shell, module.parser(), command=command, hooks=module.COMPLETION_HOOKS))
    return path


def complete(tmp_path: Path, command: str, line: str, *, env: dict[str, str] | None = None) -> list[str]:
    """What bash offers for `line` (the cursor at its end; a trailing space starts a new word)."""
    assert BASH is not None
    words = line.split() + ([""] if line.endswith(" ") else [])
    function = "_" + command.replace("-", "_") + "_complete"
    program = (
        f"source {_script(tmp_path, command)}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        f'{function}; printf "%s\\n" "${{COMPREPLY[@]}}"\n'
    )
    out = subprocess.run(
        [BASH, "--norc", "-c", program], capture_output=True, text=True, cwd=tmp_path, env=env, check=True
    ).stdout
    return sorted(w for w in out.splitlines() if w)


pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def test_subcommands_and_root_flags(tmp_path: Path) -> None:
    assert complete(tmp_path, "kubemoe", "kubemoe ") == sorted(
        ["plan", "crd", "up", "down", "status", "completion"]
    )
    assert complete(tmp_path, "kubemoe", "kubemoe --v") == ["--version"]
    assert complete(tmp_path, "kubectl-moe", "kubectl-moe l") == ["list", "logs"]


def test_flags_and_their_choices(tmp_path: Path) -> None:
    assert complete(tmp_path, "kubemoe", "kubemoe plan -o ") == ["json", "table", "yaml"]
    assert complete(tmp_path, "kubemoe", "kubemoe up --d") == ["--detach"]
    assert complete(tmp_path, "kubemoe", "kubemoe completion ") == ["bash", "zsh"]
    assert complete(tmp_path, "kubectl-moe", "kubectl-moe logs ds --role ") == [
        "decode",
        "prefill",
        "router",
        "worker",
    ]
    assert complete(tmp_path, "kubectl-moe", "kubectl-moe list -") == sorted(
        [
            "-h",
            "--help",
            "-n",
            "--namespace",
            "--context",
            "--kubeconfig",
            "-A",
            "--all-namespaces",
            "-o",
            "--output",
        ]
    )
    assert complete(tmp_path, "kubectl-moe", "kubectl-moe status x -o ") == ["json", "table", "yaml"]


def test_files_where_a_file_is_wanted(tmp_path: Path) -> None:
    (tmp_path / "tiny-moe.yaml").write_text("")
    (tmp_path / "tiny-other.yaml").write_text("")
    assert complete(tmp_path, "kubemoe", "kubemoe plan tiny") == ["tiny-moe.yaml", "tiny-other.yaml"]
    assert complete(tmp_path, "kubemoe", "kubemoe up --model tiny-m") == ["tiny-moe.yaml"]


def test_local_run_names_for_down(tmp_path: Path) -> None:
    (tmp_path / ".run" / "up" / "tiny-moe").mkdir(parents=True)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "XDG_STATE_HOME": ""}
    assert complete(tmp_path, "kubemoe", "kubemoe down ", env=env) == ["tiny-moe"]


def test_run_names_from_the_per_user_index_in_any_directory(tmp_path: Path) -> None:
    # `kubemoe down NAME` finds a run from any directory through the index (local/state.py): so does Tab.
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    (state / "kubemoe" / "up").mkdir(parents=True)
    (state / "kubemoe" / "up" / "big-moe").symlink_to(tmp_path / "runs" / "big-moe")
    (state / "kubemoe" / "up" / ".big-moe.lock").write_text("")
    (elsewhere / ".run" / "up" / "big-moe").mkdir(parents=True)
    (elsewhere / ".run" / "up" / "tiny-moe").mkdir(parents=True)
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    assert complete(elsewhere, "kubemoe", "kubemoe down ", env=env) == ["big-moe", "tiny-moe"]
    assert complete(elsewhere, "kubemoe", "kubemoe status b", env=env) == ["big-moe"]
    home = {**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": "relative/ignored"}
    (tmp_path / ".local").mkdir()
    (tmp_path / ".local" / "state").symlink_to(state)
    (tmp_path / "runs").mkdir()
    assert complete(tmp_path / "runs", "kubemoe", "kubemoe down ", env=home) == ["big-moe"]


def test_deployment_names_from_the_cluster_in_the_namespace_given(tmp_path: Path) -> None:
    # A stand-in kubectl that logs its argv and lists two names.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "kubectl.log"
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "tiny-moe ds-v3"\n')
    kubectl.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    assert complete(tmp_path, "kubectl-moe", "kubectl-moe logs -n prod ", env=env) == ["ds-v3", "tiny-moe"]
    assert "get modeldeployments.kubemoe.io --namespace prod" in log.read_text()


def test_the_command_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert kubemoe.main(["completion", "bash"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("complete -o filenames -F _kubemoe_complete kubemoe")
    assert kubectl_moe.main(["completion", "zsh"]) == 0
    out = capsys.readouterr().out
    assert "bashcompinit" in out
    assert "complete -o filenames -F _kubectl_moe_complete kubectl-moe" in out


@pytest.mark.skipif(ZSH is None, reason="needs zsh")
def test_zsh_runs_the_same_function(tmp_path: Path) -> None:
    """zsh calls the function through bashcompinit's compgen -F (with ksh arrays, as bash indexes them);
    compgen -W does not filter there (zsh's matcher does, afterwards), so every subcommand comes back."""
    assert ZSH is not None
    program = (
        f"source {_script(tmp_path, 'kubemoe', 'zsh')}\n"
        "words=(kubemoe plan -o ''); CURRENT=4\n"
        'COMP_WORDS=("${words[@]}"); COMP_CWORD=$((CURRENT - 1))\n'
        "compgen -F _kubemoe_complete -- ''\n"
    )
    env = {**os.environ, "HOME": str(tmp_path)}  # no user's .zshrc, compinit's dump goes here
    result = subprocess.run([ZSH, "-f", "-c", program], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["json", "table", "yaml"]


def test_installed_entry_points_complete(tmp_path: Path) -> None:
    """The console scripts print it too (what a user puts in ~/.bashrc)."""
    exe = Path(sys.executable).parent / "kubectl-moe"
    if not exe.is_file():
        pytest.skip("kubectl-moe is not installed next to this interpreter")
    out = subprocess.run([exe, "completion", "bash"], capture_output=True, text=True, check=True).stdout
    assert out == script(
        "bash", kubectl_moe.parser(), command="kubectl-moe", hooks=kubectl_moe.COMPLETION_HOOKS
    )
