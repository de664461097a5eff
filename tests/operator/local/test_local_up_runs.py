"""`kubemoe up | status | down` as a user runs them, with engines that serve: each stand-in
`kubemoe-runtime` is a real HTTP server on the port its command line gives (ready at once), so a run
becomes ready in about a second and every command goes through the real code, processes included.

- one run of a name at a time: a second `kubemoe up` while the first starts, or runs, is refused
  (from the same directory or another), and `down` stops the one that runs; nothing is left behind.
- `status`/`down` find a detached run from any directory (the per-user index).
- a foreground run that was ready and is then stopped by its user exits 0.
- the previous run's logs are kept (logs.prev/), a crash's evidence with them.
- each run starts with an empty KV directory (RUN_DIR/kv), and `down` removes it.
- a state.json this kubemoe cannot read is an error naming the file, its pids and the fix.
- each pod gets its own accelerators (CUDA_VISIBLE_DEVICES), from the devices the machine offers.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from kubemoe_operator.local.layout import LOOPBACK
from kubemoe_operator.local.state import STATE_FILE, index_dir
from tests.operator.local.terminal import sigint_as_from_a_terminal

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "examples" / "tiny-moe.yaml"
TINY_PROCESSES = 4  # prefill, two decode pods, router

# `kubemoe ARGS` with the stand-in runtime in place of the installed one.
DRIVER = textwrap.dedent(
    """
    import sys
    from kubemoe_operator.cli.kubemoe import main
    from kubemoe_operator.local import commands

    commands.runtime_command = lambda: sys.argv[1]
    sys.exit(main(sys.argv[2:]))
    """
)

# An engine (or router) that is ready as soon as it listens: 200 on every GET. It logs the accelerators
# it was given.
STAND_IN = """\
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port = int(sys.argv[sys.argv.index("--port") + 1])
print("CUDA_VISIBLE_DEVICES=" + os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), flush=True)


