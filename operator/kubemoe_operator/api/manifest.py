"""Reading a ModelDeployment manifest into the API model, with errors that name their field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

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
    "string_too_short": "give a non-empty value.",
}


def field_path(loc: tuple[int | str, ...]) -> str:
    """('spec', 'engine', 'extraArgs', 0) -> 'spec.engine.extraArgs[0]'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _UNION_TAGS:
            path += f".{part}" if path else part
    return path or "(root)"


def _problem(error: ErrorDetails) -> Problem:
    field = field_path(error["loc"])
    message = error["msg"].removeprefix("Value error, ").rstrip(".") + "."
    if error["type"] == "extra_forbidden":
        message = "unknown field."
    explain = "modeldeployments." + ".".join(
        p for p in error["loc"] if isinstance(p, str) and p not in _UNION_TAGS
    )
    fix = _FIXES.get(error["type"], f"see `kubectl explain {explain}`.")
    if field == "metadata.name":
        fix = (
            f"use at most {MAX_NAME_LENGTH} lower-case letters, digits and '-', starting with a letter "
            "(the operator names Services and workloads after it, adding suffixes such as -prefill-12)."
        )
    return Problem(field=field, message=message, fix=fix)


def parse_manifest(data: Any) -> ModelDeployment:
    """Validate a decoded manifest: schema first, then the cross-field rules."""
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
        md = ModelDeployment.model_validate(data)
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
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
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
