"""Typed, range-checked reads of config.json's fields: integers are integers (not bools, not 1.7, not
"64") within the caps below, floats finite; each problem an `Invalid` naming the field and saying what
would be valid (model_config.ModelConfig.from_dict adds the file's name)."""

from __future__ import annotations

import math
from typing import Any, Final

# Caps on config.json's sizes: far above every model the runtime serves -- the largest are DeepSeek-V3 and
# Kimi K2 (hidden 7168, 61 layers, 128 / 64 heads, 256 / 384 routed experts, top-8; 671e9 / 1.04e12
# parameters), Qwen3-235B (94 layers, 128 experts, vocab 151,936) and Llama 4 (vocab 202,048; Scout:
# 10,485,760 positions) -- and low enough that what the runtime sizes from config.json before it reads a
# shard header (the table of expected shapes, the expert placement) stays small.
MAX_WIDTH: Final = 2**20  # hidden, intermediate and LoRA sizes, head dims
MAX_COUNT: Final = 2**16  # layers, attention heads, routed and shared experts, expert groups
MAX_VOCAB: Final = 2**24  # vocab_size, and token ids
MAX_POSITIONS: Final = 2**30  # max_position_embeddings, attention_chunk_size
MAX_EXPERT_LAYERS: Final = 2**20  # routed experts x MoE layers (DeepSeek-V3: 256 x 58, Kimi K2: 384 x 60)
MAX_PARAMETERS: Final = 2**42  # about 4.4e12, four times Kimi K2


class Invalid(Exception):
    """One field's problem (`ModelConfig.from_dict` adds the file's name)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


_REQUIRED: Final = object()


def show(value: Any) -> str:
    """A value for a message, shortened (a hostile file may hold a long one)."""
    try:
        text = repr(value)
    except RecursionError:
        return "a deeply nested value"
    return text if len(text) <= 40 else text[:37] + "..."


def json_type(value: Any) -> str:
    kinds = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"))
    return "null" if value is None else next((name for t, name in kinds if isinstance(value, t)), "object")


def integer(field: str, value: Any, *, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():  # 4096.0: a JSON writer's integer
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(field, f"{show(value)} is not an integer; give an integer from {lo} to {hi}")
    if not lo <= value <= hi:
        raise Invalid(field, f"{value} is out of range; give an integer from {lo} to {hi}")
    return value


class Fields:
    """Typed, range-checked reads of one JSON object's fields (`prefix`: where it sits in config.json)."""

    def __init__(self, doc: dict[str, Any], prefix: str = "") -> None:
        self.doc, self.prefix = doc, prefix

    def key(self, *keys: str) -> str:
        """The first of `keys` set (not null), else the first: the field a value comes from."""
        return self.prefix + next((k for k in keys if self.doc.get(k) is not None), keys[0])

    def raw(self, *keys: str, default: Any = _REQUIRED) -> Any:
        for key in keys:
            if self.doc.get(key) is not None:
                return self.doc[key]
        if default is _REQUIRED:
            others = f" (nor {', '.join(keys[1:])})" if len(keys) > 1 else ""
            raise Invalid(self.prefix + keys[0], f"missing{others}; this model_type needs it")
        return default

    def integer(self, *keys: str, default: Any = _REQUIRED, lo: int = 1, hi: int = MAX_WIDTH) -> int:
        return integer(self.key(*keys), self.raw(*keys, default=default), lo=lo, hi=hi)

    def number(self, *keys: str, default: Any = _REQUIRED, positive: bool = True) -> float:
        value = self.raw(*keys, default=default)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        try:
            number = float(value) if ok else math.nan
        except OverflowError:  # an integer too big for a float
            number = math.nan
        if not math.isfinite(number) or (positive and number <= 0):
            raise Invalid(
                self.key(*keys), f"{show(value)} is not a {'positive ' if positive else ''}finite number"
            )
        return number

    def flag(self, key: str, default: bool) -> bool:
        value = self.doc.get(key)
        if value is None:
            return default
        if not isinstance(value, bool | int):  # an int too: the Hub's Llama 4 says attn_temperature_tuning: 4
            raise Invalid(self.prefix + key, f"{show(value)} is not true or false")
        return bool(value)

    def obj(self, key: str) -> dict[str, Any]:
        """An object field; {} where it is absent or null."""
        value = self.doc.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise Invalid(self.prefix + key, f"a JSON {json_type(value)}, not an object; give an object")
        return value

    def integers(self, key: str, *, lo: int, hi: int) -> list[int] | None:
        """A list of integers; None where it is absent or null."""
        value = self.doc.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            raise Invalid(self.prefix + key, f"{show(value)} is not a list of integers")
        return [integer(f"{self.prefix}{key}[{i}]", v, lo=lo, hi=hi) for i, v in enumerate(value)]