class Ok(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Ok).serve_forever()
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _processes_running(script: Path) -> list[int]:
    """Live processes whose command line names `script` (this test's stand-ins, and only them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if str(script) in (entry / "cmdline").read_text() and stat[stat.rindex(")") + 2] != "Z":
                    found.append(int(entry.name))
    return found


class Local:
    """A stand-in runtime, a checkpoint folder and a manifest, and `kubemoe` run against them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runtime = root / "bin" / "kubemoe-runtime"
        self.runtime.parent.mkdir()
        self.runtime.write_text(f"#!{sys.executable}\n{STAND_IN}")
        self.runtime.chmod(0o755)
        self.model = root / "model"
        self.model.mkdir()
        (self.model / "config.json").write_text("{}")
        (self.model / "model.safetensors").write_bytes(b"")  # the stand-ins read nothing

    def manifest(self, directory: Path, *, accelerator: str = "cpu") -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        doc = yaml.safe_load(TINY.read_text())
        if accelerator != "cpu":  # the same layout on GPUs: vLLM, one GPU per pod
            doc["spec"]["engine"]["kind"] = "vllm"
            doc["spec"]["accelerator"]["type"] = accelerator
            doc["spec"]["serving"]["kvTransfer"]["connector"] = "nixl"
            for role in doc["spec"]["roles"].values():
                role.pop("resources")
        path = directory / "tiny-moe.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def popen(self, args: list[str], *, cwd: Path, new_session: bool = False) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(self.runtime), *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,
            preexec_fn=sigint_as_from_a_terminal,  # noqa: PLW1509 (only this runs before exec)
        )

    def kubemoe(self, args: list[str], *, cwd: Path) -> subprocess.CompletedProcess[str]:
        proc = self.popen(args, cwd=cwd)
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def up_detached(self, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.kubemoe(
            ["up", "tiny-moe.yaml", "-d", "--port", str(_free_port()), "--model", str(self.model), *extra],
            cwd=cwd,
        )

    def running(self) -> list[int]:
        return _processes_running(self.runtime)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    setup = Local(tmp_path)
    yield setup
    for pid in setup.running():  # whatever a failed test left
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _eventually(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- one run of a name, found from anywhere --------------------------------------------------------


def test_status_and_down_find_a_detached_run_from_another_directory(local: Local, tmp_path: Path) -> None:
    """State lived in the working directory's .run/up/: from anywhere else `status` and `down` found
    nothing, and a second `kubemoe up` started a duplicate nobody could find."""
    a, b = tmp_path / "a", tmp_path / "b"
    local.manifest(a)
    local.manifest(b)
    up = local.up_detached(a)
    assert up.returncode == 0, up.stderr
    assert len(local.running()) == TINY_PROCESSES

    status = local.kubemoe(["status", "-o", "json"], cwd=b)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["name"] == "tiny-moe"
    assert shown["runDir"] == str(a / ".run" / "up" / "tiny-moe")  # the run dir stays where it was
    assert shown["ready"] is True
    assert local.kubemoe(["status", "tiny-moe"], cwd=b).returncode == 0

    again = local.up_detached(b)
    assert again.returncode == 1
    assert (
        f"kubemoe up: tiny-moe is already running (run dir {a / '.run' / 'up' / 'tiny-moe'}):"
        " `kubemoe status tiny-moe` shows it, `kubemoe down tiny-moe` stops it"
    ) in again.stderr
    assert not (b / ".run" / "up" / "tiny-moe" / STATE_FILE).exists()
    assert len(local.running()) == TINY_PROCESSES  # nothing more started

    down = local.kubemoe(["down", "tiny-moe"], cwd=b)
    assert down.returncode == 0, down.stderr
    assert local.running() == []
    assert not (a / ".run" / "up" / "tiny-moe" / STATE_FILE).exists()
    assert not (index_dir() / "tiny-moe").exists()  # forgotten with its processes
    gone = local.kubemoe(["status"], cwd=b)
    assert gone.returncode == 1
    assert "no local run (start one with `kubemoe up FILE`)" in gone.stderr


def test_a_second_up_while_the_first_is_starting_is_refused(local: Local, tmp_path: Path) -> None:
    """Between its checks and its state.json a `kubemoe up` holds the start lock; before, a second `up`
    of the name checked, found nothing yet, and started a second run on another port that state.json
    never recorded (`down` stopped one; the other ran on, unfindable)."""
    a, b = tmp_path / "a", tmp_path / "b"
    local.manifest(a)
    local.manifest(b)
    # Another `kubemoe up` of tiny-moe, in the middle of starting (its lock held).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from kubemoe_operator.local.state import start_lock\n"
            "with start_lock('tiny-moe', Path(sys.argv[1])):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(300)\n",
            str(a / ".run" / "up" / "tiny-moe"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert select.select([holder.stdout], [], [], 30)[0], "the lock holder did not start"
        assert holder.stdout.readline().strip() == "held"
        for cwd in (a, b):  # its own run dir, and another directory's
            refused = local.up_detached(cwd)
            assert refused.returncode == 1, refused.stderr
            assert "kubemoe up: tiny-moe is already starting: another `kubemoe up` holds" in refused.stderr
            assert refused.stdout == ""
            assert local.running() == []
    finally:
        holder.kill()
        holder.wait(timeout=10)
    started = local.up_detached(a)  # the lock went with its holder
    assert started.returncode == 0, started.stderr
    assert local.kubemoe(["down"], cwd=b).returncode == 0
    assert local.running() == []


def test_concurrent_ups_of_one_name_start_one_run(local: Local, tmp_path: Path) -> None:
    """Three `kubemoe up -d` of one name at once, from two directories: one runs, the others are refused
    (already starting, or already running), and `down` leaves nothing of any of them."""
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "a"]
    for d in dirs:
        local.manifest(d)
    with ThreadPoolExecutor(max_workers=len(dirs)) as pool:
        results = list(pool.map(local.up_detached, dirs))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1, 1], [r.stderr for r in results]
    for refused in (r for r in results if r.returncode == 1):
        assert "tiny-moe is already starting" in refused.stderr or (
            "tiny-moe is already running" in refused.stderr
        ), refused.stderr
    assert len(local.running()) == TINY_PROCESSES
    assert local.kubemoe(["down", "tiny-moe"], cwd=tmp_path).returncode == 0
    assert local.running() == []


# --- a foreground run stopped by its user ---------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_ready_foreground_run_stopped_by_its_user_exits_0(
    sig: signal.Signals, local: Local, tmp_path: Path
) -> None:
    """What the README promises: without -d, Ctrl-C (or `kill`) stops everything, and that is a success
    once it was serving. (Before it was ready it is not: test_local_processes.)"""
    local.manifest(tmp_path)
    port = _free_port()
    up = local.popen(
        ["up", "tiny-moe.yaml", "--port", str(port), "--model", str(local.model)],
        cwd=tmp_path,
        new_session=True,
    )
    try:
        assert up.stdout is not None
        assert select.select([up.stdout], [], [], 60)[0], "no endpoint within 60 s"
        assert up.stdout.readline().strip() == f"http://{LOOPBACK}:{port}/v1"
        up.send_signal(sig)
        _, err = up.communicate(timeout=60)
        assert up.returncode == 0, err
        assert "stopped tiny-moe" in err
        assert local.running() == []
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()


# --- logs and state.json --------------------------------------------------------------------------


def test_the_previous_runs_logs_are_kept(local: Local, tmp_path: Path) -> None:
    """A crashed run's logs were truncated by the next `kubemoe up` (each log opened "wb")."""
    local.manifest(tmp_path)
    logs = tmp_path / ".run" / "up" / "tiny-moe" / "logs"
    logs.mkdir(parents=True)
    (logs / "decode-g0-p1.log").write_text("Traceback: the crash to look into\n")
    up = local.up_detached(tmp_path)
    assert up.returncode == 0, up.stderr
    kept = logs.parent / "logs.prev"
    assert f"the previous run's logs are in {kept}" in up.stderr
    assert (kept / "decode-g0-p1.log").read_text() == "Traceback: the crash to look into\n"
    assert (logs / "decode-g0-p1.log").read_text().startswith("CUDA_VISIBLE_DEVICES=")  # this run's
    assert local.kubemoe(["down"], cwd=tmp_path).returncode == 0


