"""The project's images (built from its Dockerfiles by e2e/cluster/images.py) in the real nodes'
containerd: built once per test session, imported into any real node that does not hold them."""

from __future__ import annotations

import time

from e2e.cluster import images, lifecycle, realnode

_built: dict[str, images.Image] = {}


def image_ref(cluster_name: str, name: str) -> str:
    """The ref of image `name` ("operator", "runtime-cpu"), built if its inputs changed and
    imported into every real node of the cluster that lacks it; pods use it with
    imagePullPolicy: Never. Checked on every call (one `ctr images ls`): an image imported earlier
    in the session can be gone (deleted by hand, or by a kubelet reclaiming disk), and a pod would
    then fail on ErrImageNeverPull long after the cause."""
    nodes = lifecycle.real_nodes_of(cluster_name)
    if not nodes:  # a pod would then try to pull kubemoe.local/... from off this machine
        raise RuntimeError(f"cluster {cluster_name!r} has no real node here to import {name!r} into")
    if name not in _built:
        _built[name] = images.ensure_images([name])[name]
    image = _built[name]
    for node in nodes:
        if realnode.has_image(node, image.ref):
            continue
        t0 = time.monotonic()
        realnode.import_image(node, image.archive)
        realnode.log(f"imported {image.ref} into {node.node_name} in {time.monotonic() - t0:.1f}s")
    return image.ref
