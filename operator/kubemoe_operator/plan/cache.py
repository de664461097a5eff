"""Where model.cache puts the model: which claim, and the folder in it (render/model_cache.py fills it).

With a cache the serving pods load the model as they load a pvc:// source: the planner plans, and the
render mounts, `pvc://CLAIM/kubemoe-cache/ORG/NAME` instead of `hf://ORG/NAME`.
"""

from __future__ import annotations

from kubemoe_operator.api.spec import ModelDeploymentSpec

CACHE_FOLDER = "kubemoe-cache"
"""The folder of the claim every cached model goes under (a claim a user brings may hold more)."""


def cache_claim_name(owner: str, spec: ModelDeploymentSpec) -> str | None:
    """The claim the model is cached in: model.cache.claim, or the one the operator creates; None
    without a cache."""
    cache = spec.model.cache
    if cache is None:
        return None
    return cache.claim or f"{owner}-model-cache"


def cache_path(source: str) -> str:
    """The model's folder inside the claim: kubemoe-cache/ORG/NAME[@REVISION]."""
    return f"{CACHE_FOLDER}/{source.removeprefix('hf://')}"


def served_source(owner: str, spec: ModelDeploymentSpec) -> str:
    """What the pods load: spec.model.source, or with a cache the claim's folder as a pvc:// source."""
    claim = cache_claim_name(owner, spec)
    if claim is None:
        return spec.model.source
    return f"pvc://{claim}/{cache_path(spec.model.source)}"
