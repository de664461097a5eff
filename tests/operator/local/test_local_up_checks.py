"""What `kubemoe up` refuses, or makes sure of, before it starts anything: the router's port, the engine,
the accelerators a plan needs (each pod's own range: a pure function of the plan), and the checkpoint
(generated whole or not at all; a folder without weights is not one, and the error says what to do)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.cli.kubemoe import main
from kubemoe_operator.local.devices import (
    DeviceShortageError,
    amd_gpu_count,
    device_ranges,
    machine_devices,
)
from kubemoe_operator.local.layout import LOOPBACK, local_processes
from kubemoe_operator.local.model import ModelSourceError, checkpoint_problem, ensure_model
from kubemoe_operator.local.start import runtime_command
from kubemoe_operator.local.state import LocalRunError
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.local.terminal import sigint_as_from_a_terminal

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "examples" / "tiny-moe.yaml"
UP = [sys.executable, "-m", "kubemoe_operator.cli.kubemoe", "up"]


def _plan(name: str, **accelerator: object) -> Plan:
    doc = yaml.safe_load((REPO / "examples" / name).read_text())
    doc["spec"]["accelerator"].update(accelerator)
    for role in doc["spec"]["roles"].values():
        role.pop("autoscaling", None)  # (GPU-utilization scaling is NVIDIA's only: not what this is about)
    return plan_manifest(parse_manifest(doc))


# --- --port ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["0", "-1", "65536", "70000", "http"])
def test_a_port_outside_1_to_65535_is_refused_naming_port(
    port: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--port 0 waited out the whole 600 s timeout (readiness probed port 0); 70000 and -1 failed later
    with an unnamed bind error."""
    with pytest.raises(SystemExit) as exit_:
        main(["up", str(TINY), "--port", port, "--run-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kubemoe up: error: argument --port: ")
    assert err.endswith("give one in 1-65535")
    assert not (tmp_path / "run").exists()


# --- the engine -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manifest", "kind"), [("sglang-qwen3-30b.yaml", "sglang"), ("tgi-mixtral-8x7b.yaml", "tgi")]
)
def test_an_engine_up_cannot_run_is_refused_before_planning(
    manifest: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sglang and tgi pods run their engine's own launcher: `kubemoe up` swapped their command[0] for
    kubemoe-runtime and every process died ("invalid choice: 'sglang.launch_server'")."""
    model = tmp_path / "model"
    code = main(["up", str(REPO / "examples" / "engines" / manifest), "--model", str(model)])
    assert code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"kubemoe up: spec.engine.kind is {kind}: kubemoe up runs the vllm and torch")
    assert "set spec.engine.kind to vllm or torch, or deploy the manifest to a cluster" in line
    assert not model.exists()  # refused before the model, the plan or any process


# --- accelerators ---------------------------------------------------------------------------------


def _disjoint_and_whole(ranges: dict[tuple[str, int, int], list[str]], available: list[str]) -> None:
    given = [d for devices in ranges.values() for d in devices]
    assert len(given) == len(set(given))
    assert sorted(given, key=available.index) == available[: len(given)]


def test_each_pod_gets_a_disjoint_device_range_in_plan_order() -> None:
    mixtral = plan_manifest(load_manifest(REPO / "examples" / "mixtral-8x7b.yaml"))  # W2x(TP4), L40S
    ids = [str(i) for i in range(8)]
    assert device_ranges(mixtral, ids) == {
        ("worker", 0, 0): ["0", "1", "2", "3"],
        ("worker", 1, 0): ["4", "5", "6", "7"],
    }
    # Two-pod groups (LeaderWorkerSet): P1x(EP16) D1x(EP16) over 8-GPU pods, 32 GPUs.
    deepseek = plan_manifest(load_manifest(REPO / "examples" / "deepseek-v3.yaml"))
    ids = [str(i) for i in range(32)]
    ranges = device_ranges(deepseek, ids)
    assert list(ranges) == [("prefill", 0, 0), ("prefill", 0, 1), ("decode", 0, 0), ("decode", 0, 1)]
    assert ranges[("decode", 0, 1)] == [str(i) for i in range(24, 32)]
    _disjoint_and_whole(ranges, ids)
    # The devices the user lists (CUDA_VISIBLE_DEVICES), in their order.
    listed = ["7", "3", "5", "1", "6", "2", "4", "0"]
    assert device_ranges(mixtral, listed)[("worker", 1, 0)] == ["6", "2", "4", "0"]


def test_a_plan_needing_more_accelerators_than_there_are_is_refused() -> None:
    mixtral = plan_manifest(load_manifest(REPO / "examples" / "mixtral-8x7b.yaml"))
    with pytest.raises(DeviceShortageError) as err:
        device_ranges(mixtral, ["0", "1", "2", "3", "4", "5"], source="nvidia-smi -L")
    assert str(err.value) == (
        "the plan needs 8 nvidia.com/gpu devices (worker 2x4: groups x devices per group) and this machine"
        " has 6 (nvidia-smi -L); lower spec.roles.<role>.replicas or parallelism (or accelerator.perPod)"
        " to fit, or run it on a cluster"
    )


def test_cpu_plans_take_no_devices_and_amd_gets_hip_and_cuda_visible_devices(tmp_path: Path) -> None:
    tiny = plan_manifest(load_manifest(TINY))
    assert device_ranges(tiny, []) == {}
    assert machine_devices(None, {"CUDA_VISIBLE_DEVICES": "0"}) == ([], "")
    processes = local_processes(
        tiny, model=tmp_path, runtime="rt", router_port=8000, kv_dir=tmp_path, devices={}, base_env={}
    )
    assert not any("CUDA_VISIBLE_DEVICES" in p.env or "HIP_VISIBLE_DEVICES" in p.env for p in processes)

    mi300x = _plan("mixtral-8x7b.yaml", type="MI300X")  # W2x(TP4) on AMD
    assert mi300x.resource == "amd.com/gpu"
    listed = "0,1,2,3,4,5,6,7"
    available, source = machine_devices(mi300x.resource, {"HIP_VISIBLE_DEVICES": listed})
    assert (available, source) == (listed.split(","), f"HIP_VISIBLE_DEVICES={listed}")
    ranges = device_ranges(mi300x, available)
    processes = local_processes(
        mi300x, model=tmp_path, runtime="rt", router_port=8000, kv_dir=tmp_path, devices=ranges, base_env={}
    )
    # vLLM's ROCm platform asserts CUDA_VISIBLE_DEVICES == HIP_VISIBLE_DEVICES when both are set: each
    # engine gets both (not the user's CUDA_VISIBLE_DEVICES, which base_env carries)
    processes = local_processes(
        mi300x,
        model=tmp_path,
        runtime="rt",
        router_port=8000,
        kv_dir=tmp_path,
        devices=ranges,
        base_env={"CUDA_VISIBLE_DEVICES": listed},
    )
    assert [
        (p.name, p.env.get("HIP_VISIBLE_DEVICES"), p.env.get("CUDA_VISIBLE_DEVICES"))
        for p in processes
        if p.role != "router"
    ] == [("worker-g0-p0", "0,1,2,3", "0,1,2,3"), ("worker-g1-p0", "4,5,6,7", "4,5,6,7")]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, (["0", "1", "2", "3"], "CUDA_VISIBLE_DEVICES=0,1,2,3")),
        (
            {"HIP_VISIBLE_DEVICES": "2,3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
            (["2", "3"], "HIP_VISIBLE_DEVICES=2,3"),
        ),
        # ROCR narrows what HIP sees (each pod keeps it): the pods get positions in it
        ({"ROCR_VISIBLE_DEVICES": "4,5,6"}, (["0", "1", "2"], "ROCR_VISIBLE_DEVICES=4,5,6")),
        ({"ROCR_VISIBLE_DEVICES": "4,5", "CUDA_VISIBLE_DEVICES": "1"}, (["1"], "CUDA_VISIBLE_DEVICES=1")),
    ],
)
def test_amd_devices_are_the_ones_the_users_environment_lists(
    environ: dict[str, str], expected: tuple[list[str], str]
) -> None:
    assert machine_devices("amd.com/gpu", environ) == expected


def test_amd_gpus_are_the_kfd_topologys_gpu_nodes(tmp_path: Path) -> None:
    kfd, nodes = tmp_path / "kfd", tmp_path / "nodes"
    for node, gfx in [("0", 0), ("1", 90402), ("2", 90402)]:  # a CPU node, then two MI300X
        (nodes / node).mkdir(parents=True)
        (nodes / node / "properties").write_text(
            f"cpu_cores_count 0\ngfx_target_version {gfx}\nvendor_id 4098\n"
        )
    assert amd_gpu_count(kfd, nodes) == 0  # no /dev/kfd: no ROCm driver
    kfd.touch()
    assert amd_gpu_count(kfd, nodes) == 2


def test_kubemoe_up_refuses_a_gpu_plan_this_machine_cannot_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    mixtral = REPO / "examples" / "mixtral-8x7b.yaml"  # 8 GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert main(["up", str(mixtral), "--model", str(model), "--run-dir", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("kubemoe up: the plan needs 8 nvidia.com/gpu devices (worker 2x4")
    assert "this machine has 1 (CUDA_VISIBLE_DEVICES=0)" in line
    assert not (tmp_path / "run").exists()  # nothing started


# --- the checkpoint -------------------------------------------------------------------------------


@pytest.fixture
def runtime() -> str:
    try:
        return runtime_command()
    except LocalRunError as missing:
        pytest.skip(str(missing))


def _tiny_manifest(tmp_path: Path, model: Path, *, name: str | None = None) -> Path:
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["model"]["source"] = f"file://{model}"
    if name is not None:
        doc["spec"]["model"]["name"] = name
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_an_interrupted_generation_leaves_no_checkpoint(runtime: str, tmp_path: Path) -> None:
    """Ctrl-C while the tiny checkpoint was being written left a folder with config.json and some of the
    weights, which every later `kubemoe up` took for the checkpoint. It is written beside its place
    and renamed into place when whole: interrupted, nothing is there, and the next run generates it."""
    models = tmp_path / "models"
    model = models / "tiny-qwen3-moe"
    manifest = _tiny_manifest(tmp_path, model)
    up = subprocess.Popen(
        [*UP, str(manifest), "-d"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=sigint_as_from_a_terminal,  # noqa: PLW1509 (only this runs before exec)
    )
    try:
        deadline = time.monotonic() + 120
        while not list(models.rglob("tokenizer.json")):  # the generator's first file: it is under way
            assert up.poll() is None, up.communicate()
            assert time.monotonic() < deadline, "the generator wrote nothing in 120 s"
            time.sleep(0.01)
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C, as a terminal sends it: to kubemoe and the generator
        out, err = up.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)
        if up.returncode == 0:  # not stopped after all: the run it started must not outlive the test
            down = [sys.executable, "-m", "kubemoe_operator.cli.kubemoe", "down"]
            subprocess.run(down, cwd=tmp_path, capture_output=True, timeout=120, check=False)
    assert up.returncode == 130, err
    assert out == ""
    assert f"generating the tiny random checkpoint tiny-qwen3-moe at {model} ..." in err
    assert list(models.iterdir()) == []  # neither a half checkpoint nor the folder it was written to

    # The next run generates it whole (and stops at the taken port, after generating and planning).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        again = subprocess.run(
            [*UP, str(manifest), "-d", "--port", str(taken.getsockname()[1])],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert again.returncode == 1, again.stderr
    assert "is taken; pick another with --port" in again.stderr
    assert checkpoint_problem(model) is None  # config.json, and every shard its index names
    assert list(model.glob("*.safetensors"))
    assert [p.name for p in models.iterdir()] == ["tiny-qwen3-moe"]


def test_a_folder_without_weights_is_not_a_checkpoint(
    runtime: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What an interrupted generation or copy leaves (config.json, no weights): planned and started as if
    it were the checkpoint, the engines then failed on it, each time."""
    model = tmp_path / "models" / "tiny-qwen3-moe"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    manifest = _tiny_manifest(tmp_path, model)
    assert main(["up", str(manifest), "--run-dir", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"kubemoe up: spec.model.source: {model} is not a checkpoint (config.json but no weights"
        f" (*.safetensors or *.bin) there); remove it (rm -r {model}) and run kubemoe up again to generate"
        " it anew"
    )
    assert not (tmp_path / "run").exists()


def test_a_missing_checkpoint_that_is_not_the_tiny_one_names_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed "generating the tiny random checkpoint ..." and then that there was no checkpoint."""
    missing = tmp_path / "models" / "my-moe"
    manifest = _tiny_manifest(tmp_path, missing, name="my-moe")
    assert main(["up", str(manifest), "--run-dir", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"kubemoe up: spec.model.source: {missing} is not a checkpoint (nothing there); point"
        " spec.model.source at a Hugging Face checkpoint folder (config.json and *.safetensors)"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("")
    assert main(["up", str(manifest), "--model", str(elsewhere), "--run-dir", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"kubemoe up: --model: {elsewhere} is not a checkpoint (no config.json there);")
    assert line.endswith(
        "point --model at a Hugging Face checkpoint folder (config.json and *.safetensors), or remove that"
        " folder if a copy or download was cut short"
    )
    with pytest.raises(ModelSourceError, match="is not a checkpoint"):
        ensure_model(missing, model_name="my-moe", architecture="Qwen3MoeForCausalLM", runtime="rt")