def test_each_run_starts_with_an_empty_kv_directory_and_down_removes_it(local: Local, tmp_path: Path) -> None:
    """RUN_DIR/kv outlived its run: vLLM's example connector names a prompt's KV by its token ids alone and
    loads whatever is there, so a later run (another checkpoint, same tokenizer and shapes) answered
    repeated prompts with the earlier model's KV, and the directory grew from run to run."""
    local.manifest(tmp_path)
    run_dir = (tmp_path / ".run" / "up" / "tiny-moe").resolve()
    kv = run_dir / "kv"
    stale = kv / "9f86d081884c7d65"
    stale.mkdir(parents=True)
    (stale / "model.layers.0.self_attn.attn.safetensors").write_bytes(b"the old model's KV")
    up = local.up_detached(tmp_path)
    assert up.returncode == 0, up.stderr
    assert kv.is_dir()
    assert list(kv.iterdir()) == []
    state = json.loads((run_dir / STATE_FILE).read_text())
    paths = set()
    for p in state["processes"]:
        argv = p["process"]["argv"]
        if "--kv-transfer-config" in argv:
            config = json.loads(argv[argv.index("--kv-transfer-config") + 1])
            paths.add(config["kv_connector_extra_config"]["shared_storage_path"])
    assert paths == {str(kv)}  # the directory emptied is the one the engines use
    (kv / "0a1b2c3d").mkdir()  # what this run's prefill saves
    assert local.kubemoe(["down"], cwd=tmp_path).returncode == 0
    assert not kv.exists()
    assert (run_dir / "logs").is_dir()  # the logs stay


def test_a_state_json_of_another_version_is_an_error_naming_it_and_the_fix(
    local: Local, tmp_path: Path
) -> None:
    """An older kubemoe's state.json (another schema) stopped `up`, `down` and `status` with a raw
    pydantic error."""
    local.manifest(tmp_path)
    run_dir = tmp_path / ".run" / "up" / "tiny-moe"
    run_dir.mkdir(parents=True)
    state = run_dir / STATE_FILE
    state.write_text(json.dumps({"name": "tiny-moe", "processes": [{"pid": 4242, "argv": ["x"]}]}))
    for args in (["status"], ["status", "tiny-moe"], ["down", "tiny-moe"], ["down"]):
        result = local.kubemoe(args, cwd=tmp_path)
        assert result.returncode == 1, args
        assert "Traceback" not in result.stderr
        assert "validation error" not in result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"kubemoe {args[0]}: {state} is not a state.json this kubemoe can read (")
        assert "pids 4242 (see `ps -o pid,pgid,args -p 4242`" in line
        assert line.endswith(f"then remove it (rm {state})")
    up = local.up_detached(tmp_path)
    assert up.returncode == 1
    assert f"kubemoe up: {state} is not a state.json this kubemoe can read (" in up.stderr
    assert local.running() == []
    state.write_text("{cut sh")  # not JSON at all: no pids to name
    status = local.kubemoe(["status", "tiny-moe"], cwd=tmp_path)
    assert "the processes it recorded may still run (their pids cannot be read from it)" in status.stderr


# --- accelerators ---------------------------------------------------------------------------------


def test_each_pod_gets_its_own_gpus(local: Local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU plan's processes all saw every GPU (and each took 90 % of the first one); each pod now gets
    its own, from those CUDA_VISIBLE_DEVICES offers; a plan needing more is refused."""
    local.manifest(tmp_path, accelerator="H100")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    up = local.up_detached(tmp_path)
    assert up.returncode == 0, up.stderr
    logs = tmp_path / ".run" / "up" / "tiny-moe" / "logs"
    seen = {p.stem: p.read_text().splitlines()[0] for p in logs.glob("*-g*-p*.log")}
    assert seen == {
        "prefill-g0-p0": "CUDA_VISIBLE_DEVICES=4",
        "decode-g0-p0": "CUDA_VISIBLE_DEVICES=5",
        "decode-g0-p1": "CUDA_VISIBLE_DEVICES=6",
    }
    assert local.kubemoe(["down"], cwd=tmp_path).returncode == 0

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    refused = local.up_detached(tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1] == (
        "kubemoe up: the plan needs 3 nvidia.com/gpu devices (prefill 1x1, decode 1x2: groups x devices"
        " per group) and this machine has 2 (CUDA_VISIBLE_DEVICES=0,1); lower"
        " spec.roles.<role>.replicas or parallelism (or accelerator.perPod) to fit, or run it on a cluster"
    )
    assert local.running() == []
