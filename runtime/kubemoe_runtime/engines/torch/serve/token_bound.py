"""How many characters of a prompt one token can stand for at most, where a tokenizer lets that be proven.

The server refuses a prompt that cannot fit the context before tokenizing it (serve/prompt_limits.py):
tokenizing 8 MB of text takes seconds of CPU, only to count far more tokens than max_model_len. A text
of n characters makes at least n / C tokens when no token stands for more than C characters of it, so
one of C x max_model_len characters or more is refused at once. C is derived from the tokenizer.json at
load, and only where every stage can be shown not to let one token swallow an unbounded span of text;
anything else gets no bound (None), and its prompts are tokenized and counted as before:

    model           BPE only: a token covers its own text, at most the longest entry of the vocabulary
                    (in characters; byte-level tokens are bytes, never fewer than the characters they
                    spell). Not where unknown characters fuse into one unk token (fuse_unk), unless byte
                    fallback covers every byte. WordPiece, Unigram and WordLevel map a whole unknown word,
                    however long, to one token: no bound.
    added tokens    their content's length; none may strip the whitespace around it (lstrip/rstrip
                    swallow any amount)
    normalizer      may shrink the text, by a factor that multiplies C: NFC by at most 4 (a character's
                    canonical decomposition is at most 4 long, and NFD(NFC(x)) = NFD(x) is no shorter than
                    x), NFKC by at most 18 (the longest compatibility decomposition, U+FDFA); NFD, NFKD,
                    Lowercase, Prepend and ByteLevel never shrink it; Replace of a fixed string by a
                    non-empty one by len(pattern) / len(content). Strip, StripAccents, BertNormalizer,
                    Precompiled, Nmt, a regex Replace and any other can remove text without bound: no bound
    pre-tokenizer   must keep every character: ByteLevel, Metaspace, Digits, and Split or Punctuation
                    unless they remove their delimiters; Whitespace, WhitespaceSplit, BertPreTokenizer,
                    CharDelimiterSplit and any other: no bound
    truncation      none (a truncating tokenizer.json caps the count instead)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from tokenizers import Tokenizer

# The factor by which each normalizer may shrink a text (see the module docstring); absent: unbounded.
NFC_SHRINK: Final = 4  # the longest canonical decomposition of one character (U+1F82 and others)
NFKC_SHRINK: Final = 18  # the longest compatibility decomposition (U+FDFA)
_NORMALIZER_SHRINK: Final[Mapping[str, int]] = {
    "NFC": NFC_SHRINK,
    "NFKC": NFKC_SHRINK,
    "NFD": 1,
    "NFKD": 1,
    "Lowercase": 1,
    "Prepend": 1,
    "ByteLevel": 1,
}
_KEEPING_PRE_TOKENIZERS: Final = frozenset({"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation"})
_BYTE_TOKENS: Final = frozenset(f"<0x{b:02X}>" for b in range(256))


def max_chars_per_token(tokenizer: Tokenizer) -> int | None:
    """The most characters of a text that one token of `tokenizer` can stand for; None where that cannot
    be bounded (the module docstring lists what can)."""
    spec = json.loads(tokenizer.to_str())
    if not isinstance(spec, dict) or spec.get("truncation") is not None:
        return None
    shrink = _normalizer_shrink(spec.get("normalizer"))
    if shrink is None or not _keeps_text(spec.get("pre_tokenizer")) or not _bpe_bounded(spec.get("model")):
        return None
    added = spec.get("added_tokens") or []
    if any(not isinstance(t, dict) or t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    longest = max((len(token) for token in tokenizer.get_vocab(with_added_tokens=True)), default=1)
    return shrink * max(1, longest)


def _normalizer_shrink(spec: Any) -> int | None:
    if spec is None:
        return 1
    if not isinstance(spec, dict):
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers") or []:
            if (one := _normalizer_shrink(part)) is None:
                return None
            factor *= one
        return factor
    if kind == "Replace":
        pattern, content = spec.get("pattern"), spec.get("content")
        if not isinstance(pattern, dict) or not isinstance(pattern.get("String"), str):
            return None  # a regex may match any span
        if not isinstance(content, str) or not content:
            return None  # removes what it matches
        return max(1, math.ceil(len(pattern["String"]) / len(content)))
    return _NORMALIZER_SHRINK.get(str(kind))


def _keeps_text(spec: Any) -> bool:
    """Whether the pre-tokenizer keeps every character (it may split, add to, or byte-encode them)."""
    if spec is None:
        return True
    if not isinstance(spec, dict):
        return False
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_keeps_text(part) for part in spec.get("pretokenizers") or [])
    return kind in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def _bpe_bounded(spec: Any) -> bool:
    """A BPE model whose every token covers at most its own text (unknown characters not fused)."""
    if not isinstance(spec, dict) or spec.get("type") != "BPE":
        return False
    if spec.get("unk_token") is None or not spec.get("fuse_unk"):
        return True  # an unk token then stands for one character
    vocab = spec.get("vocab")
    return bool(spec.get("byte_fallback")) and isinstance(vocab, dict) and vocab.keys() >= _BYTE_TOKENS
