"""The chat template's sandbox (serve/tokenizer.py): a checkpoint's template is untrusted code, so rendering
it is bounded (CPU time, the size of what it builds) where the bound stops the render itself, every error
it raises is a ChatTemplateError (HTTP 400, naming the template line), ordinary templates render exactly as
in Jinja's own sandbox, and the server renders off its event loop, so /health answers meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import pytest
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from starlette.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers

from kubemoe_runtime.engines.torch.serve import chat_template
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app
from kubemoe_runtime.engines.torch.serve.chat_template import ChatTemplateError
from kubemoe_runtime.engines.torch.serve.scheduler import Scheduler
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from tests.runtime.bounded_call import call_within

MESSAGES = [
    {"role": "system", "content": "You route tokens."},
    {"role": "user", "content": "hello experts"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "which expert?"},
]

NESTED_RANGE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def words() -> Tokenizer:
    vocab = {"<unk>": 0, "hello": 1, "experts": 2, "user": 3, "assistant": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk


def with_template(template: str) -> TextTokenizer:
    return TextTokenizer(words(), chat_template=template, special={"eos_token": "</s>"})


def render_within(tok: TextTokenizer, messages: Sequence[Mapping[str, str]], seconds: float) -> str:
    """apply_chat_template, given `seconds` to return or raise (the test fails rather than hangs)."""
    return call_within(lambda: tok.apply_chat_template(messages), seconds=seconds, what="the render")


@pytest.fixture
def low_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template, "RENDER_CPU_SECONDS", 0.3)
    monkeypatch.setattr(chat_template, "MAX_RENDERED_CHARS", 100_000)


LOOPS = {
    "nested ranges": NESTED_RANGE,
    "nested loops over a message": (
        "{% for a in messages[0].content %}{% for b in messages[0].content %}"
        "{% for c in messages[0].content %}{% endfor %}{% endfor %}{% endfor %}"
    ),
    "exponential macro": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    ),
    "recursive loop": (
        "{% for x in [1, 2] recursive %}{% for y in range(100000) %}{% endfor %}"
        "{{ loop([1, 2]) if loop.depth < 40 }}{% endfor %}"
    ),
}


@pytest.mark.usefixtures("low_bounds")
@pytest.mark.parametrize("template", LOOPS.values(), ids=LOOPS.keys())
def test_a_template_that_runs_too_long_is_stopped(template: str) -> None:
    messages = [{"role": "user", "content": "x" * 10_000}]
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=r"at line 1: rendering used over 0\.3 s of CPU time"):
        render_within(with_template(template), messages, seconds=60)
    assert time.monotonic() - start < 30


BIG_VALUES = {
    "repeated string": ("{{ 'x' * 10 ** 10 }}", "a value of over 100000"),
    # padding builds the whole string inside one call: refused from its width, before it allocates
    "percent width": ("{{ ('%3000000000s' % 'a') | length }}", "a format width of 3000000000"),
    "percent star": ("{{ ('%*s' % (3000000000, 'a')) | length }}", "an argument of 3000000000"),
    "center filter": ("{{ ('a' | center(3000000000)) | length }}", "an argument of 3000000000"),
    "ljust": ("{{ 'a'.ljust(3000000000) | length }}", "an argument of 3000000000"),
    "format width": ("{{ '{:>3000000000}'.format('a') | length }}", "a format width of 3000000000"),
    "power": ("{{ 2 ** (2 ** 40) }}", "an integer of over 65536 bits"),
    "squaring": (
        "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
        "an integer of over 65536 bits",
    ),
    "doubling with +": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "a value of over 100000",
    ),
    "doubling with ~": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "a value of over 100000",
    ),
    "doubling in a set block": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set ns.s %}{{ ns.s }}{{ ns.s }}{% endset %}{% endfor %}",
        "a value of over 100000",
    ),
    "doubling with a method": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s.replace('x', 'xx') %}{% endfor %}",
        "a value of over 100000",
    ),
    "doubling with a filter": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s | replace('x', 'xx') %}{% endfor %}",
        "a value of over 100000",
    ),
    "a long prompt": (
        "{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}",
        "the rendered prompt is over 100000 characters",
    ),
}


@pytest.mark.usefixtures("low_bounds")
@pytest.mark.parametrize(("template", "message"), BIG_VALUES.values(), ids=BIG_VALUES.keys())
def test_a_template_that_builds_huge_values_is_stopped(template: str, message: str) -> None:
    with pytest.raises(ChatTemplateError, match=message):
        render_within(with_template(template), MESSAGES, seconds=60)


ERRORS = {
    "division by zero": ("\n{{ 1 // 0 }}", "at line 2: ZeroDivisionError: integer division or modulo"),
    "raise_exception": (
        "{% if messages[0].role != 'user' %}{{ raise_exception('the user speaks first') }}{% endif %}",
        "at line 1: the user speaks first",
    ),
    "a missing attribute's call": ("{{ messages[0].nothing() }}", "at line 1: .* has no attribute 'nothing'"),
    "an unsafe attribute": ("{{ messages.__class__.__subclasses__() }}", "access to attribute"),
    "a type error": ("{{ messages + 1 }}", "at line 1: TypeError"),
    "lipsum, gone": ("{{ lipsum(10 ** 6) }}", "'lipsum' is undefined"),
}


@pytest.mark.parametrize(("template", "message"), ERRORS.values(), ids=ERRORS.keys())
def test_whatever_a_template_raises_is_a_chat_template_error(template: str, message: str) -> None:
    with pytest.raises(ChatTemplateError, match=f"^the chat template failed.*{message}"):
        with_template(template).apply_chat_template(MESSAGES)


ORDINARY = (
    # ChatML, as Qwen ships it
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    # the constructs real templates use: namespace, loop variables, filtered loops, macros, else, filters
    """{%- set ns = namespace(system='', n=0) -%}
{%- macro turn(role, text) -%}[{{ role | upper }}] {{ text | trim }}{% endmacro -%}
{%- for m in messages if m.role == 'system' %}{% set ns.system = m.content %}{% endfor -%}
{{ ns.system | tojson }}
{% for m in messages if m.role != 'system' -%}
{%- set ns.n = ns.n + 1 -%}
{{ loop.index }}/{{ loop.length }} {{ turn(m.role, m.content) }}{% if loop.last %} (last){% endif %}
{% else %}no messages
{% endfor -%}
{{ ns.n }} turns, {{ messages | map(attribute='content') | join(' | ') | length }} chars, {{ '%03d' % 7 }}
{%- for x in [[1, [2, 3]], 4] recursive %}{% if x is iterable %}({{ loop(x) }}){% else %}{{ x }}{% endif %}
{%- endfor %}{{ eos_token }}""",
)


@pytest.mark.parametrize("template", ORDINARY, ids=["chatml", "constructs"])
def test_ordinary_templates_render_as_in_jinjas_sandbox(template: str) -> None:
    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    context = {"messages": MESSAGES, "add_generation_prompt": True, "eos_token": "</s>"}
    expected = env.from_string(template).render(**context)
    assert with_template(template).apply_chat_template(MESSAGES) == expected


# --- through the server ---------------------------------------------------------------------------------


def _state(tok: TextTokenizer) -> ServerState:
    state = ServerState(
        served_names=("tiny",),
        model_path=str(Path("/nonexistent")),
        max_model_len=64,
        vocab_size=tok.vocab_size,
        eos_token_ids=(0,),
        tokenizer=tok,
        metrics=ServingMetrics(MetricLabels.from_env(role="worker", rank=0)),
    )
    state.scheduler = cast(Scheduler, object())  # ready; these requests fail before they reach it
    return state


def _chat(http: TestClient) -> tuple[int, str]:
    response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [MESSAGES[1]]})
    return response.status_code, response.json()["error"]["message"]


def test_a_failing_template_is_a_400_naming_it_not_a_500() -> None:
    with TestClient(build_app(_state(with_template("{{ 1 // 0 }}")))) as http:
        status, message = _chat(http)
    assert status == 400
    assert message == (
        "the chat template failed at line 1: ZeroDivisionError: integer division or modulo by zero"
    )


def test_the_server_renders_off_its_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = with_template("{{ raise_exception('rendered') }}")
    on_event_loop: list[bool] = []
    render = tok.apply_chat_template

    def spy(messages: Sequence[Mapping[str, str]]) -> str:
        try:
            asyncio.get_running_loop()
            on_event_loop.append(True)
        except RuntimeError:
            on_event_loop.append(False)
        return render(messages)

    monkeypatch.setattr(tok, "apply_chat_template", spy)
    with TestClient(build_app(_state(tok))) as http:
        status, _ = _chat(http)
    assert status == 400
    assert on_event_loop == [False]


def test_health_answers_while_a_template_spins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template, "RENDER_CPU_SECONDS", 1.5)
    chat: list[tuple[int, str]] = []
    health: list[float] = []
    with TestClient(build_app(_state(with_template(NESTED_RANGE)))) as http:
        spinning = threading.Thread(target=lambda: chat.append(_chat(http)), daemon=True)
        spinning.start()
        time.sleep(0.3)  # the render is under way

        def probe() -> None:
            start = time.monotonic()
            assert http.get("/health").status_code == 200
            health.append(time.monotonic() - start)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        prober.join(60)
        spinning.join(60)
    [waited] = health
    assert waited < 1.0, "/health waited for the render"
    [(status, message)] = chat
    assert status == 400
    assert "rendering used over 1.5 s of CPU time" in message
