"""`kubemoe up`'s small breaks (#20): the model facts from a file:// checkpoint's own config.json, the
planner's fix: lines, the ready line's endpoint, and the router port's probe against TIME_WAIT.

`kubemoe up` is run for real up to the point where it would start processes: the router's port is held
by a listening socket, so it stops there ("port N is taken") after planning, with nothing started."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.model_config import ModelConfig
from kubemoe_operator.api.spec import ModelSpec
from kubemoe_operator.catalog import Catalog, load_catalog, resolve_model
from kubemoe_operator.cli.kubemoe import main
from kubemoe_operator.local.commands import announce_ready, plan_local
from kubemoe_operator.local.layout import LOOPBACK, LocalProcess
from kubemoe_operator.local.model import checkpoint_config, facts_from_config_json, tiny_checkpoint_commands
from kubemoe_operator.local.start import port_is_free, runtime_command
from kubemoe_operator.local.state import LocalRunError, ProcessState, RunState

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "examples" / "tiny-moe.yaml"

# config.json of three public models as Hugging Face serves them (the keys the planner reads and the
# ones around them; `reference:` in catalog/models.yaml names each file).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 129280,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}
GPT_OSS_120B = {  # https://huggingface.co/openai/gpt-oss-120b/blob/main/config.json, as used here
    "architectures": ["GptOssForCausalLM"],
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "num_local_experts": 128,
    "quantization_config": {"quant_method": "mxfp4"},
    "sliding_window": 128,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 201088,
}
INFORMATIONAL = {"name", "reference", "params_total_b", "params_active_b"}


@pytest.mark.parametrize(
    ("name", "config_json"),
    [
        ("deepseek-ai/DeepSeek-V3", DEEPSEEK_V3),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", MIXTRAL_8X7B),
        ("Qwen/Qwen3-30B-A3B", QWEN3_30B_A3B),
        ("openai/gpt-oss-120b", GPT_OSS_120B),
    ],
)
def test_config_json_alone_gives_the_facts_the_catalog_has(name: str, config_json: dict[str, Any]) -> None:
    """The catalog was transcribed from these files: config.json read with no catalog entry at all must
    size the model exactly as the catalog entry does."""
    catalog = load_catalog()
    no_models = Catalog(models=(), gpus=catalog.gpus)
    from_file = resolve_model(
        ModelSpec(
            name=name,
            source="file:///m",
            config=ModelConfig.model_validate(facts_from_config_json(config_json)),
        ),
        no_models,
    )
    from_catalog = resolve_model(ModelSpec(name=name, source="file:///m"), catalog)
    differ = {
        k: (getattr(from_file, k), getattr(from_catalog, k))
        for k in vars(from_catalog)
        if k not in INFORMATIONAL and getattr(from_file, k) != getattr(from_catalog, k)
    }
    assert differ == {}
    assert from_file.routed_params == from_catalog.routed_params


def test_only_layer_types_makes_a_layer_slide() -> None:
    """Qwen2/3 configs carry a sliding_window they do not use (use_sliding_window: false)."""
    assert "sliding_window" not in facts_from_config_json({**QWEN3_30B_A3B, "sliding_window": 4096})
    facts = facts_from_config_json(GPT_OSS_120B)
    assert (facts["sliding_window"], facts["sliding_window_layers"]) == (128, 18)


def test_qwen3_dense_layers_count_from_mlp_only_layers() -> None:
    facts = facts_from_config_json({**QWEN3_30B_A3B, "mlp_only_layers": [0, 1]})
    assert facts["num_dense_layers"] == 2
    assert "num_dense_layers" not in facts_from_config_json(QWEN3_30B_A3B)  # [] states none


def test_a_bad_config_json_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Exception, match=r"config.json: cannot read it"):
        checkpoint_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_30B_A3B, "num_hidden_layers": 5000}))
    with pytest.raises(
        Exception, match=r"config.json: numLayers 5000: Input should be less than or equal to 1024"
    ):
        checkpoint_config(tmp_path)
    assert checkpoint_config(tmp_path / "absent") is None


# --- a real checkpoint, through `kubemoe up` ---------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3-MoE checkpoint `kubemoe up` generates for the demo, written by the runtime."""
    try:
        runtime = runtime_command()
    except LocalRunError as err:
        pytest.skip(str(err))
    path = tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-moe"
    subprocess.run(
        [runtime, "tiny-checkpoint", str(path), "--arch", "qwen3_moe"], check=True, capture_output=True
    )
    return path


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def _manifest(tmp_path: Path, model: Path, *, inline: bool, **roles: Any) -> Path:
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["model"]["source"] = f"file://{model}"
    if not inline:
        del doc["spec"]["model"]["config"]
    for role, parallelism in roles.items():
        doc["spec"]["roles"][role]["parallelism"] = parallelism
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_file_checkpoint_plans_from_its_config_json(checkpoint: Path, tmp_path: Path) -> None:
    md = parse_manifest(yaml.safe_load(_manifest(tmp_path, checkpoint, inline=False).read_text()))
    assert md.spec.model.config is None  # nothing inline: before #20 this could not be planned
    plan, notes = plan_local(md, checkpoint)
    assert notes == []
    assert plan.architecture.startswith("3 layers, 8 experts top-2")  # the checkpoint's, not the example's 2
    # The same as writing the checkpoint's facts inline by hand.
    by_hand = yaml.safe_load(TINY.read_text())
    by_hand["spec"]["model"]["config"] = {
        "architecture": "Qwen3MoeForCausalLM",
        "numLayers": 3,
        "hiddenSize": 64,
        "numAttentionHeads": 4,
        "numKeyValueHeads": 2,
        "headDim": 32,
        "numRoutedExperts": 8,
        "expertsPerToken": 2,
        "moeIntermediateSize": 32,
        "intermediateSize": 96,
        "numDenseLayers": 1,  # mlp_only_layers: [0]
        "moeLayerStep": 1,
        "vocabSize": 512,
        "tieWordEmbeddings": False,
        "maxPositionEmbeddings": 512,
        "dtype": "bfloat16",
    }
    by_hand["spec"]["model"]["source"] = f"file://{checkpoint}"
    expected, _ = plan_local(parse_manifest(by_hand), tmp_path / "no-checkpoint")
    assert plan.model_dump() == expected.model_dump()


