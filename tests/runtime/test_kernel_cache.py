"""The kernel cache loads only libraries no other user could have written, and a cache it cannot use
(untrusted, unwritable, not a directory) never stops the engine: a private build or the torch path."""

from __future__ import annotations

import os
import platform
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubemoe_runtime.engines.torch.kernels import build
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel

OTHER_UID = 12345
ELF = b"\x7fELF"
PLANTED = b"someone else's code"

needs_cc = pytest.mark.skipif(build.compiler() is None, reason="no C compiler on this machine")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.fixture(autouse=True)
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private fallback builds go under tmp_path, not the machine's /tmp."""
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    return private


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("KUBEMOE_KERNEL_DIR", str(directory))
    return directory


@pytest.fixture
def kernel_runs_here(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """load() past its CPU check (these tests are about the cache, not the CPU), uncached around the test."""
    monkeypatch.delenv("KUBEMOE_KERNELS", raising=False)
    monkeypatch.delenv(moe_kernel.FORCE_ENV, raising=False)
    monkeypatch.setattr(moe_kernel, "cpu_flags", lambda: moe_kernel.CPU_FLAGS)  # the AVX512-BF16 kernel
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    moe_kernel.load.cache_clear()
    yield
    moe_kernel.load.cache_clear()


def plant(cache: Path, *, mode: int = 0o755, uid: int | None = None) -> Path:
    """A file under the kernel's cached name that this process did not build."""
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = build.library_path("moe_bf16")
    target.write_bytes(PLANTED)
    target.chmod(mode)
    if uid is not None:
        os.chown(target, uid, uid)
    return target


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@needs_cc
def test_a_missing_cache_is_created_private(cache: Path) -> None:
    built = build.build("moe_bf16")
    assert built.parent == cache
    assert mode(cache) == 0o700
    assert not mode(built) & 0o022
    assert built.read_bytes().startswith(ELF)


@needs_root
def test_a_library_owned_by_another_user_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = plant(cache, uid=OTHER_UID)
    monkeypatch.setenv("CC", "false")  # cannot rebuild: the planted file must still not be returned
    with pytest.raises(build.KernelBuildError):
        build.build("moe_bf16")
    assert planted.read_bytes() == PLANTED


@needs_cc
@needs_root
def test_a_library_owned_by_another_user_is_rebuilt(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    planted = plant(cache, uid=OTHER_UID)
    assert build.build("moe_bf16") == planted
    assert planted.stat().st_uid == os.geteuid()
    assert planted.read_bytes().startswith(ELF)
    assert f"owned by uid {OTHER_UID}" in caplog.text


@needs_cc
@pytest.mark.parametrize("bits", [0o775, 0o757])
def test_a_group_or_world_writable_library_is_rebuilt(cache: Path, bits: int) -> None:
    planted = plant(cache, mode=bits)
    assert build.build("moe_bf16") == planted
    assert planted.read_bytes().startswith(ELF)
    assert not mode(planted) & 0o022


@needs_cc
def test_a_symlink_in_the_cache_is_rebuilt(cache: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(PLANTED)
    cache.mkdir(mode=0o700)
    link = build.library_path("moe_bf16")
    link.symlink_to(elsewhere)
    assert build.build("moe_bf16") == link
    assert not link.is_symlink()
    assert elsewhere.read_bytes() == PLANTED


@needs_cc
@pytest.mark.parametrize("how", ["world-writable", "group-writable", "other-owner"])
def test_an_untrusted_cache_is_skipped_for_a_private_build(
    cache: Path, private_tmp: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    planted = plant(cache)  # a well-formed name, in a directory others can write
    if how == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(cache, OTHER_UID, OTHER_UID)
    else:
        cache.chmod(0o777 if how == "world-writable" else 0o770)
    built = build.build("moe_bf16")
    assert built.parent.parent == private_tmp, built
    assert mode(built.parent) == 0o700
    assert built.read_bytes().startswith(ELF)
    assert planted.read_bytes() == PLANTED
    assert "kernel cache not used" in caplog.text


@needs_cc
def test_a_cache_that_cannot_be_made_falls_back_to_a_private_build(
    tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KUBEMOE_KERNEL_DIR", str(blocker / "kernels"))  # NotADirectoryError
    assert build.build("moe_bf16").parent.parent == private_tmp


@needs_cc
def test_a_permission_error_leaves_the_torch_path(
    cache: Path, kernel_runs_here: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def denied(**kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied", str(kwargs.get("dir")))

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # root ignores modes, so deny it this way
    assert moe_kernel.load() is None
    assert "MoE kernel off" in caplog.text
    assert "Permission denied" in caplog.text


def test_an_unusable_cache_without_a_compiler_leaves_the_torch_path(
    tmp_path: Path,
    kernel_runs_here: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KUBEMOE_KERNEL_DIR", str(blocker / "kernels"))
    monkeypatch.setenv("CC", "false")
    assert moe_kernel.load() is None
    assert "MoE kernel off" in caplog.text


@needs_cc
@needs_root
def test_load_never_runs_a_library_someone_else_owns(
    cache: Path, kernel_runs_here: None, caplog: pytest.LogCaptureFixture
) -> None:
    planted = plant(cache, uid=OTHER_UID)
    assert moe_kernel.load() is not None
    assert planted.stat().st_uid == os.geteuid(), "the planted library was loaded, not rebuilt"


def test_the_image_build_directory_is_readable_by_the_images_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`build.py --out DIR` (the image's build stage): DIR ships to uid 65532, so it is 0755, not 0700."""
    if build.compiler() is None:
        pytest.skip("no C compiler on this machine")
    out = tmp_path / "kernels"
    monkeypatch.setattr("sys.argv", ["build.py", "--out", str(out)])
    build.main()
    assert mode(out) == 0o755
    assert all(mode(f) == 0o755 for f in out.iterdir())
