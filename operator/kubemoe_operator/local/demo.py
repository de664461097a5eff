"""`make demo`: `kubemoe up` the tiny disaggregated example, ask one question through the router with the
official OpenAI client, print the answer and per-role timings, and stop everything.

    python -m kubemoe_operator.local.demo [FILE] [--port PORT]

The `openai` package is a development dependency (`make setup` installs it); the operator image has no
use for it, so it is imported here only.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.local.commands import port_number
from kubemoe_operator.local.stop import signals_ignored

QUESTION = "How do experts route tokens?"


def _kubemoe() -> str:
    sibling = Path(sys.executable).parent / "kubemoe"
    return str(sibling) if sibling.is_file() else "kubemoe"


def _run_name(path: Path) -> list[str]:
    """The run's name for `kubemoe status`/`down` (`kubemoe up` names the run after metadata.name): the
    demo's own run, whatever other runs there are. Empty when the manifest cannot be read (`kubemoe up`
    then says why and starts nothing)."""
    try:
        return [load_manifest(path).metadata.name]
    except (ManifestError, OSError, UnicodeDecodeError):
        return []


def main(argv: Sequence[str] | None = None) -> int:
    """The demo, with errors as one line (the demo's own; `kubemoe up` and `down` print theirs)."""
    try:
        return _demo(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # the OpenAI client's, a status that is not JSON: one line, no traceback
        text = " ".join(str(err).split()) or type(err).__name__
        print(f"kubemoe demo: error: {text}", file=sys.stderr)
        return 1


def _demo(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="kubemoe demo", description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default="examples/tiny-moe.yaml")
    parser.add_argument("--port", type=port_number, default=8000)
    args = parser.parse_args(argv)
    try:
        import openai
    except ImportError:
        print("the demo needs the openai package: pip install openai (make setup does)", file=sys.stderr)
        return 2
    kubemoe = _kubemoe()
    name = _run_name(Path(args.file))
    up = subprocess.run(
        [kubemoe, "up", args.file, "--detach", "--port", str(args.port)], stdout=subprocess.PIPE, text=True
    )
    if up.returncode != 0:
        return up.returncode  # `kubemoe up` stopped whatever it had started
    try:
        status = json.loads(
            subprocess.run(
                [kubemoe, "status", *name, "-o", "json"], stdout=subprocess.PIPE, text=True, check=True
            ).stdout
        )
        client = openai.OpenAI(base_url=status["endpoint"], api_key="demo", max_retries=0, timeout=120)
        start = time.monotonic()
        raw = client.chat.completions.with_raw_response.create(
            model=status["model"],
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=24,
            temperature=0,
        )
        elapsed_ms = (time.monotonic() - start) * 1e3
        completion = raw.parse()
        print(f"\nQ: {QUESTION}")
        print(f"A: {completion.choices[0].message.content!r}  (random weights: the words mean nothing)")
        if completion.usage is not None:
            usage = completion.usage
            print(f"   {usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated")
        print("\nstart-up (process start -> ready):")
        for row in status["processes"]:
            ranks = ",".join(map(str, row["ranks"])) or "-"
            print(f"  {row['name']:<15} ranks {ranks:<4} {row['readySeconds']:.1f}s")
        print("\nthis request (router headers):")
        for header in ("x-kubemoe-prefill-ms", "x-kubemoe-decode-ms", "x-kubemoe-worker-ms"):
            if (value := raw.headers.get(header)) is not None:
                role = header.removeprefix("x-kubemoe-").removesuffix("-ms")
                backend = raw.headers.get(f"x-kubemoe-{role}-backend", "?")
                print(f"  {role:<8} {float(value):7.1f} ms  ({backend})")
        print(f"  total    {elapsed_ms:7.1f} ms  (client side)\n")
    finally:
        # Another Ctrl-C meanwhile must not cut `kubemoe down` short (it inherits SIGINT ignored, too).
        with signals_ignored(signal.SIGINT):
            down = subprocess.run([kubemoe, "down", *name], check=False)
    return 0 if down.returncode == 0 else 1  # `kubemoe down` said what it could not stop


if __name__ == "__main__":
    sys.exit(main())
