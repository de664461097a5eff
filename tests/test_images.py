"""The container images: no Docker engine runs here, so check what a build and a run would use.

Each Dockerfile is parsed with dockerfile-parse; its build context's COPY sources must exist,
its final user must be non-root, and its ENTRYPOINT (+ CMD) must be a console script of the
project it packages that really runs (`--help`) from this checkout's install."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from kubemoe_operator.render.image_user import HF_HOME, IMAGE_UID, IMAGE_USER, RUNTIME_HOME

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Image:
    dockerfile: Path
    context: Path


IMAGES = [
    Image(REPO / "operator" / "Dockerfile", REPO / "operator"),
    Image(REPO / "runtime" / "Dockerfile", REPO / "runtime"),
    Image(REPO / "runtime" / "Dockerfile.cpu", REPO / "runtime"),
]


def _parse(image: Image) -> DockerfileParser:
    # fileobj: the parser reads from memory and never writes the Dockerfile back.
    return DockerfileParser(fileobj=io.BytesIO(image.dockerfile.read_bytes()))


def _final_stage(parser: DockerfileParser) -> list[dict[str, str]]:
    instructions: list[dict[str, str]] = parser.structure
    last_from = max(i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM")
    return instructions[last_from:]


def _exec_form(value: str) -> list[str]:
    argv = json.loads(value)
    assert isinstance(argv, list), f"use the exec form (a JSON list), not a shell string: {value}"
    return [str(a) for a in argv]


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: str(i.dockerfile.relative_to(REPO)))
def test_copy_sources_exist_in_the_build_context(image: Image) -> None:
    for ins in _parse(image).structure:
        if ins["instruction"] == "COPY" and "--from=" not in ins["value"]:
            *sources, _dest = ins["value"].split()
            for src in sources:
                assert (image.context / src).exists(), (
                    f"{image.dockerfile.name}: COPY {src} is not in {image.context}"
                )


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: str(i.dockerfile.relative_to(REPO)))
def test_final_stage_runs_as_a_numeric_non_root_user(image: Image) -> None:
    users = [ins["value"] for ins in _final_stage(_parse(image)) if ins["instruction"] == "USER"]
    assert users, f"{image.dockerfile.name}: no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric uid lets runAsNonRoot verify it"
    assert int(uid) != 0


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: str(i.dockerfile.relative_to(REPO)))
def test_final_user_is_the_one_pods_run_as(image: Image) -> None:
    """The renderer and the chart run pods as image_user.IMAGE_UID: the image must create that user
    and end as it, or the pod could not write the image's HOME and cache."""
    stage = _final_stage(_parse(image))
    (user,) = [ins["value"] for ins in stage if ins["instruction"] == "USER"][-1:]
    assert user == f"{IMAGE_UID}:{IMAGE_UID}", f"{image.dockerfile.name}: USER {user}; see image_user.py"
    runs = " ".join(ins["value"] for ins in stage if ins["instruction"] == "RUN")
    assert f"useradd --uid {IMAGE_UID} " in runs
    assert f" {IMAGE_USER}" in runs


@pytest.mark.parametrize("image", IMAGES[1:], ids=lambda i: str(i.dockerfile.relative_to(REPO)))
def test_runtime_images_give_that_user_its_home_and_cache(image: Image) -> None:
    parser = _parse(image)
    runs = " ".join(ins["value"] for ins in _final_stage(parser) if ins["instruction"] == "RUN")
    assert "--create-home" in runs, f"{RUNTIME_HOME} must exist"
    assert parser.envs["HF_HOME"] == HF_HOME
    assert f"chown {IMAGE_UID}:{IMAGE_UID} {HF_HOME}" in runs


def test_the_chart_runs_the_operator_as_that_user() -> None:
    template = (REPO / "charts" / "kubemoe" / "templates" / "deployment.yaml").read_text()
    assert f"runAsUser: {IMAGE_UID}" in template
    assert f"runAsGroup: {IMAGE_UID}" in template


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: str(i.dockerfile.relative_to(REPO)))
def test_entrypoint_is_a_console_script_of_the_project_that_runs(image: Image) -> None:
    stage = _final_stage(_parse(image))
    entry = [_exec_form(i["value"]) for i in stage if i["instruction"] == "ENTRYPOINT"]
    assert entry, f"{image.dockerfile.name}: no ENTRYPOINT"
    argv = entry[-1]
    scripts = tomllib.loads((image.context / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts, f"{argv[0]} is not a console script of {image.context.name}/pyproject.toml"
    cmd = [_exec_form(i["value"]) for i in stage if i["instruction"] == "CMD"]
    args = cmd[-1] if cmd else ["--help"]
    if "--help" not in args:
        args = [*args, "--help"]
    proc = subprocess.run([str(BIN / argv[0]), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout.lower()


def test_gpu_runtime_image_keeps_the_base_images_torch() -> None:
    runs = [i["value"] for i in _parse(IMAGES[1]).structure if i["instruction"] == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs
    assert all("--no-deps" in r for r in installs), "the vLLM base image's torch must not be replaced"
