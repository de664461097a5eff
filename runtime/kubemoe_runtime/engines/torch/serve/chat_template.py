"""A checkpoint's chat template, rendered in a bounded sandbox.

A template ships with a checkpoint; it is not trusted code. Jinja's sandbox stops templates from
reaching Python internals but not from spinning: two nested `range(100000)` loops run for hours. So
rendering is bounded inside the sandbox, where the bound stops the render itself (a thread stuck in a
render cannot be killed from outside): every loop iteration (the code generator wraps each `for`
loop's iterable), call and filter counts, and every 1024 counts the render's thread CPU time is
compared with `RENDER_CPU_SECONDS`; the strings, lists and integers a template builds (+, *, **, %, ~,
calls, filters, blocks) and the rendered text have size limits. A render past a limit fails with a
ChatTemplateError, as does anything else a template raises (tokenizer.TextTokenizer turns each into one).
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Rendering bounds. The largest legitimate render (8 MiB of request body, ~280k one-letter messages
# through ChatML) takes under 1 s of CPU here (0.2 s unbounded) and is 8 M characters long.
RENDER_CPU_SECONDS: Final = 5.0
MAX_RENDERED_CHARS: Final = 32 * 1024 * 1024  # the rendered prompt and every string or list built on the way
MAX_INT_BITS: Final = 1 << 16  # integers a template computes (`2 ** 2 ** 40` would take forever)
_CHECK_EVERY: Final = 1024  # counts between two looks at the thread's CPU time (~1 us each)


class ChatTemplateError(ValueError):
    """The checkpoint has no usable chat template, or rendering it failed for these messages."""


class _RenderLimitError(TemplateError):
    """A render went past one of the sandbox's bounds."""


def _raise(message: str) -> None:
    raise TemplateError(message)


