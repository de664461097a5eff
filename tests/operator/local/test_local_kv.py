"""RUN_DIR/kv, vLLM's example connector's shared KV directory, lasts one run only: the connector names a
prompt's KV folder by a hash of its token ids alone and loads it whenever it is there, so what one run
saved answered a later run's repeated prompts (another checkpoint with the same tokenizer and shapes,
under the same name: the old model's KV, silently), and the directory grew from run to run. It is
emptied as a run starts and removed when it stops; only what is inside RUN_DIR/kv goes (a symlink is
removed, never followed). `kubemoe up`/`down` themselves: test_local_up_runs.py."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from kubemoe_operator.local.start import fresh_kv
from kubemoe_operator.local.state import STATE_FILE, LocalRunError, RunState, start_lock
from kubemoe_operator.local.stop import remove_kv, stop_run


def _outside(tmp_path: Path) -> Path:
    """A directory outside the run dir with a file in it, which nothing may touch."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.safetensors").write_text("not the run's")
    return outside


def _untouched(outside: Path) -> bool:
    return (outside / "keep.safetensors").read_text() == "not the run's"


def test_an_earlier_runs_kv_is_gone_and_the_directory_empty(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stale = run_dir / "kv" / "9f86d081884c7d65"  # a prompt's folder: a layer's KV per file
    stale.mkdir(parents=True)
    (stale / "model.layers.0.self_attn.attn.safetensors").write_bytes(b"the old model's KV")
    kv = fresh_kv(run_dir)
    assert kv == run_dir / "kv"
    assert kv.is_dir()
    assert not kv.is_symlink()
    assert list(kv.iterdir()) == []


def test_a_missing_kv_directory_is_made(tmp_path: Path) -> None:
    assert list(fresh_kv(tmp_path).iterdir()) == []
    remove_kv(tmp_path)
    assert not (tmp_path / "kv").exists()
    remove_kv(tmp_path)  # nothing there: nothing to do


def test_a_kv_symlink_out_of_the_run_dir_is_removed_not_followed(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "kv").symlink_to(outside, target_is_directory=True)
    kv = fresh_kv(run_dir)
    assert kv.is_dir()
    assert not kv.is_symlink()
    assert list(kv.iterdir()) == []
    assert _untouched(outside)


def test_symlinks_inside_kv_are_removed_not_followed(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    kv = tmp_path / "run" / "kv"
    (kv / "prompt").mkdir(parents=True)
    (kv / "prompt" / "to-a-dir").symlink_to(outside, target_is_directory=True)
    (kv / "to-a-file").symlink_to(outside / "keep.safetensors")
    (kv / "dangling").symlink_to(tmp_path / "nowhere")
    remove_kv(tmp_path / "run")
    assert not kv.exists()
    assert not kv.is_symlink()
    assert _untouched(outside)


def test_a_file_named_kv_is_replaced_by_the_directory(tmp_path: Path) -> None:
    (tmp_path / "kv").write_text("stray")
    assert fresh_kv(tmp_path).is_dir()


def refuse_rmtree(monkeypatch: pytest.MonkeyPatch) -> None:
    """shutil.rmtree fails as on a folder this user may not change (a mock: a real one needs root to make)."""

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)


def test_a_kv_that_cannot_be_emptied_refuses_the_run_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running on with the old KV in place would answer from it: the start stops, saying what to do."""
    (tmp_path / "kv" / "prompt").mkdir(parents=True)
    refuse_rmtree(monkeypatch)
    with pytest.raises(LocalRunError) as err:
        fresh_kv(tmp_path)
    kv = tmp_path / "kv"
    assert str(err.value) == (
        f"cannot empty {kv}, the KV an earlier run saved (Permission denied): the engines would load it"
        f" for the same prompts; remove it (rm -r {kv})"
    )


def _stopped_state(run_dir: Path) -> RunState:
    """A run whose processes are all gone (nothing to signal): stop_run only forgets it."""
    state = RunState(
        name="tiny-moe",
        model="m",
        layout="D1x(EP1)",
        mode="colocated",
        run_dir=str(run_dir),
        endpoint="http://127.0.0.1:8000/v1",
        started=time.time(),
        supervisor_pid=os.getpid(),
        processes=[],
    )
    state.save()
    return state


def test_stopping_a_run_removes_its_kv_not_what_a_symlink_names(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    kv = fresh_kv(run_dir)
    (kv / "prompt").mkdir()
    (kv / "prompt" / "layer.safetensors").write_bytes(b"this run's KV")
    (kv / "prompt" / "link").symlink_to(outside, target_is_directory=True)
    (run_dir / "logs").mkdir()
    assert stop_run(_stopped_state(run_dir), grace_s=0) == []
    assert not (run_dir / STATE_FILE).exists()
    assert not kv.exists()
    assert (run_dir / "logs").is_dir()  # the logs stay
    assert _untouched(outside)


def test_a_kv_that_cannot_be_removed_does_not_fail_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processes are stopped either way; the next start removes it, or refuses saying why."""
    (tmp_path / "kv" / "prompt").mkdir(parents=True)
    refuse_rmtree(monkeypatch)
    assert stop_run(_stopped_state(tmp_path), grace_s=0) == []
    assert not (tmp_path / STATE_FILE).exists()
    assert (tmp_path / "kv" / "prompt").is_dir()


def test_a_later_run_in_the_run_dir_keeps_its_kv_and_state(tmp_path: Path) -> None:
    """Once a run's processes are gone a `kubemoe up` may start in its run dir before the old run's
    `kubemoe down` forgets it: that run's kv and state.json are not the ones removed."""
    old = _stopped_state(tmp_path)
    later = old.model_copy(update={"started": old.started + 1})
    later.save()
    (fresh_kv(tmp_path) / "prompt").mkdir()  # the later run's KV
    assert stop_run(old, grace_s=0) == []
    assert (tmp_path / "kv" / "prompt").is_dir()
    assert RunState.load(tmp_path) == later


def test_a_start_holding_the_run_dirs_lock_is_left_to_replace_both(tmp_path: Path) -> None:
    """A `kubemoe up` starting in the run dir empties kv and writes state.json itself, under RUN_DIR/lock:
    the stop leaves both to it rather than remove what it is making."""
    state = _stopped_state(tmp_path)
    (fresh_kv(tmp_path) / "prompt").mkdir()
    with start_lock("another-name", tmp_path):  # RUN_DIR/lock held by another start in this directory
        assert stop_run(state, grace_s=0) == []
        assert (tmp_path / STATE_FILE).is_file()
        assert (tmp_path / "kv" / "prompt").is_dir()
    assert stop_run(state, grace_s=0) == []  # the lock free: forgotten
    assert not (tmp_path / STATE_FILE).exists()
    assert not (tmp_path / "kv").exists()
