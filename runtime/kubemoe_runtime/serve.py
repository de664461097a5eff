"""`kubemoe-runtime serve`: one pod of a serving group, on the torch engine or vLLM.

Reads the pod's argv (pod/settings.py, vLLM's flag names), then runs the torch engine's pod
(engines/torch/serve/pod.py) or vLLM behind a thin front on the same port (engines/vllm/), handing vLLM
every flag the settings do not know.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from kubemoe_runtime.engines.torch.serve.pod import serve
from kubemoe_runtime.engines.vllm import serve_vllm
from kubemoe_runtime.engines.vllm.command import flags_given
from kubemoe_runtime.pod.settings import parse_args
from kubemoe_runtime.pod.start_rank import StartRankError


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
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack
    return serve(settings)
