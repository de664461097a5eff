"""Starting `kubemoe up` as a terminal does, for the tests that Ctrl-C it.

A shell without job control (a CI script's `cmd &`, nohup) starts its children with SIGINT ignored, and
an ignored signal stays ignored across exec: Python then installs no KeyboardInterrupt handler, and the
Ctrl-C these tests send never reaches `kubemoe up`. Pass `preexec_fn=sigint_as_from_a_terminal`."""

from __future__ import annotations

import signal


def sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
