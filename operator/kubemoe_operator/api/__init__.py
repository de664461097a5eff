"""The ModelDeployment API: pydantic models from which the CRD is generated."""

from kubemoe_operator.api.model_config import ModelConfig
from kubemoe_operator.api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION, ModelDeployment
from kubemoe_operator.api.spec import (
    AcceleratorSpec,
    Autoscaling,
    EngineSpec,
    ModelDeploymentSpec,
    ModelSpec,
    Parallelism,
    Roles,
    RoleSpec,
)
from kubemoe_operator.api.status import Condition, ModelDeploymentStatus, RoleStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "AcceleratorSpec",
    "Autoscaling",
    "Condition",
    "EngineSpec",
    "ModelConfig",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelDeploymentStatus",
    "ModelSpec",
    "Parallelism",
    "RoleSpec",
    "RoleStatus",
    "Roles",
]
