"""Text in and out: a checkpoint's tokenizer.json, its chat template, and incremental detokenization.

The server needs three things from a tokenizer and no more, so this wraps the `tokenizers` library
directly (transformers' tokenizer classes take seconds to import):

    encode / decode          token ids <-> text (special tokens skipped on the way out); encode runs
                             without the GIL, so a long text tokenized on a worker thread leaves the
                             event loop and the engine thread running
    apply_chat_template      the checkpoint's Jinja chat template, rendered in a sandbox as transformers
                             does (a template ships with a checkpoint; it is not trusted code)
    TextStream               generated ids -> text deltas (text_stream.py)

The tokenizer files are untrusted input too. Each is read as a regular file inside the checkpoint folder,
up to a size limit (checkpoint_files.read_checkpoint_file). A tokenizer.json or tokenizer_config.json that
cannot be used stops the load with a `TokenizerLoadError` naming the file (and the field). A chat template
that cannot be used does not: /v1/completions needs no template, so the pod starts, logs the problem, and
only chat requests fail, each with a `ChatTemplateError` (HTTP 400) that names it, as they do for a model
without a template (transformers, too, only fails once a template is applied).

The template is rendered in a bounded sandbox (chat_template.py); TextStream is in text_stream.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from tokenizers import Tokenizer

from kubemoe_runtime.engines.torch.load.checkpoint_files import read_checkpoint_file
from kubemoe_runtime.engines.torch.serve import chat_template
from kubemoe_runtime.engines.torch.serve.chat_template import BoundedSandbox, ChatTemplateError, describe
from kubemoe_runtime.engines.torch.serve.token_bound import max_chars_per_token

log = logging.getLogger("kubemoe_runtime.server")

TOKENIZER_FILE: Final = "tokenizer.json"
TOKENIZER_CONFIG_FILE: Final = "tokenizer_config.json"
CHAT_TEMPLATE_FILE: Final = "chat_template.jinja"
MAX_TOKENIZER_BYTES: Final = 256 * 1024 * 1024  # Gemma 3's tokenizer.json, the largest we know: 33 MB
MAX_TOKENIZER_CONFIG_BYTES: Final = 64 * 1024 * 1024  # some list 100k+ added tokens: a few MB
MAX_CHAT_TEMPLATE_BYTES: Final = 4 * 1024 * 1024  # real templates, tool use included: tens of kB


class TokenizerLoadError(ValueError):
    """A checkpoint's tokenizer files cannot be used; the message names the file (and the field)."""


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


# -- The tokenizer ---------------------------------------------------------------------------------


class TextTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None,
        special: Mapping[str, str],
        template_source: str = "the chat template",
        template_problem: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special = dict(special)  # e.g. {"eos_token": "<|im_end|>"}
        # Why chat requests fail (a template that does not compile, a field of the wrong type), if they do.
        self.template_problem = template_problem
        self._env = BoundedSandbox()
        self._template: Any = None
        if chat_template is not None and template_problem is None:
            try:
                self._template = self._env.from_string(chat_template)
            except Exception as err:  # TemplateSyntaxError; RecursionError for absurd nesting
                self.template_problem = f"{template_source} does not compile{describe(err)}"
        if self.template_problem is not None:
            log.warning("chat requests will fail: %s", self.template_problem)
        # decode() drops these ids before the decoder runs: they neither add text nor change any around
        added = tokenizer.get_added_tokens_decoder()
        special_texts = {t.content for t in added.values() if t.special}
        self.skipped_ids = frozenset(
            {i for i, t in added.items() if t.special}
            | {i for text in special_texts if (i := tokenizer.model.token_to_id(text)) is not None}
        )
        # At most this many characters of text make one token; None where that cannot be bounded.
        self.max_chars_per_token = max_chars_per_token(tokenizer)

    @classmethod
    def load(cls, model_dir: Path | str) -> TextTokenizer:
        root = Path(model_dir)
        tokenizer_path = root / TOKENIZER_FILE
        tokenizer_json = _read_text(root, TOKENIZER_FILE, limit=MAX_TOKENIZER_BYTES)
        if tokenizer_json is None:
            raise TokenizerLoadError(f"{tokenizer_path}: no such file")
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as err:  # the tokenizers library raises plain Exceptions
            why = f"{tokenizer_path}: not a tokenizer the tokenizers library reads ({err})"
            raise TokenizerLoadError(why) from err
        config = _read_config(root)
        template, source, problem = _find_template(root, config)
        special = {
            key: token
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (token := _token_text(config.get(key))) is not None
        }
        return cls(
            tokenizer,
            chat_template=template,
            special=special,
            template_source=source,
            template_problem=problem,
        )

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it throughout: 7 MB of text froze
        # every thread of the server for seconds); for one text its ids are encode's.
        [encoding] = self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text for a conversation, with the assistant's turn opened.

        Up to RENDER_CPU_SECONDS of CPU work: the server calls it on a worker thread."""
        if self._template is None:
            if self.template_problem is not None:
                raise ChatTemplateError(f"this model's chat template cannot be used: {self.template_problem}")
            raise ChatTemplateError("this model's tokenizer has no chat template; use /v1/completions")
        context = {"messages": [dict(m) for m in messages], "add_generation_prompt": True, **self.special}
        try:  # the bounds are read at each call: tests lower them
            cpu, chars = chat_template.RENDER_CPU_SECONDS, chat_template.MAX_RENDERED_CHARS
            return self._env.render_bounded(self._template, context, cpu_seconds=cpu, max_chars=chars)
        except Exception as err:  # whatever the template does wrong is the template's error, not a 500
            raise ChatTemplateError(f"the chat template failed{describe(err)}") from err


def _read_text(root: Path, name: str, *, limit: int) -> str | None:
    """The text of the checkpoint file `name`; None where there is none."""
    path = root / name
    try:
        data = read_checkpoint_file(root, name, limit=limit)
    except FileNotFoundError:
        return None
    except ValueError as err:  # CheckpointFileError: refused (outside the folder, not a file, too big)
        raise TokenizerLoadError(str(err)) from err
    except OSError as err:
        raise TokenizerLoadError(f"{path}: cannot read it ({err})") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerLoadError(f"{path}: not UTF-8 text ({err})") from err


def _read_config(root: Path) -> dict[str, Any]:
    path = root / TOKENIZER_CONFIG_FILE
    text = _read_text(root, TOKENIZER_CONFIG_FILE, limit=MAX_TOKENIZER_CONFIG_BYTES)
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise TokenizerLoadError(f"{path}: not JSON ({err})") from err
    if not isinstance(config, dict):
        raise TokenizerLoadError(f"{path}: {_json_kind(config)}, not a JSON object")
    return config


def _find_template(root: Path, config: Mapping[str, Any]) -> tuple[str | None, str, str | None]:
    """The chat template: (its text, where it is, why it cannot be used). tokenizer_config.json's
    `chat_template` (a string, or transformers' list of named templates, of which "default"), else
    chat_template.jinja."""
    value = config.get("chat_template")
    where = f"{root / TOKENIZER_CONFIG_FILE} field chat_template"
    problem = None
    if isinstance(value, str):
        return value, where, None
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        for i, entry in enumerate(value):
            if isinstance(entry, dict) and entry.get("name") == "default":
                template = entry.get("template")
                if isinstance(template, str):
                    return template, f"{where}[{i}]", None
                problem = f"{where}[{i}].template is {_json_kind(template)}, not a string"
                break
        else:
            problem = f"{where} lists no template named 'default'"
    elif value is not None:
        problem = f"{where} is {_json_kind(value)}, not a string"
    try:
        jinja = _read_text(root, CHAT_TEMPLATE_FILE, limit=MAX_CHAT_TEMPLATE_BYTES)
    except TokenizerLoadError as err:  # refused (a link out of the folder, too big) or not UTF-8
        return None, where, problem or str(err)
    if jinja is not None:
        return jinja, str(root / CHAT_TEMPLATE_FILE), None
    return None, where, problem
