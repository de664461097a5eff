"""Text in and out: a checkpoint's tokenizer.json, its chat template, and incremental detokenization.

The server needs three things from a tokenizer and no more, so this wraps the `tokenizers` library
directly (transformers' tokenizer classes take seconds to import):

    encode / decode          token ids <-> text (special tokens skipped on the way out)
    apply_chat_template      the checkpoint's Jinja chat template, rendered in a sandbox as transformers
                             does (a template ships with a checkpoint; it is not trusted code)
    TextStream               generated ids -> text deltas, holding back an incomplete UTF-8 character
                             and any tail that could still become a stop string
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The checkpoint has no chat template, or rendering it failed for these messages."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class TextTokenizer:
    def __init__(
        self, tokenizer: Tokenizer, *, chat_template: str | None, special: Mapping[str, str]
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special = dict(special)  # e.g. {"eos_token": "<|im_end|>"}
        self._template = None
        if chat_template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(chat_template)

    @classmethod
    def load(cls, model_dir: Path | str) -> TextTokenizer:
        root = Path(model_dir)
        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        config_path = root / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        jinja_path = root / "chat_template.jinja"
        if not isinstance(template, str) and jinja_path.exists():
            template = jinja_path.read_text()
        special = {
            key: text
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (text := _token_text(config.get(key))) is not None
        }
        return cls(tokenizer, chat_template=template if isinstance(template, str) else None, special=special)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text for a conversation, with the assistant's turn opened."""
        if self._template is None:
            raise ChatTemplateError("this model's tokenizer has no chat template; use /v1/completions")
        try:
            return str(
                self._template.render(
                    messages=[dict(m) for m in messages], add_generation_prompt=True, **self.special
                )
            )
        except TemplateError as err:
            raise ChatTemplateError(f"the chat template failed: {err}") from err


@dataclass
class TextStream:
    """One request's generated text, released as it becomes final.

    Each `add` re-decodes every generated id (byte-level BPE may merge bytes across tokens, so text is
    only stable as a prefix) and returns the part not yet released. It holds back a trailing U+FFFD (a
    character whose bytes are still arriving) and the longest tail that is a prefix of a stop string.
    When a stop string appears, the text is cut just before it and `stopped` is set.
    """

    tokenizer: TextTokenizer
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    released: int = 0  # characters of the decoded text handed out so far
    stopped: bool = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if self.stop:
            first = min(
                (i for s in self.stop if (i := text.find(s, max(0, self.released - len(s)))) >= 0), default=-1
            )
            if first >= 0:
                self.stopped = True
                return self._release(text, first)
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._release(text, safe)

    def flush(self) -> str:
        """Everything not yet released (the request finished for another reason)."""
        return "" if self.stopped else self._release(self.tokenizer.decode(self.ids), None)

    def _release(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        out = text[self.released : end] if end > self.released else ""
        self.released = max(self.released, end)
        return out
