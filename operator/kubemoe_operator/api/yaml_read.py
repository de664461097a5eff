"""YAML read as kubectl reads it, so that `kubemoe plan` and `kubemoe up` see the values the API server
gets from `kubectl apply` of the same file.

kubectl turns YAML into JSON with sigs.k8s.io/yaml, whose scalars resolve as go-yaml v2's do; PyYAML's
SafeLoader (YAML 1.1) differs on a few plain (unquoted) scalars, and since the manifest's types are
checked strictly (manifest.py), each difference turned into a refusal kubectl does not make, or the
other way round:

    scalar        kubectl (go-yaml v2)     PyYAML SafeLoader
    1e1, 9e-1     the numbers 10, 0.9      text (its floats need a '.')
    y, Y, n, N    true, false              text
    0o17          the integer 15           text
    1:30          text                     90 (a base-60 integer)
    1_0.5         text                     10.5 (no '_' in go-yaml's floats)

`KubectlLoader` resolves ints, floats and bools as go-yaml v2 does (its resolve.go: strconv.ParseInt
with base 0 after removing '_', then yamlStyleFloat, bools of YAML 1.1 with y/n); nulls, dates and
everything else stay SafeLoader's.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

BOOL_TAG = "tag:yaml.org,2002:bool"
INT_TAG = "tag:yaml.org,2002:int"
FLOAT_TAG = "tag:yaml.org,2002:float"

_TRUE = ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")
_FALSE = ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")
_BOOL = re.compile("^(?:" + "|".join(_TRUE + _FALSE) + ")$")
# What strconv.ParseInt(s, 0, 64) takes once '_' is removed: decimal, 0x, 0o, 0b, and a leading 0 for octal.
_INT = re.compile(r"^[-+]?(?:0[bB][01_]+|0[oO][0-7_]+|0[xX][0-9a-fA-F_]+|0[0-7_]*|[1-9][0-9_]*)$")
# go-yaml v2's yamlStyleFloat, and its .inf / .nan spellings.
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class KubectlLoader(yaml.SafeLoader):
    """SafeLoader with go-yaml v2's ints, floats and bools (module docstring)."""

    def construct_yaml_bool(self, node: yaml.Node) -> bool:
        return str(self.construct_scalar(node)) in _TRUE  # type: ignore[arg-type]

    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = str(self.construct_scalar(node)).replace("_", "")  # type: ignore[arg-type]
        sign, digits = (text[0], text[1:]) if text[:1] in "+-" else ("", text)
        if len(digits) > 1 and digits[0] == "0" and digits[1].isdigit():
            digits = "0o" + digits[1:]  # Go's leading-0 octal; Python's int() wants 0o
        return int(sign + digits, 0)

    def construct_yaml_float(self, node: yaml.Node) -> float:
        text = str(self.construct_scalar(node)).lower()  # type: ignore[arg-type]
        if text.endswith(".inf"):
            return float("-inf") if text.startswith("-") else float("inf")
        return float("nan") if text == ".nan" else float(text)


KubectlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (BOOL_TAG, INT_TAG, FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
KubectlLoader.add_implicit_resolver(BOOL_TAG, _BOOL, list("yYnNtTfFoO"))
KubectlLoader.add_implicit_resolver(INT_TAG, _INT, list("-+0123456789"))
KubectlLoader.add_implicit_resolver(FLOAT_TAG, _FLOAT, list("-+.0123456789"))
KubectlLoader.add_constructor(BOOL_TAG, KubectlLoader.construct_yaml_bool)
KubectlLoader.add_constructor(INT_TAG, KubectlLoader.construct_yaml_int)
KubectlLoader.add_constructor(FLOAT_TAG, KubectlLoader.construct_yaml_float)


def load(text: str) -> Any:
    """The one YAML document in `text`, as kubectl reads it."""
    return yaml.load(text, Loader=KubectlLoader)  # a SafeLoader: no Python objects


def load_all(text: str) -> list[Any]:
    """Every YAML document in `text`, as kubectl reads them."""
    return list(yaml.load_all(text, Loader=KubectlLoader))  # a SafeLoader
