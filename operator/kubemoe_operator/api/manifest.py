"""Reading a ModelDeployment manifest into the API model, with errors that name their field."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from kubemoe_operator.api import yaml_read
from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.api.resource import MAX_NAME_LENGTH, ModelDeployment
from kubemoe_operator.api.rules import spec_problems

_UNION_TAGS = frozenset({"int", "str", "float", "bool"})

_FIXES = {
    "extra_forbidden": "remove it; fields are camelCase, check the spelling.",
    "missing": "add it.",
    "string_pattern_mismatch": "match the pattern shown.",
    "literal_error": "use one of the values listed.",
    "int_parsing": "write a whole number.",
    "int_type": "write a whole number.",
    "bool_type": "write true or false.",
    "float_type": "write a number.",
    "string_too_short": "give a non-empty value.",
}
_QUOTED: dict[str, type | tuple[type, ...]] = {"int_type": int, "float_type": (int, float), "bool_type": bool}
"""Type errors whose input may be the right value in quotes (`replicas: "3"`): what it must read as."""


def field_path(loc: tuple[int | str, ...]) -> str:
    """('spec', 'engine', 'extraArgs', 0) -> 'spec.engine.extraArgs[0]'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _UNION_TAGS:
            path += f".{part}" if path else part
    return path or "(root)"


_TOO_DEEP = Problem(
    field="(root)",
    message="nests mappings or lists more than 200 levels deep.",
    fix="nest less; a ModelDeployment needs about 15 levels.",
)


def _unreadable(error: ErrorDetails) -> Problem:
    """The manifest's JSON refused as such (json_invalid): nested too deeply, or text UTF-8 cannot hold
    (a lone surrogate such as "\\ud800")."""
    if "recursion limit" in error["msg"]:
        return _TOO_DEEP
    reason = re.sub(r" at line \d+ column \d+$", "", error["msg"].removeprefix("Invalid JSON: "))
    return Problem(
        field="(root)",
        message=f"cannot be sent to the API server as JSON ({reason}).",
        fix="write its text as UTF-8 (no \\ud800-\\udfff escapes).",
    )


def _problem(error: ErrorDetails) -> Problem:
    if error["type"] == "json_invalid":
        return _unreadable(error)
    field = field_path(error["loc"])
    message = error["msg"].removeprefix("Value error, ").rstrip(".") + "."
    if error["type"] == "extra_forbidden":
        message = "unknown field."
    explain = "modeldeployments." + ".".join(
        p for p in error["loc"] if isinstance(p, str) and p not in _UNION_TAGS
    )
    fix = _FIXES.get(error["type"], f"see `kubectl explain {explain}`.")
    if error["type"] in _QUOTED and isinstance(error["input"], str):
        message = f"{message.rstrip('.')}, not the string {json.dumps(error['input'][:64])}."
        if _reads_as(error["input"], _QUOTED[error["type"]]):
            fix = "write it without quotes (the API server refuses a string here)."
    if error["type"] == "string_type" and isinstance(error["input"], (int, float)):  # bool too
        fix = "quote it: YAML reads an unquoted number, true or false as such, not as text."
    if field == "metadata.name":
        fix = (
            f"use at most {MAX_NAME_LENGTH} lower-case letters, digits and '-', starting with a letter "
            "(the operator names Services and workloads after it, adding suffixes such as -prefill-12)."
        )
    return Problem(field=field, message=message, fix=fix)


