"""The whole `ModelDeployment` object, and its API coordinates."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kubemoe_operator.api.spec import ModelDeploymentSpec
from kubemoe_operator.api.status import ModelDeploymentStatus

GROUP = "kubemoe.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ("md",)
CATEGORIES = ("kubemoe",)

MAX_NAME_LENGTH = 39
"""Longest ModelDeployment name whose children all have valid names. The tightest is a
LeaderWorkerSet group's StatefulSet, `<name>-prefill-<group>`: its pods carry the label
controller-revision-hash=`<statefulset>-<10-char hash>`, which must fit a 63-character label
value, so the StatefulSet name is at most 52; `-prefill` is 8 and `-<group>` up to 5 (1024 groups)."""
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""DNS-1035 label: Service names (each role's headless Service and the router's) must be."""


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(
        "", max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN.replace("^", "^(", 1).replace("$", ")?$")
    )
    """Empty only in a file for `kubemoe plan`; the API server requires one."""
    namespace: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class ModelDeployment(BaseModel):
    """A manifest as written by a user or read from the apiserver."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    api_version: Literal["kubemoe.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["ModelDeployment"]
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None