# -- Bounded rendering -----------------------------------------------------------------------------


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with every `for` loop's items and every `~` concatenation checked."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):  # `for x in xs` -> `for x in environment.count_items(xs)`
            count = nodes.EnvironmentAttribute("count_items", lineno=loop.iter.lineno)
            loop.iter = nodes.Call(count, [loop.iter], [], None, None, lineno=loop.iter.lineno)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.check_size(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Budget:
    __slots__ = ("cpu_deadline", "cpu_seconds", "ticks")

    def __init__(self, cpu_seconds: float) -> None:
        self.cpu_seconds = cpu_seconds
        self.cpu_deadline = time.thread_time() + cpu_seconds
        self.ticks = 0


_SEQUENCES: Final = (str, bytes, list, tuple)
_SIZED: Final = (*_SEQUENCES, dict, set, frozenset)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment (immutable sandbox, trim_blocks, lstrip_blocks,
    raise_exception), with the work and the memory of one render bounded (the module docstring)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})  # the ones that make big values

    def __init__(self) -> None:
        # optimized=False: no constant folding, so no template code runs while the template compiles.
        super().__init__(trim_blocks=True, lstrip_blocks=True, optimized=False)
        self.globals["raise_exception"] = _raise
        del self.globals["lipsum"]  # lipsum(10**7) is one long call; no chat template uses it
        self.filters = {name: self._counted_filter(f) for name, f in self.filters.items()}
        self._local = threading.local()  # the budget of the render on this thread

    def render_bounded(
        self, template: Any, context: Mapping[str, Any], *, cpu_seconds: float, max_chars: int
    ) -> str:
        self._local.budget = _Budget(cpu_seconds)
        try:
            pieces, length = [], 0
            for piece in template.generate(**context):
                length += len(piece)
                if length > max_chars:
                    raise _RenderLimitError(f"the rendered prompt is over {max_chars} characters")
                self.tick()
                pieces.append(piece)
            return "".join(pieces)
        finally:
            self._local.budget = None

    def tick(self) -> None:
        budget: _Budget | None = self._local.__dict__.get("budget")
        if budget is None:
            return
        budget.ticks += 1
        if budget.ticks % _CHECK_EVERY == 0 and time.thread_time() > budget.cpu_deadline:
            raise _RenderLimitError(
                f"rendering used over {budget.cpu_seconds:g} s of CPU time (does a loop run too long?)"
            )

    def check_size(self, value: Any) -> Any:
        if isinstance(value, _SIZED):
            if len(value) > MAX_RENDERED_CHARS:
                raise _RenderLimitError(f"a value of over {MAX_RENDERED_CHARS} items or characters")
        elif type(value) is int and value.bit_length() > MAX_INT_BITS:
            raise _RenderLimitError(f"an integer of over {MAX_INT_BITS} bits")
        return value

    def concat(self, pieces: Iterable[str]) -> str:  # a macro's, a block's, a `{% set %}` block's text
        pieces = list(pieces)
        if sum(map(len, pieces)) > MAX_RENDERED_CHARS:  # before the join copies them
            raise _RenderLimitError(f"a value of over {MAX_RENDERED_CHARS} items or characters")
        return "".join(pieces)

    def count_items(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.tick()
            yield item

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.tick()
        _check_widths(args, kwargs)
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format (wrap_str_format)
        if getattr(method, "__name__", None) in ("format", "format_map"):
            fmt = getattr(method, "__self__", None)
            if isinstance(fmt, str):
                _check_format(fmt)
        if isinstance(obj, LoopContext) and len(args) == 1:  # a recursive loop's `loop(children)`
            args = (self.count_items(args[0]),)
        return self.check_size(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        # No tick: an operator repeats only in a loop, which ticks. ChatML has 4 `+` a message: kept cheap.
        if operator == "+":
            result = left + right
            fits = type(result) is str and len(result) <= MAX_RENDERED_CHARS
            return result if fits else self.check_size(result)
        if operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            if (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
                raise _RenderLimitError(f"an integer of over {MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):  # "%300000000s" % x pads before any check
            _check_format(left)
            _check_widths(right if isinstance(right, tuple) else (right,), {})
        elif operator == "*":
            for seq, times in ((left, right), (right, left)):  # checked before the copy is made
                if isinstance(seq, _SEQUENCES) and _is_int(times) and len(seq) * times > MAX_RENDERED_CHARS:
                    raise _RenderLimitError(f"a value of over {MAX_RENDERED_CHARS} items or characters")
            if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _RenderLimitError(f"an integer of over {MAX_INT_BITS} bits")
        return self.check_size(self.binop_table[operator](left, right))

    def _counted_filter(self, filter_: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(filter_)  # keeps jinja_pass_arg: how Jinja passes the context to a filter
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.tick()
            _check_widths(args, kwargs)  # `|center(10**9)` pads before any check
            return self.check_size(filter_(*args, **kwargs))

        return counted


def _check_widths(args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse an integer argument past the size bound before a call or filter runs: ljust, rjust, center,
    zfill, expandtabs, indent and the like build a string that long before its size can be checked."""
    for value in (*args, *kwargs.values()):
        if _is_int(value) and abs(value) > MAX_RENDERED_CHARS:
            raise _RenderLimitError(f"an argument of {value} (over {MAX_RENDERED_CHARS}: a size bound)")


_NUMBER = re.compile(r"\d+")


def _check_format(fmt: str) -> None:
    """Refuse a format string ('%Ns', '{:>N}') with a width or precision past the size bound (any number
    in it past the bound: a literal that long in a prompt's format string is no loss)."""
    for digits in _NUMBER.findall(fmt):
        if len(digits) > 12 or int(digits) > MAX_RENDERED_CHARS:
            raise _RenderLimitError(f"a format width of {digits} (over {MAX_RENDERED_CHARS}: a size bound)")


def _template_line(err: BaseException) -> int | None:
    """The template line an error was raised on (Jinja rewrites tracebacks to point into the template)."""
    line, tb = None, err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def describe(err: BaseException) -> str:
    """' at line N: what went wrong' (' at line N' where the line is known)."""
    what = str(err) if isinstance(err, TemplateError) else f"{type(err).__name__}: {err}".rstrip(": ")
    line = err.lineno if isinstance(err, TemplateSyntaxError) else _template_line(err)
    return f" at line {line}: {what}" if line is not None else f": {what}"
