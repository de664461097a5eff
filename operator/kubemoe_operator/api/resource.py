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


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = ""
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
