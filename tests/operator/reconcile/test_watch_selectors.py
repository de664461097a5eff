"""The API server filters the operator's watches of child kinds by the deployment label.

kopf applies a handler's `labels=` in the operator, after it listed and watched every object of the
kind; only `settings.watching.label_selectors` reaches the API server (as the LIST's and WATCH's
labelSelector). So with `watchNamespace: ''` the child handlers alone listed every ConfigMap, Service,
Job... of the cluster and kept kopf's memory of each. The startup handler sets a selector for each
child kind, and for nothing else: a handler that must see unlabelled objects keeps seeing them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import kopf
from kopf._cogs.structs.references import Resource, Selector
from kopf._core.intents.causes import Activity

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT
from kubemoe_operator.api.resource import GROUP, KIND, PLURAL, VERSION
from kubemoe_operator.catalog import load_catalog
from kubemoe_operator.kube.kinds import CHILD_KINDS, POD
from kubemoe_operator.reconcile.handlers import (
    WATCH_CHUNK_SIZE,
    OperatorState,
    build_registry,
    child_resource,
    watch_labelled_children,
)
from kubemoe_operator.reconcile.reconcile import ReconcileContext
from kubemoe_operator.run.settings import OperatorSettings
from tests.operator.reconcile.memory_kube import MemoryKube

MODEL_DEPLOYMENT = Resource(GROUP, VERSION, PLURAL, kind=KIND, namespaced=True, preferred=True)


def _resource(group: str, version: str, plural: str, kind: str = "") -> Resource:
    return Resource(group, version, plural, kind=kind or None, namespaced=True, preferred=True)


def _selectors(settings: kopf.OperatorSettings, resource: Resource) -> list[str]:
    """The labelSelector kopf's LIST and WATCH of `resource` carry (fetching.py, watching.py)."""
    return sorted(set(settings.watching.label_selectors.collect(resource)))


def _state() -> OperatorState:
    return OperatorState(
        kube=MemoryKube(),
        context=ReconcileContext(catalog=load_catalog(), image="runtime:test"),
        settings=OperatorSettings(),
    )


async def _started_settings() -> kopf.OperatorSettings:
    """The settings after the registry's startup handlers ran, as kopf runs them before any watch."""
    state = _state()
    registry = build_registry(state)
    settings = kopf.OperatorSettings()
    handlers = registry._activities.get_handlers(activity=Activity.STARTUP)
    assert handlers
    try:
        for handler in handlers:
            fn: Callable[..., Any] = handler.fn  # ours take settings and **_
            result = fn(settings=settings, logger=logging.getLogger("test"), memo=None)
            if asyncio.iscoroutine(result):
                await result
    finally:
        if state.resync is not None:
            state.resync.cancel()
    return settings


def test_each_child_kind_gets_the_label_selector() -> None:
    settings = kopf.OperatorSettings()
    watch_labelled_children(settings)
    for kind in CHILD_KINDS:
        group, version, plural = child_resource(kind)
        assert _selectors(settings, _resource(group, version, plural, kind.kind)) == [LABEL_DEPLOYMENT], kind
    # Nothing else: the ModelDeployments (unlabelled) are watched whole, and so is any other kind.
    assert _selectors(settings, MODEL_DEPLOYMENT) == []
    assert _selectors(settings, _resource(*child_resource(POD), "Pod")) == []
    assert _selectors(settings, _resource("", "v1", "secrets", "Secret")) == []
    assert _selectors(settings, _resource("coordination.k8s.io", "v1", "leases", "Lease")) == []
    assert _selectors(settings, _resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")) == []
    assert _selectors(settings, _resource("", "v1", "namespaces", "Namespace")) == []
    # a kind of the same name in another group (metrics.k8s.io's pods, a CRD's "services") is not a child
    assert _selectors(settings, _resource("example.com", "v1", "services", "Service")) == []
    assert settings.watching.chunk_size == WATCH_CHUNK_SIZE


async def test_the_startup_handler_sets_them_before_the_watches_start() -> None:
    settings = await _started_settings()
    assert settings.posting.enabled is False
    assert settings.watching.chunk_size == WATCH_CHUNK_SIZE
    for kind in CHILD_KINDS:
        group, version, plural = child_resource(kind)
        assert _selectors(settings, _resource(group, version, plural, kind.kind)) == [LABEL_DEPLOYMENT]
    assert _selectors(settings, MODEL_DEPLOYMENT) == []


async def test_a_selector_only_where_every_handler_of_the_kind_filters_on_the_label() -> None:
    """A server-side selector hides the unlabelled objects from every handler of the kind: each
    watched kind with a selector has only handlers that want the labelled objects, and every kind
    whose handler filters on the label has the selector."""
    settings = await _started_settings()
    registry = build_registry(_state())
    handlers = [*registry._watching._handlers, *registry._changing._handlers]
    assert handlers
    seen = set()
    for handler in handlers:
        selector = handler.selector
        assert isinstance(selector, Selector)
        assert selector.group is not None
        assert selector.version is not None
        name = selector.plural or selector.any_name
        assert isinstance(name, str)
        resource = _resource(selector.group, selector.version, name)
        labelled = dict(handler.labels or {}) == {LABEL_DEPLOYMENT: kopf.PRESENT}
        assert _selectors(settings, resource) == ([LABEL_DEPLOYMENT] if labelled else []), handler.id
        seen.add((selector.group, selector.version, name, labelled))
    assert {(g, v, p) for g, v, p, labelled in seen if labelled} == {child_resource(k) for k in CHILD_KINDS}
    assert (GROUP, VERSION, PLURAL, False) in seen
