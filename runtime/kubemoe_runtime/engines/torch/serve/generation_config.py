"""A checkpoint's generation_config.json: the defaults the API takes from it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from kubemoe_runtime.engines.torch.load.checkpoint_files import read_checkpoint_file
from kubemoe_runtime.engines.torch.load.model_config import MAX_CONFIG_BYTES, ConfigError


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json's defaults the API uses (none where the checkpoint has no such file)."""

    eos_token_ids: tuple[int, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0


def generation_defaults(model_dir: Path) -> GenerationDefaults:
    """generation_config.json, read as config.json is (a regular file inside the checkpoint folder, at most
    MAX_CONFIG_BYTES); ConfigError naming the file and the field where it is refused or malformed."""
    path = model_dir / "generation_config.json"
    try:
        loaded = json.loads(read_checkpoint_file(model_dir, path.name, limit=MAX_CONFIG_BYTES))
    except FileNotFoundError:
        return GenerationDefaults()
    except (OSError, ValueError, RecursionError) as err:  # refused, unreadable, not UTF-8 JSON
        raise ConfigError(f"{path}: cannot use it ({err})") from err
    if not isinstance(loaded, dict):
        return GenerationDefaults()  # not an object: no defaults in it

    def bad(field: str, want: str) -> ConfigError:
        return ConfigError(f"{path}: {field}: {str(loaded[field])[:40]!r} is not {want}")

    eos = loaded.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(type(i) is int and i >= 0 for i in ids):
        raise bad("eos_token_id", "a token id or a list of token ids")
    numbers = {"temperature": 1.0, "top_p": 1.0}
    for field in numbers:
        value = loaded.get(field)
        if value is None:
            continue
        ok = type(value) in (int, float) and math.isfinite(value)
        if not ok or value < 0 or (field == "top_p" and not 0 < value <= 1):
            raise bad(field, "a number from 0 to 1" if field == "top_p" else "a number of 0 or more")
        numbers[field] = float(value)
    return GenerationDefaults(tuple(ids), temperature=numbers["temperature"], top_p=numbers["top_p"])
