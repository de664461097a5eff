"""Generated ids -> text deltas (TextStream): incremental detokenization that holds back an incomplete
UTF-8 character and any tail that could still become a stop string."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer

_PENDING_LIMIT: Final = 16  # ids past the read offset before `add` looks for a boundary to force
_PENDING_KEEP: Final = 4  # ...leaving at least this many undecided (a UTF-8 character is <= 4 bytes)


@dataclass
class TextStream:
    """One request's generated text, released as it becomes final.

    Incremental detokenization as vLLM and `tokenizers.decoders.DecodeStream` do it: only a short
    window of recent ids is decoded again each step, from a prefix offset (ids kept for context: a
    SentencePiece decoder strips the space of a text's first token) to the end; the text past the read
    offset is new. Once that new text is not empty and does not end in U+FFFD (a character whose bytes
    are still arriving: byte-level BPE gives one U+FFFD for it, a byte-fallback decoder one per byte)
    the window moves on: prefix offset <- read offset <- end. Special ids are left out of the window, as
    decode() leaves them out of its text. Should a window's text end in U+FFFD for `_PENDING_LIMIT` ids
    (a run of real U+FFFD characters, or invalid bytes), it moves on at the id `_PENDING_KEEP` back if
    no character spans it (the text before it and the text from it, decoded apart, make the whole), so
    each step costs about the same however long the output.

    Of the decoded text, `add` releases all but every trailing U+FFFD and the longest tail that is a
    prefix of a stop string, looking for stop strings only in text not yet released. When a stop string
    appears, the text is cut just before it and `stopped` is set. `flush` releases the rest.
    """

    tokenizer: TextTokenizer
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    released: int = 0  # characters of the decoded text handed out so far
    stopped: bool = False
    _window: list[int] = field(default_factory=list, init=False, repr=False)  # from the prefix offset
    _read: int = field(default=0, init=False, repr=False)  # the read offset, in _window
    _prefix_text: str = field(default="", init=False, repr=False)  # the text of _window[:_read]
    _held: str = field(default="", init=False, repr=False)  # text before the read offset, not released
    _ahead: int = field(default=0, init=False, repr=False)  # characters past the read offset released

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.stopped or token_id in self.tokenizer.skipped_ids:
            return ""
        self._window.append(token_id)
        text = self.tokenizer.decode(self._window)
        pending = text[len(self._prefix_text) :]
        if pending and not pending.endswith("\ufffd"):
            self._advance(pending, len(self._window))
            pending = ""
        elif len(self._window) - self._read > _PENDING_LIMIT:  # move on at an id no character spans
            cut = len(self._window) - _PENDING_KEEP
            settled = self.tokenizer.decode(self._window[:cut])
            apart = settled + self.tokenizer.decode(self._window[cut:]) == text
            if apart and len(settled) > len(self._prefix_text) and settled.startswith(self._prefix_text):
                self._advance(settled[len(self._prefix_text) :], cut)
                pending = text[len(settled) :]
        return self._release(pending.rstrip("\ufffd"))

    def flush(self) -> str:
        """Everything not yet released (the request finished for another reason)."""
        if self.stopped:
            return ""
        pending = ""
        if len(self._window) > self._read:
            pending = self.tokenizer.decode(self._window)[len(self._prefix_text) :]
        rest = pending[self._ahead :] if self._ahead else self._held + pending
        self._window, self._read, self._prefix_text, self._held, self._ahead = [], 0, "", "", 0
        self.released += len(rest)
        return rest

    def _advance(self, text: str, read: int) -> None:
        """Move the window on: `text`, the text of _window[_read:read], is final."""
        if self._ahead >= len(text):
            self._ahead -= len(text)
        else:
            self._held += text[self._ahead :]
            self._ahead = 0
        self._window = self._window[self._read :]
        self._read = read - self._read
        self._prefix_text = self.tokenizer.decode(self._window[: self._read])

    def _release(self, pending: str) -> str:
        """Release what may be released of the held text and then `pending` (text past the read offset,
        its trailing U+FFFD left out)."""
        unreleased = pending[self._ahead :] if self._ahead else self._held + pending
        end = len(unreleased)
        if self.stop:
            first = min((i for s in self.stop if (i := unreleased.find(s)) >= 0), default=-1)
            if first >= 0:
                self.stopped = True
                self._window, self._read, self._prefix_text, self._held, self._ahead = [], 0, "", "", 0
                self.released += first
                return unreleased[:first]
            hold = 0  # the longest tail that could still become a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, end), hold, -1):
                    if unreleased.endswith(s[:k]):
                        hold = k
                        break
            end -= hold
        if end <= len(self._held):
            self._held = self._held[end:]
        else:
            self._ahead += end - len(self._held)
            self._held = ""
        self.released += end
        return unreleased[:end]
