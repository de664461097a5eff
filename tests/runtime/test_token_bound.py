"""The most characters one token can stand for (serve/token_bound.py), which lets the server refuse a text
that cannot fit the context before tokenizing it: derived from the tokenizer.json where every stage can
be shown to keep it (a byte-level BPE like the tiny checkpoint's, Qwen's, DeepSeek's, Llama 4's), None
where a stage can make one token of any amount of text (a normalizer or pre-tokenizer that removes text,
a model that maps a whole unknown word to one token, an added token that swallows whitespace, truncation).
The bound is checked against the real tokenizer: no text makes fewer tokens than it promises."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from kubemoe_runtime.engines.torch.serve.token_bound import NFC_SHRINK, NFKC_SHRINK, max_chars_per_token

Spec = dict[str, Any]


@pytest.fixture(scope="module")
def spec(qwen: Path) -> Spec:
    """The tiny checkpoint's tokenizer.json: byte-level BPE, no normalizer."""
    loaded: Spec = json.loads((qwen / "tokenizer.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def longest(spec: Spec) -> int:
    return max(
        len(token) for token in [*spec["model"]["vocab"], *(t["content"] for t in spec["added_tokens"])]
    )


def variant(spec: Spec, change: Callable[[Spec], None]) -> Tokenizer:
    changed = json.loads(json.dumps(spec))
    change(changed)
    return Tokenizer.from_str(json.dumps(changed))


def setter(key: str, value: Any) -> Callable[[Spec], None]:
    return lambda s: s.__setitem__(key, value)


def test_a_byte_level_bpe_is_bounded_by_its_longest_token(spec: Spec, longest: int) -> None:
    assert max_chars_per_token(Tokenizer.from_str(json.dumps(spec))) == longest


def _replace(pattern: Spec, content: str) -> Spec:
    return {"type": "Replace", "pattern": pattern, "content": content}


UNBOUNDED: dict[str, Callable[[Spec], None]] = {
    "Strip": setter("normalizer", {"type": "Strip", "strip_left": True, "strip_right": True}),
    "StripAccents": setter("normalizer", {"type": "StripAccents"}),
    "BertNormalizer": setter(
        "normalizer",
        {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "lowercase": True},
    ),
    "Replace by nothing": setter("normalizer", _replace({"String": "a"}, "")),
    "Replace of a regex": setter("normalizer", _replace({"Regex": "a+"}, "a")),
    "Strip in a Sequence": setter(
        "normalizer",
        {
            "type": "Sequence",
            "normalizers": [{"type": "NFC"}, {"type": "Strip", "strip_left": True, "strip_right": True}],
        },
    ),
    "Whitespace": setter("pre_tokenizer", {"type": "Whitespace"}),
    "Split removing": setter(
        "pre_tokenizer", {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False}
    ),
    "fused unk": lambda s: s["model"].update(unk_token="<|endoftext|>", fuse_unk=True),
    "lstrip token": lambda s: s["added_tokens"][0].update(lstrip=True),
    "truncation": setter(
        "truncation", {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    ),
}


@pytest.mark.parametrize("change", UNBOUNDED.values(), ids=UNBOUNDED.keys())
def test_no_bound_where_a_stage_can_swallow_any_amount_of_text(
    spec: Spec, change: Callable[[Spec], None]
) -> None:
    assert max_chars_per_token(variant(spec, change)) is None


def test_a_model_that_makes_one_token_of_an_unknown_word_has_no_bound() -> None:
    word_level = {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}
    tokenizer = Tokenizer.from_str(json.dumps({"version": "1.0", "model": word_level}))
    assert len(tokenizer.encode("x" * 10_000).ids) == 1  # why: ten thousand characters, one token
    assert max_chars_per_token(tokenizer) is None


SHRINKING: dict[str, tuple[Spec, int]] = {
    "NFC": ({"type": "NFC"}, NFC_SHRINK),
    "NFKC": ({"type": "NFKC"}, NFKC_SHRINK),
    "NFD, Lowercase, Prepend": (
        {
            "type": "Sequence",
            "normalizers": [{"type": "NFD"}, {"type": "Lowercase"}, {"type": "Prepend", "prepend": "_"}],
        },
        1,
    ),
    "NFC then Replace 3 by 1": (
        {"type": "Sequence", "normalizers": [{"type": "NFC"}, _replace({"String": "abc"}, "x")]},
        NFC_SHRINK * 3,
    ),
}


@pytest.mark.parametrize(("normalizer", "factor"), SHRINKING.values(), ids=SHRINKING.keys())
def test_a_normalizer_that_may_shrink_text_multiplies_the_bound(
    spec: Spec, longest: int, normalizer: Spec, factor: int
) -> None:
    assert max_chars_per_token(variant(spec, setter("normalizer", normalizer))) == factor * longest


def test_the_nfc_and_nfkc_factors_cover_every_character() -> None:
    """NFC(x) is at least len(x) / (the longest canonical decomposition of one character) long, NFKC(x) at
    least len(x) / (the longest compatibility decomposition): token_bound.py's proof needs both maxima."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    assert max(len(unicodedata.normalize("NFD", c)) for c in chars) <= NFC_SHRINK
    assert max(len(unicodedata.normalize("NFKD", c)) for c in chars) <= NFKC_SHRINK


# Text that shrinks under NFC/NFKC (combining marks, Hangul jamo, ligatures) and the tokenizer's own
# longest tokens, repeated: the cases where tokens stand for the most text.
SHRINKERS = ["e\u0301", "\u03b1\u0313\u0342\u0345", "\u1100\u1161\u11a8", "\ufdfa", "\ufb01", " ", "\n"]


@pytest.fixture(scope="module")
def bounded(spec: Spec) -> list[tuple[Tokenizer, int]]:
    tokenizers = [variant(spec, setter("normalizer", n)) for n in (None, {"type": "NFC"}, {"type": "NFKC"})]
    out = []
    for tokenizer in tokenizers:
        bound = max_chars_per_token(tokenizer)
        assert bound is not None
        out.append((tokenizer, bound))
    return out


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_no_text_makes_fewer_tokens_than_the_bound_promises(
    bounded: list[tuple[Tokenizer, int]], spec: Spec, data: st.DataObject
) -> None:
    pieces = st.sampled_from([*SHRINKERS, *sorted(spec["model"]["vocab"], key=len)[-20:], "<|im_start|>"])
    text = "".join(data.draw(st.lists(st.one_of(pieces, st.text(max_size=5)), max_size=60)))
    for tokenizer, bound in bounded:
        for special in (True, False):
            assert len(tokenizer.encode(text, add_special_tokens=special).ids) * bound >= len(text)
