"""docs/spec-reference.md, generated from the CRD schema (itself generated from the pydantic models).

`python -m kubemoe_operator.gen.spec_reference docs/spec-reference.md` (run by `make crds`); a unit
test fails when the committed file drifts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from kubemoe_operator.api.engines import ENGINES, describe
from kubemoe_operator.gen.crd import crd


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = node.get("type", "object")
    if kind == "array":
        return f"[]{_type(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node and "properties" not in node:
        return f"map[string]{_type(node['additionalProperties'])}"
    return str(kind)


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    for key, text in (
        ("minimum", ">="),
        ("maximum", "<="),
        ("minLength", "length >="),
        ("maxLength", "length <="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
        ("maxProperties", "entries <="),
    ):
        if key in node:
            exclusive = node.get("exclusive" + key[0].upper() + key[1:]) is True
            parts.append(f"{text.replace('=', '') if exclusive else text} {node[key]}")
    if "default" in node and node["default"] not in ({}, []):
        parts.append(f"default `{json.dumps(node['default'])}`")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rules(node: dict[str, Any]) -> list[str]:
    return [
        f"- {_cell(r['message'])} (`{_cell(r['rule'])}`)" for r in node.get("x-kubernetes-validations", [])
    ]


def _sections(path: str, node: dict[str, Any], out: list[str]) -> None:
    props: dict[str, Any] = node.get("properties", {})
    if not props:
        return
    required = set(node.get("required", []))
    out += ["", f"### `{path}`", ""]
    if node.get("description"):
        out += [_cell(node["description"]), ""]
    out += ["| field | type | required | description | constraints |", "| --- | --- | --- | --- | --- |"]
    children = []
    for name, prop in props.items():
        child = prop.get("items", prop) if prop.get("type") == "array" else prop
        if child.get("type") == "object" and "additionalProperties" in child and "properties" not in child:
            child = child["additionalProperties"]
        out.append(
            f"| `{name}` | {_type(prop)} | {'yes' if name in required else ''} | "
            f"{_cell(prop.get('description', ''))} | {_cell(_constraints(prop))} |"
        )
        if child.get("properties"):
            suffix = "[]" if prop.get("type") == "array" else ("{}" if "additionalProperties" in prop else "")
            children.append((f"{path}.{name}{suffix}", child))
    rules = _rules(node)
    if rules:
        out += ["", "Rules the apiserver enforces:", "", *rules]
    for child_path, child in children:
        _sections(child_path, child, out)


def reference() -> str:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    out = [
        "# ModelDeployment reference (`kubemoe.io/v1alpha1`)",
        "",
        "Generated from the pydantic models by `make crds`; do not edit by hand.",
        "Every field is camelCase; unknown fields are rejected.",
    ]
    out += _engines()
    for part in ("spec", "status"):
        _sections(part, schema["properties"][part], out)
    return "\n".join(out) + "\n"


def _engines() -> list[str]:
    """What each engine.kind supports (api/engines.py: the same table the CRD's rules and the planner
    enforce, and `kubemoe plan` prints)."""
    rows = [describe(e) for e in ENGINES]
    out = [
        "",
        "## Engines",
        "",
        "What each `engine.kind` supports; a manifest asking for more is refused by the API server or",
        "reported as `Planned=False`, naming the field and the fix.",
        "",
        "| | " + " | ".join(f"`{e.kind}`" for e in ENGINES) + " |",
        "|---|" + "---|" * len(ENGINES),
    ]
    for i, (what, _) in enumerate(rows[0]):
        out.append(f"| {what} | " + " | ".join(_cell(row[i][1]) for row in rows) + " |")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/spec-reference.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(reference())
