"""Hypothesis profiles. Under CI (CI set) the property tests run a fixed set of examples
(derandomize): a landing is decided by the code, not by which inputs a seed happened to draw.
Locally they draw fresh inputs each run, which is how they find new bugs (a failing input is
printed, and kept in .hypothesis/ to replay)."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
