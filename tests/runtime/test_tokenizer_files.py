"""TextTokenizer.load (serve/tokenizer.py) reads a checkpoint's tokenizer files as untrusted input: a
tokenizer.json or tokenizer_config.json it cannot use stops the load with an error naming the file (and the
field); a chat template it cannot use fails only chat requests, with an error naming the file, the field and
the line; each file must be a regular file inside the checkpoint folder, under a size limit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from kubemoe_runtime.engines.torch.serve import tokenizer as tokenizer_module
from kubemoe_runtime.engines.torch.serve.chat_template import ChatTemplateError
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer, TokenizerLoadError
from tests.runtime.bounded_call import call_within

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "hello"}]


def checkpoint(root: Path, *, config: object = None, config_text: str | None = None) -> Path:
    """A folder with a tiny tokenizer.json and, given one, tokenizer_config.json."""
    root.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(root / "tokenizer.json"))
    if config is not None:
        config_text = json.dumps(config)
    if config_text is not None:
        (root / "tokenizer_config.json").write_text(config_text)
    return root


def load_within(root: Path, seconds: float = 30) -> TextTokenizer:
    """TextTokenizer.load, given `seconds` (opening a FIFO may wait for a writer forever)."""
    return call_within(lambda: TextTokenizer.load(root), seconds=seconds, what="TextTokenizer.load")


def test_a_checkpoint_loads_with_its_template_and_special_tokens(tmp_path: Path) -> None:
    root = checkpoint(tmp_path, config={"chat_template": CHATML, "eos_token": {"content": "</s>"}})
    tok = TextTokenizer.load(root)
    assert tok.encode("hello world") == [1, 2]
    assert tok.special == {"eos_token": "</s>"}
    assert tok.apply_chat_template(MESSAGES) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "tokenizer_config.json: an array, not a JSON object"),
        ('"chat"', "tokenizer_config.json: a string, not a JSON object"),
        ("{bad", "tokenizer_config.json: not JSON"),
        ("[" * 100_000, "tokenizer_config.json: not JSON"),
    ],
)
def test_a_tokenizer_config_that_is_no_json_object_is_named(tmp_path: Path, text: str, problem: str) -> None:
    root = checkpoint(tmp_path, config_text=text)
    with pytest.raises(TokenizerLoadError, match=problem) as caught:
        TextTokenizer.load(root)
    assert str(caught.value).startswith(str(root / "tokenizer_config.json"))


def test_a_tokenizer_config_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    root = checkpoint(tmp_path)
    (root / "tokenizer_config.json").write_bytes(b'{"chat_template": "\xff"}')
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json: not UTF-8"):
        TextTokenizer.load(root)


def test_a_missing_or_broken_tokenizer_json_is_named(tmp_path: Path) -> None:
    root = checkpoint(tmp_path)
    (root / "tokenizer.json").write_text('{"model": 5}')
    with pytest.raises(TokenizerLoadError, match=r"tokenizer\.json: not a tokenizer"):
        TextTokenizer.load(root)
    (root / "tokenizer.json").unlink()
    with pytest.raises(TokenizerLoadError, match=r"tokenizer\.json: no such file"):
        TextTokenizer.load(root)


def test_a_template_that_does_not_compile_fails_only_chat_requests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = checkpoint(tmp_path, config={"chat_template": "{% for m in messages %}\n{% for %}"})
    tok = TextTokenizer.load(root)  # before: TemplateSyntaxError, and the API pod did not start
    assert tok.decode(tok.encode("hello world")) == "hello world"  # /v1/completions is served
    expected = (
        f"this model's chat template cannot be used: {root / 'tokenizer_config.json'} field chat_template "
        "does not compile at line 2: Expected an expression, got 'end of statement block'"
    )
    with pytest.raises(ChatTemplateError) as caught:
        tok.apply_chat_template(MESSAGES)
    assert str(caught.value) == expected
    assert "chat requests will fail" in caplog.text  # and the pod's log says so at start


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (5, "field chat_template is a number, not a string"),
        ({"default": CHATML}, "field chat_template is an object, not a string"),
        ([{"name": "tool_use", "template": CHATML}], "field chat_template lists no template named 'default'"),
        (
            [{"name": "default", "template": 1}],
            r"field chat_template\[0\]\.template is a number, not a string",
        ),
    ],
)
def test_a_chat_template_field_of_the_wrong_type_is_named(
    tmp_path: Path, value: object, problem: str
) -> None:
    tok = TextTokenizer.load(checkpoint(tmp_path, config={"chat_template": value}))
    with pytest.raises(ChatTemplateError, match=f"cannot be used: .*tokenizer_config.json {problem}"):
        tok.apply_chat_template(MESSAGES)


def test_named_templates_use_the_default_one(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML}]
    tok = TextTokenizer.load(checkpoint(tmp_path, config={"chat_template": named}))
    assert tok.apply_chat_template(MESSAGES).startswith("<|im_start|>user\nhello")


def test_chat_template_jinja_serves_when_the_config_has_none(tmp_path: Path) -> None:
    root = checkpoint(tmp_path, config={"eos_token": "</s>"})
    (root / "chat_template.jinja").write_text(CHATML)
    assert TextTokenizer.load(root).apply_chat_template(MESSAGES).endswith("<|im_start|>assistant\n")
    (root / "chat_template.jinja").write_text("{{ 1 // 0 }")
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja does not compile at line 1"):
        TextTokenizer.load(root).apply_chat_template(MESSAGES)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_link_out_of_the_checkpoint_folder_is_refused(tmp_path: Path, name: str) -> None:
    elsewhere = checkpoint(tmp_path / "elsewhere", config={"chat_template": CHATML})
    root = checkpoint(tmp_path / "model", config={})
    (root / name).unlink()
    (root / name).symlink_to(elsewhere / name)
    with pytest.raises(TokenizerLoadError, match=f"{root / name}: .*outside the checkpoint folder"):
        TextTokenizer.load(root)


def test_a_chat_template_jinja_linked_out_of_the_folder_fails_only_chat_requests(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("{{ 'not a template of this checkpoint' }}")
    root = checkpoint(tmp_path / "model", config={})
    (root / "chat_template.jinja").symlink_to(tmp_path / "secret.txt")
    tok = TextTokenizer.load(root)
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja: .*outside the checkpoint folder"):
        tok.apply_chat_template(MESSAGES)


def test_a_hugging_face_cache_snapshots_links_into_its_blobs_are_followed(tmp_path: Path) -> None:
    checkpoint(tmp_path / "models--org--tiny" / "blobs", config={"chat_template": CHATML})
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).symlink_to(Path("../../blobs") / name)
    assert TextTokenizer.load(snapshot).apply_chat_template(MESSAGES).startswith("<|im_start|>user")


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    root = checkpoint(tmp_path)
    os.mkfifo(root / "tokenizer_config.json")  # before: read_text() waited for a writer forever
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json: not a regular file"):
        load_within(root)


@pytest.mark.parametrize(
    ("name", "limit"),
    [("tokenizer.json", "MAX_TOKENIZER_BYTES"), ("tokenizer_config.json", "MAX_TOKENIZER_CONFIG_BYTES")],
)
def test_a_file_over_its_size_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, limit: str
) -> None:
    root = checkpoint(tmp_path, config={"chat_template": CHATML})
    size = (root / name).stat().st_size
    monkeypatch.setattr(tokenizer_module, limit, size - 1)
    with pytest.raises(TokenizerLoadError, match=f"{root / name}: over the {size - 1}-byte limit"):
        TextTokenizer.load(root)


def test_a_chat_template_jinja_over_its_size_limit_fails_only_chat_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = checkpoint(tmp_path, config={})
    (root / "chat_template.jinja").write_text(CHATML + " " * 2000)
    monkeypatch.setattr(tokenizer_module, "MAX_CHAT_TEMPLATE_BYTES", 1000)
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja: over the 1000-byte limit"):
        TextTokenizer.load(root).apply_chat_template(MESSAGES)