def _reads_as(text: str, kind: type | tuple[type, ...]) -> bool:
    """Whether `text`, unquoted, is YAML of `kind` ("3" an int, "false" a bool; a bool is no number)."""
    if len(text) > 64:
        return False
    try:
        value = yaml_read.load(text)
    except yaml.YAMLError:
        return False
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def as_sent(value: Any) -> Any:
    """Decoded YAML as kubectl sends it to the API server, in JSON: a whole float is an integer (Go
    writes 3.0 as 3, and the CRD's integer fields take it), a date (an unquoted 2026-01-01) or
    any other value JSON lacks is text, and so is every mapping key."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):  # a dict, or a view of one (kopf's)
        return {_key(k): as_sent(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_sent(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    return value.isoformat() if isinstance(value, datetime.date) else str(value)


def _key(key: Any) -> str:
    sent = as_sent(key)
    return sent if isinstance(sent, str) else json.dumps(sent)


def parse_manifest(data: Any) -> ModelDeployment:
    """Validate a decoded manifest: schema first, then the cross-field rules. The schema's types are
    checked strictly, as the API server checks the CRD's: `replicas: "3"` or `enabled: "true"` are
    refused (pydantic would read them as 3 and True), enum values and whole numbers for number fields
    are taken. Parsed from JSON, the form the API server receives."""
    if not isinstance(data, dict):
        raise ManifestError(
            [
                Problem(
                    field="(root)",
                    message="a manifest must be a mapping.",
                    fix="write a ModelDeployment object.",
                )
            ]
        )
    try:
        text = json.dumps(as_sent(data))
        md = ModelDeployment.model_validate_json(text, strict=True)
    except RecursionError:
        raise ManifestError([_TOO_DEEP]) from None
    except ValidationError as err:
        raise ManifestError([_problem(e) for e in err.errors(include_url=False)]) from None
    problems = spec_problems(md.spec)
    if problems:
        raise ManifestError(problems)
    return md


def manifest_text(data: bytes, *, source: str) -> str:
    """A manifest's bytes as text (YAML is UTF-8, a BOM allowed); ManifestError naming `source` when
    they are not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ManifestError(
            [
                Problem(
                    field=source,
                    message=f"is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}).",
                    fix="give a YAML manifest saved as UTF-8.",
                )
            ]
        ) from None


def read_manifest_text(path: Path) -> str:
    """The text of the manifest file at `path`; ManifestError naming the file when it cannot be read
    (missing, a directory, unreadable) or is not UTF-8."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ManifestError(
            [Problem(field=str(path), message="is a directory.", fix="give the manifest file itself.")]
        ) from None
    except OSError as err:
        raise ManifestError(
            [
                Problem(
                    field=str(path),
                    message=f"cannot be read: {err.strerror or err}.",
                    fix="check the path and its permissions.",
                )
            ]
        ) from None
    return manifest_text(data, source=str(path))


def manifest_from_text(text: str, *, source: str) -> ModelDeployment:
    """Read the ModelDeployment in YAML text (other kinds of documents beside it are skipped; two
    ModelDeployments are refused); `source` names where the text came from in the problems."""
    try:
        docs = [d for d in yaml_read.load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise ManifestError(
            [Problem(field=source, message=f"not valid YAML: {err}", fix="fix the YAML syntax.")]
        ) from None
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == "ModelDeployment"]
    if len(found) > 1:  # which one was meant? Running only the first would drop the others unsaid.
        metas: list[dict[str, Any]] = [
            d["metadata"] if isinstance(d.get("metadata"), dict) else {} for d in found
        ]
        names = ", ".join(str(m.get("name", "?"))[:63] for m in metas[:5])
        raise ManifestError(
            [
                Problem(
                    field="kind",
                    message=f"{source} holds {len(found)} ModelDeployments ({names}); this takes one.",
                    fix="put each ModelDeployment in a file of its own (kubectl apply takes them all).",
                )
            ]
        )
    if found:
        return parse_manifest(found[0])
    if len(docs) == 1:
        return parse_manifest(docs[0])
    raise ManifestError(
        [
            Problem(
                field="kind", message=f"{source} holds no ModelDeployment.", fix="add kind: ModelDeployment."
            )
        ]
    )


def load_manifest(path: Path) -> ModelDeployment:
    """Read the ModelDeployment in a YAML file (manifest_from_text)."""
    return manifest_from_text(read_manifest_text(path), source=str(path))
