"""A stand-in `kubectl` for `kubectl moe list`, `status` and `logs`: the reads those commands make, answered
from a JSON store with kubectl's semantics for the flags they use, every argv logged.

    get RESOURCE [NAME] [-l K=V,...] [--field-selector ...] [-A|--all-namespaces] [-n NS] -o json
    logs POD [-c C] [--tail=N] [-f] [-p]                          the pod's log lines
    logs -l K=V,... --prefix [--max-log-requests=N] [-c C] ...   every matching pod's, "[pod/NAME/C] line"

The store: {"objects": {RESOURCE: [obj, ...]}, "logs": {"NS/POD/CONTAINER": "text"}, "error": "..."}; an
"error" makes every call fail with that text, after client-go's noise, as kubectl does (`keyed` builds
one from objects keyed "RESOURCE/NAMESPACE/NAME"). `install` writes it as an executable named kubectl into
a directory (put that first on PATH) and returns the log's path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCRIPT = """#!{python}
import sys
sys.path.insert(0, {here!r})
from kubectl_stub import serve
sys.exit(serve(sys.argv[1:], {store!r}, {log!r}))
"""


def install(directory: Path, store: dict[str, Any]) -> Path:
    data, log = directory / "store.json", directory / "kubectl.log"
    data.write_text(json.dumps(store))
    log.write_text("")
    exe = directory / "kubectl"
    exe.write_text(
        SCRIPT.format(python=sys.executable, here=str(Path(__file__).parent), store=str(data), log=str(log))
    )
    exe.chmod(0o755)
    return log


def keyed(objects: dict[str, Any]) -> dict[str, Any]:
    """A store from objects keyed "RESOURCE/NAMESPACE/NAME", each put at that namespace and name; the key
    "error" passes through."""
    store: dict[str, Any] = {"objects": {}, "logs": {}}
    for key, obj in objects.items():
        if key == "error":
            store["error"] = obj
            continue
        resource, namespace, name = key.split("/")
        placed = {**obj, "metadata": {**obj.get("metadata", {}), "namespace": namespace, "name": name}}
        store["objects"].setdefault(resource, []).append(placed)
    return store


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _value(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _selected(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj["metadata"].get("labels") or {}
    pairs = (term.split("=", 1) for term in selector.split(","))
    return all(labels.get(key) == value for key, value in pairs)


def _positionals(argv: list[str], after: str) -> list[str]:
    """Words after `after` that are neither flags nor flag values."""
    takes_value = {"-l", "-n", "--namespace", "-c", "-o", "--field-selector", "--context", "--kubeconfig"}
    out, skip = [], False
    for arg in argv[argv.index(after) + 1 :]:
        if skip:
            skip = False
        elif arg in takes_value:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def serve(argv: list[str], store_path: str, log: str) -> int:
    with open(log, "a") as f:
        f.write(json.dumps(argv) + "\n")
    store = json.loads(Path(store_path).read_text())
    if "error" in store:
        sys.stderr.write(
            f"E1129 06:00:00.000 memcache.go:265] couldn't get resource list\n{store['error']}\n"
        )
        return 1
    namespace = _value(argv, "-n", "--namespace") or "default"
    every = "-A" in argv or "--all-namespaces" in argv
    selector = _value(argv, "-l")
    if "logs" in argv:
        container = _value(argv, "-c") or "engine"
        names = _positionals(argv, "logs")
        pods = [
            p
            for p in store.get("objects", {}).get("pods", [])
            if p["metadata"].get("namespace", "default") == namespace
            and (p["metadata"]["name"] in names if names else _selected(p, selector))
        ]
        if not pods:
            sys.stderr.write("error: no pods found\n")
            return 1
        for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
            name = pod["metadata"]["name"]
            for line in store.get("logs", {}).get(f"{namespace}/{name}/{container}", "").splitlines():
                prefix = f"[pod/{name}/{container}] " if "--prefix" in argv else ""
                sys.stdout.write(prefix + line + "\n")
        return 0
    words = _positionals(argv, "get")
    resource, name = words[0], words[1] if len(words) > 1 else None
    items = [
        obj
        for obj in store.get("objects", {}).get(resource, [])
        if (every or obj["metadata"].get("namespace", "default") == namespace) and _selected(obj, selector)
    ]
    if name is None:
        sys.stdout.write(json.dumps({"kind": "List", "items": items}))
        return 0
    found = [obj for obj in items if obj["metadata"]["name"] == name]
    if not found:
        if "--ignore-not-found" in argv:
            return 0
        sys.stderr.write(f'Error from server (NotFound): {resource} "{name}" not found\n')
        return 1
    sys.stdout.write(json.dumps(found[0]))
    return 0
