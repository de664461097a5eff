"""A stand-in `kubectl` for the plugin's command tests: `get RESOURCE NAME [--ignore-not-found] -o json`
answered from a JSON file of objects, each argv logged; errors worded as kubectl words them.

`install(tmp_path, objects)` writes it as an executable named kubectl and returns its log's path; put
tmp_path first on PATH. The objects are keyed "RESOURCE/NAMESPACE/NAME"; a key "!error" makes every
call fail with that text (a cluster that is unreachable or forbids the read).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCRIPT = """#!{python}
import json, sys
sys.path.insert(0, {here!r})
from fake_kubectl import serve
sys.exit(serve(sys.argv[1:], {objects!r}, {log!r}))
"""


def install(directory: Path, objects: dict[str, Any]) -> Path:
    store, log = directory / "objects.json", directory / "kubectl.log"
    store.write_text(json.dumps(objects))
    log.write_text("")
    exe = directory / "kubectl"
    exe.write_text(
        SCRIPT.format(
            python=sys.executable, here=str(Path(__file__).parent), objects=str(store), log=str(log)
        )
    )
    exe.chmod(0o755)
    return log


def _value(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
    return None


def serve(argv: list[str], store: str, log: str) -> int:
    with open(log, "a") as f:
        f.write(json.dumps(argv) + "\n")
    objects = json.loads(Path(store).read_text())
    if "!error" in objects:
        sys.stderr.write(
            f"E1129 06:00:00.000 memcache.go:265] couldn't get resource list\n{objects['!error']}\n"
        )
        return 1
    i = argv.index("get")
    resource, name = argv[i + 1], argv[i + 2]
    namespace = _value(argv, "--namespace", "-n") or "default"
    obj = objects.get(f"{resource}/{namespace}/{name}")
    if obj is None:
        if "--ignore-not-found" in argv:
            return 0
        sys.stderr.write(f'Error from server (NotFound): {resource} "{name}" not found\n')
        return 1
    sys.stdout.write(json.dumps(obj))
    return 0
