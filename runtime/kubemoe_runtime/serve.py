"""`kubemoe-runtime serve`: one pod of a serving group, on the torch engine or vLLM.

Reads the pod's argv (pod/settings.py, vLLM's flag names), then runs the torch engine's pod
(engines/torch/serve/pod.py) or vLLM behind a thin front on the same port (engines/vllm/), handing vLLM
every flag the settings do not know.

What stops it from starting is one `error: ...` line on stderr and exit 2, never a traceback: bad flags,
and for the torch engine a --model that is not a checkpoint it can run (checked before any rank starts).
Once it serves, whatever stops it is logged with its traceback: the pod's log is what is left of it.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.serve.pod import serve
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.engines.vllm import serve_vllm
from kubemoe_runtime.engines.vllm.command import flags_given
from kubemoe_runtime.pod.settings import ServeSettings, parse_args
from kubemoe_runtime.pod.start_rank import StartRankError


def model_problem(settings: ServeSettings) -> str | None:
    """Why the torch engine cannot serve --model, before any rank starts; None if it can try."""
    model = settings.model
    if not model.is_dir():
        return f"--model {model}: {'not a directory' if model.exists() else 'no such directory'}"
    try:
        ModelConfig.load(model)
    except (ValueError, OSError) as err:  # ConfigError: no config.json, not JSON, a model it cannot run
        return f"--model: {' '.join(str(err).split())}"
    if not settings.headless and not (model / "tokenizer.json").is_file():
        return f"--model {model}: no tokenizer.json (the pod that serves the API tokenizes)"
    if not settings.headless:
        try:
            TextTokenizer.load(model)  # a tokenizer file it cannot use: said now, not after the ranks start
        except ValueError as err:  # TokenizerLoadError names the file (and the field)
            return f"--model: {' '.join(str(err).split())}"
    return None


def main(argv: Sequence[str]) -> int:
    try:
        settings, unknown = parse_args(argv)
    except ValidationError as err:
        for problem in err.errors(include_url=False):
            where = ".".join(str(p) for p in problem["loc"])
            print(f"error: {where + ': ' if where else ''}{problem['msg']}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as err:
        print(f"error: --kv-transfer-config is not JSON: {err}", file=sys.stderr)
        return 2
    except StartRankError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if settings.engine == "vllm":  # vLLM gets the flags serve does not know, unchanged
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        return serve_vllm(settings, given=flags_given(argv), extra=unknown)
    if unknown:
        print(f"warning: ignoring flags the torch engine does not use: {' '.join(unknown)}", file=sys.stderr)
    if refused := model_problem(settings):
        print(f"error: {refused}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack
    return serve(settings)