def test_kubemoe_up_plans_a_file_checkpoint_without_inline_facts(
    checkpoint: Path, tmp_path: Path, taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path, checkpoint, inline=False)
    code = main(["up", str(manifest), "--port", str(taken_port), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot plan" not in err
    assert err.strip().splitlines()[-1] == f"kubemoe up: port {taken_port} is taken; pick another with --port"
    assert not (tmp_path / "run" / "state.json").exists()  # stopped before starting anything


def test_kubemoe_up_names_inline_facts_the_checkpoint_contradicts(
    checkpoint: Path, tmp_path: Path, taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "up",
            str(TINY),
            "--model",
            str(checkpoint),
            "--port",
            str(taken_port),
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert (
        f"note: spec.model.config differs from {checkpoint / 'config.json'}:"
        " dtype float32 (config.json: bfloat16); planning with the manifest's values"
    ) in err.splitlines()


def test_kubemoe_up_generates_the_tiny_checkpoint_in_the_manifests_dtype(
    tmp_path: Path, taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny example says dtype float32: the checkpoint `kubemoe up` generates for it must say so too
    (it was written as bfloat16, so every demo printed a "differs" note about its own checkpoint)."""
    try:
        runtime_command()
    except LocalRunError as missing:
        pytest.skip(str(missing))
    model = tmp_path / "models" / "tiny-qwen3-moe"
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["model"]["source"] = f"file://{model}"
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    code = main(["up", str(manifest), "--port", str(taken_port), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1  # stopped at the taken port, after generating and planning
    assert f"generating the tiny random checkpoint tiny-qwen3-moe at {model} ..." in err
    assert "differs" not in err, err
    config = json.loads((model / "config.json").read_text())
    assert config["dtype"] == doc["spec"]["model"]["config"]["dtype"] == "float32"


def test_the_tiny_checkpoint_falls_back_to_the_runtimes_own_command(tmp_path: Path) -> None:
    """Without an interpreter beside `kubemoe-runtime`, the generator's default dtype (and the note)."""
    runtime = tmp_path / "bin" / "kubemoe-runtime"
    plain = [str(runtime), "tiny-checkpoint", "out", "--arch", "qwen3_moe"]

    def commands(dtype: str) -> list[list[str]]:
        return tiny_checkpoint_commands(Path("out"), arch="qwen3_moe", dtype=dtype, runtime=str(runtime))

    assert commands("float32") == [plain]
    runtime.parent.mkdir()
    python = runtime.parent / "python"
    python.touch()
    module = [str(python), "-m", "kubemoe_runtime.tools.checkpoints", "out", "--arch", "qwen3_moe"]
    assert commands("float32") == [[*module, "--dtype", "float32"], plain]
    assert commands("bfloat16") == [plain]  # the generator's default already


def test_kubemoe_up_prints_the_planners_fixes(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 8 experts over an expert-parallel size of 3 cannot divide.
    manifest = _manifest(tmp_path, checkpoint, inline=False, decode={"tensor": 1, "data": 3, "expert": 3})
    assert main(["up", str(manifest), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{manifest}: cannot plan (1 problem):"
    assert err[1].startswith("  spec.roles.decode.parallelism.expert: ")
    assert err[2].startswith("    fix: ")
    # `kubemoe plan` prints the same lines for the same problem (given the same facts inline).
    assert (
        main(
            [
                "plan",
                str(
                    _manifest(tmp_path, checkpoint, inline=True, decode={"tensor": 1, "data": 3, "expert": 3})
                ),
            ]
        )
        == 2
    )
    plan_err = capsys.readouterr().err.splitlines()
    assert plan_err[1].startswith("  spec.roles.decode.parallelism.expert: ")
    assert plan_err[2].startswith("    fix: ")


def test_kubemoe_up_with_a_broken_config_json_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{")
    (model / "model.safetensors").write_bytes(b"")  # weights are there: only config.json is wrong
    manifest = _manifest(tmp_path, model, inline=False)
    assert main(["up", str(manifest), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kubemoe up: {model / 'config.json'}: cannot read it (")
    assert err.count("\n") == 1


# --- the ready line -------------------------------------------------------------------------------


def _state(tmp_path: Path) -> RunState:
    router = LocalProcess(
        name="router", role="router", group=0, pod=0, leader=True, ranks=[], port=8123, argv=["r"], env={}
    )
    decode = LocalProcess(
        name="decode-g0-p0",
        role="decode",
        group=0,
        pod=0,
        leader=True,
        ranks=[0],
        port=9001,
        argv=["d"],
        env={},
    )
    return RunState(
        name="tiny-moe",
        model="tiny-qwen3-moe",
        layout="D1x(EP1)",
        mode="colocated",
        run_dir=str(tmp_path),
        endpoint="http://127.0.0.1:8123/v1",
        started=0.0,
        supervisor_pid=os.getpid(),
        processes=[
            ProcessState(process=decode, pid=1, log="d.log", ready_s=3.25),
            ProcessState(process=router, pid=2, log="r.log", ready_s=4.0),
        ],
    )


def test_the_ready_line_names_the_endpoint_and_a_pipe_gets_it_alone(tmp_path: Path) -> None:
    """`make demo` reads `kubemoe up`'s stdout through a pipe: the person sees stderr, so the URL must be
    there too (it used to end in "OpenAI endpoint:" with the URL only on the captured stdout)."""
    out, err = io.StringIO(), io.StringIO()
    announce_ready(_state(tmp_path), out=out, err=err)
    assert err.getvalue() == "ready (decode 3.2s, router 4.0s); OpenAI endpoint: http://127.0.0.1:8123/v1\n"
    assert out.getvalue() == "http://127.0.0.1:8123/v1\n"


def test_on_a_terminal_the_endpoint_is_printed_once(tmp_path: Path) -> None:
    leader, follower = os.openpty()
    with open(follower, "w", closefd=True) as tty, open(leader, "rb", buffering=0, closefd=True) as screen:
        err = io.StringIO()
        announce_ready(_state(tmp_path), out=tty, err=err)
        tty.write("end\n")
        tty.flush()
        shown = screen.read(1024).decode()
    assert "OpenAI endpoint: http://127.0.0.1:8123/v1" in err.getvalue()
    assert shown.strip() == "end"  # nothing else was written to the terminal's stdout


# --- the router port's probe ----------------------------------------------------------------------


def test_a_port_with_time_wait_connections_is_free_a_listening_one_is_not() -> None:
    """The last run's connections sit in TIME_WAIT on the router's port for a minute after it stops; a
    server binding with SO_REUSEADDR, as the router's (uvicorn) does, can listen there again, so the probe
    must say free. (Linux lets the port be reused so when both the new socket and the one that left the
    connection in TIME_WAIT set SO_REUSEADDR: the stand-in server sets it, as uvicorn does.)"""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((LOOPBACK, 0))
    server.listen(1)
    port = server.getsockname()[1]
    client = socket.create_connection((LOOPBACK, port))
    accepted, _ = server.accept()
    assert not port_is_free(port)  # a server listens there: taken
    accepted.close()  # the server's side closes first: its end (LOOPBACK:port) goes to TIME_WAIT
    client.recv(1)  # the FIN arrived
    client.close()
    server.close()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain:  # the old probe, without SO_REUSEADDR
        try:
            plain.bind((LOOPBACK, port))
        except OSError:
            pass
        else:
            pytest.skip("this kernel lets a plain bind reuse a TIME_WAIT port: nothing to show")
    assert port_is_free(port)


def test_the_demo_passes_on_kubemoe_ups_one_line_error(tmp_path: Path) -> None:
    """`make demo` with a manifest that is not there: `kubemoe up`'s one line, its exit status, no more."""
    pytest.importorskip("openai")
    missing = tmp_path / "missing.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "kubemoe_operator.local.demo", str(missing)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == f"kubemoe up: {missing}: no such file\n"
    assert result.stdout == ""
