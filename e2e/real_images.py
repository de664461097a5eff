"""The project's images (built from its Dockerfiles by e2e/cluster/images.py) in the real nodes'
containerd, imported once per test session."""

from __future__ import annotations

import time

from e2e.cluster import images, lifecycle, realnode

_imported: dict[str, str] = {}


def image_ref(cluster_name: str, name: str) -> str:
    """The ref of image `name` ("operator", "runtime-cpu"), built if its inputs changed and
    imported into every real node of the cluster; pods use it with imagePullPolicy: Never."""
    if name not in _imported:
        nodes = lifecycle.real_nodes_of(cluster_name)
        if not nodes:  # a pod would then try to pull kubemoe.local/... from off this machine
            raise RuntimeError(f"cluster {cluster_name!r} has no real node here to import {name!r} into")
        image = images.ensure_images([name])[name]
        for node in nodes:
            t0 = time.monotonic()
            realnode.import_image(node, image.archive)
            realnode.log(f"imported {image.ref} into {node.node_name} in {time.monotonic() - t0:.1f}s")
        _imported[name] = image.ref
    return _imported[name]
