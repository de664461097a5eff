"""TextStream, the torch engine's incremental detokenizer (serve/tokenizer.py): what a client is sent,
streamed or collected, is the full decode of the generated ids (cut before a stop string), for byte-level
BPE (Qwen, DeepSeek), SentencePiece with byte fallback (Mixtral, Llama 2) and Metaspace decoders, with
special tokens skipped; and each step decodes a few recent ids, not the whole output."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from kubemoe_runtime.engines.torch.serve.text_stream import TextStream
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer

TEXTS = (
    "Hello world, the experts route tokens.",
    "Mixture of experts: 专家混合模型 routes 😀 emoji 🚀🚀 and naïve café text",
    "数据并行和专家并行",
    "a\ufffdb \ufffd\ufffd real replacement characters",
    "tabs\tand\nnew lines  double  spaces ",
)


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = " ".join(TEXTS).split()
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]


def byte_level() -> TextTokenizer:
    """A byte-level BPE like Qwen's: multi-byte characters split across tokens, special tokens added."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_corpus(), trainer=trainer)
    return TextTokenizer(tk, chat_template=None, special={})


def byte_fallback() -> TextTokenizer:
    """Mixtral's / Llama 2's SentencePiece BPE with byte fallback: a character outside the vocabulary is
    one <0xNN> token a byte, and the decoder writes one U+FFFD a byte of an unfinished character."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Hi": 3, "▁there": 4}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    vocab.update({w: len(vocab) + i for i, w in enumerate(["▁the", "▁experts", "▁route", "▁", "s", "e"])})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return TextTokenizer(tk, chat_template=None, special={})


def metaspace() -> TextTokenizer:
    """A SentencePiece-style tokenizer whose Metaspace decoder drops the first token's leading space."""
    vocab = {"<unk>": 0, "</s>": 1, "▁Hello": 2, "▁world": 3, "▁the": 4, "▁experts": 5, "!": 6, "▁": 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.decoder = decoders.Metaspace()
    tk.add_special_tokens([AddedToken("</s>", special=True)])
    return TextTokenizer(tk, chat_template=None, special={})


def streamed(tok: TextTokenizer, ids: Sequence[int], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    stream = TextStream(tok, stop=stop)
    deltas = [stream.add(i) for i in ids]
    deltas.append(stream.flush())
    assert stream.released == sum(map(len, deltas))
    return deltas, stream.stopped


def byte_ids(tok: TextTokenizer, text: str) -> list[int]:
    """`text` as <0xNN> byte tokens only (what a byte-fallback model may well generate)."""
    vocab = tok.tokenizer.get_vocab()
    return [vocab[f"<0x{b:02X}>"] for b in text.encode()]


def test_byte_fallback_waits_for_every_byte_of_a_character() -> None:
    tok = byte_fallback()
    ids = [3, *byte_ids(tok, "😀"), 4]  # "Hi", F0 9F 98 80, " there"
    assert tok.decode(ids[:3]) == "Hi\ufffd\ufffd"  # two U+FFFD while two of four bytes are in
    deltas, _ = streamed(tok, ids)
    assert deltas == ["Hi", "", "", "", "😀", " there", ""]
    assert "".join(deltas) == tok.decode(ids) == "Hi😀 there"


@pytest.mark.parametrize("make", [byte_level, byte_fallback, metaspace])
def test_the_stream_is_the_full_decode(make: Callable[[], TextTokenizer]) -> None:
    tok = make()
    rng = random.Random(1)
    special = sorted(i for i, t in tok.tokenizer.get_added_tokens_decoder().items() if t.special)
    cases = [tok.encode(text, add_special_tokens=False) for text in TEXTS]
    if make is byte_fallback:  # what the model may write instead of the tokenizer's own encoding
        lead = tok.encode("the experts", add_special_tokens=False)
        cases += [[*lead, *byte_ids(tok, text)] for text in TEXTS]
    for ids in list(cases):  # special tokens (skipped on the way out) anywhere
        mixed = list(ids)
        for _ in range(4):
            mixed.insert(rng.randrange(len(mixed) + 1), rng.choice(special))
        cases.append(mixed)
    for ids in cases:
        deltas, stopped = streamed(tok, ids)
        assert "".join(deltas) == tok.decode(ids), ids
        assert not stopped


def test_random_byte_level_ids_stream_as_their_full_decode() -> None:
    """Anything a model may generate, invalid UTF-8 included: the stream never takes text back."""
    tok = byte_level()
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        deltas, _ = streamed(tok, ids)
        assert "".join(deltas) == tok.decode(ids), ids


@pytest.mark.parametrize("make", [byte_level, byte_fallback])
def test_stop_strings_cut_the_text_as_the_full_decode_would(make: Callable[[], TextTokenizer]) -> None:
    tok = make()
    stops = [("experts",), ("😀",), ("专家", "route"), ("e",), ("tokens.", "the experts route"), ("xyz",)]
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        for stop in stops:
            deltas, stopped = streamed(tok, ids, stop)
            found = [i for s in stop if (i := full.find(s)) >= 0]
            assert stopped == bool(found), (text, stop)
            assert "".join(deltas) == (full[: min(found)] if found else full), (text, stop)


def test_a_tail_that_may_become_a_stop_string_is_held_back() -> None:
    tok = byte_level()
    stream = TextStream(tok, stop=("tokens!",))
    ids = tok.encode("the experts route tokens", add_special_tokens=False)
    released = "".join(stream.add(t) for t in ids)
    assert released == "the experts route "  # "tokens" may yet become "tokens!"
    assert stream.flush() == "tokens"


def counting_decodes(tok: TextTokenizer) -> list[int]:
    """The lengths of the id lists `tok.decode` is given from now on."""
    lengths: list[int] = []
    decode = tok.decode

    def counted(ids: Sequence[int]) -> str:
        lengths.append(len(ids))
        return decode(ids)

    tok.decode = counted  # type: ignore[method-assign]
    return lengths


@pytest.mark.parametrize("stop", [(), ("</answer>",)])
def test_each_step_decodes_a_few_recent_ids_not_the_whole_output(stop: tuple[str, ...]) -> None:
    tok = byte_level()
    rng = random.Random(3)
    ids = [rng.randrange(tok.vocab_size) for _ in range(4000)]
    lengths = counting_decodes(tok)
    deltas, _ = streamed(tok, ids, stop)
    assert max(lengths) <= 32  # before: every step decoded every id so far, 4000 at the end
    assert "".join(deltas) == TextTokenizer.decode(tok, ids)


def test_a_long_run_of_real_replacement_characters_stays_a_short_window() -> None:
    """Text ending in U+FFFD is not final (a character's bytes may still come), unless enough ids later
    left it unchanged: a model writing U+FFFD after U+FFFD must not make each step decode them all."""
    tok = byte_level()
    ids = tok.encode("ok " + "\ufffd" * 300 + " done", add_special_tokens=False)
    lengths = counting_decodes(tok)
    deltas, _ = streamed(tok, ids)
    assert max(lengths) <= 32  # 3000 of them: the same
    assert "".join(deltas) == "ok " + "\ufffd" * 300 + " done"
