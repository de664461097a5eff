"""The model a local run loads: a file:// source or a plain path; the tiny example's checkpoint is
generated on first use (by `kubemoe-runtime tiny-checkpoint`: the operator never imports the runtime)."""

from __future__ import annotations

import subprocess
from pathlib import Path

# config.json architectures the runtime's tiny-checkpoint generator writes.
TINY_ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
TINY_PREFIX = "tiny-"


class ModelSourceError(ValueError):
    pass


def local_model_path(source: str, *, cwd: Path) -> Path:
    """file://PATH (relative to `cwd` unless absolute, file:///abs) or a plain path -> an absolute path."""
    scheme, sep, rest = source.partition("://")
    if sep and scheme != "file":
        raise ModelSourceError(
            f"kubemoe up loads local checkpoints; {source!r} is a {scheme}:// source — "
            "give model.source as file://PATH, or pass --model PATH"
        )
    path = Path(rest if sep else source)
    return path if path.is_absolute() else (cwd / path).resolve()


def ensure_model(path: Path, *, model_name: str, architecture: str | None, runtime: str) -> bool:
    """Make sure `path` holds a checkpoint. A missing tiny model (name `tiny-...`, an architecture the
    generator knows) is generated; returns whether it was. Anything else missing is an error."""
    if (path / "config.json").is_file():
        return False
    arch = TINY_ARCHITECTURES.get(architecture or "")
    if not model_name.startswith(TINY_PREFIX) or arch is None:
        raise ModelSourceError(f"no checkpoint at {path} (config.json missing)")
    path.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [runtime, "tiny-checkpoint", str(path), "--arch", arch], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ModelSourceError(f"generating the tiny checkpoint at {path} failed:\n{result.stderr[-2000:]}")
    return True
