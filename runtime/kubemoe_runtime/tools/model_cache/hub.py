"""Which Hub the fill talks to: HF_ENDPOINT when set, else huggingface.co (huggingface_hub reads HF_TOKEN).

A module of its own: the fill calls it and errors.py names it, and errors.py is below every other module."""

from __future__ import annotations

import os
from typing import Final

DEFAULT_ENDPOINT: Final = "https://huggingface.co"


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT
