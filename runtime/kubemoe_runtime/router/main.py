"""`kubemoe-runtime serve --role router ...`: flags, settings, and the uvicorn server.

    kubemoe-runtime serve --role router --served-model-name NAME --host H --port P --policy POLICY
        (--prefill-service HOST:PORT[,HOST:PORT] --decode-service HOST:PORT[,...] | --worker-service ...)
        [--api-key-file PATH] [--refresh-interval S] [--health-interval S] [--max-attempts N]
        [--upstream-read-timeout S] [--request-timeout S] [--client-write-timeout S] [--drain-timeout S]
        [--pd-min-prompt-tokens N]

A HOST is resolved again every --refresh-interval seconds (a headless Service's DNS answers are its
ready pods); engine flags the operator may render for other roles are ignored with a warning.
Disaggregated, the router signs the KV hand-off with the key in $KUBEMOE_KV_KEY (pod/kv_auth.py) and does not
start without one. On SIGTERM the router drains (pod/drain.py): /ready and new requests get 503 (the
front Service stops sending it any), requests in flight (streams included) finish, up to --drain-timeout;
those still in flight then are answered 503 there and then (a stream with an error event and [DONE]:
in_flight.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kubemoe_runtime.pod.drain import (
    Drain,
    DrainingServer,
    DrainMiddleware,
    drain_timeout_default,
)
from kubemoe_runtime.pod.http_server import server_config
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV, KVSigner
from kubemoe_runtime.router.app import build_router_app
from kubemoe_runtime.router.auth import ApiKeys
from kubemoe_runtime.router.backends import Backends, split_hostport
from kubemoe_runtime.router.metrics import RouterMetrics
from kubemoe_runtime.router.policies import POLICIES, make_policy
from kubemoe_runtime.router.proxy import REQUEST_TIMEOUT_S, Router, RouterConfig, roles_for
from kubemoe_runtime.router.relay import WRITE_TIMEOUT_S
from kubemoe_runtime.router.upstream import READ_TIMEOUT_S


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    served_model_names: tuple[str, ...]
    host: str
    port: int = Field(ge=0, le=65535)
    policy: str
    services: dict[str, tuple[str, ...]]
    api_key_file: Path | None = None
    refresh_interval: float = Field(gt=0)
    health_interval: float = Field(gt=0)
    max_attempts: int = Field(ge=1)
    upstream_read_timeout: float = Field(default=READ_TIMEOUT_S, gt=0)
    request_timeout: float = Field(default=REQUEST_TIMEOUT_S, gt=0)
    client_write_timeout: float = Field(default=WRITE_TIMEOUT_S, gt=0, allow_inf_nan=False)
    pd_min_prompt_tokens: int = Field(default=0, ge=0)
    drain_timeout: float = Field(default_factory=drain_timeout_default, ge=0, allow_inf_nan=False)

    @property
    def disaggregated(self) -> bool:
        return "prefill" in self.services

    @model_validator(mode="after")
    def _roles(self) -> RouterSettings:
        roles = set(self.services)
        if roles not in ({"prefill", "decode"}, {"worker"}):
            raise ValueError(
                "give --prefill-service and --decode-service (disaggregated) or --worker-service (colocated)"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}")
        for entries in self.services.values():
            for entry in entries:
                for part in entry.split(","):
                    split_hostport(part)
        return self


def parse_args(argv: Sequence[str]) -> tuple[RouterSettings, list[str]]:
    parser = argparse.ArgumentParser(prog="kubemoe-runtime serve --role router")
    parser.add_argument("--role", choices=("router",), required=True)
    parser.add_argument("--served-model-name", nargs="+", default=[])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--policy", default="least-load", help=" | ".join(POLICIES))
    for role in ("prefill", "decode", "worker"):
        parser.add_argument(f"--{role}-service", action="append", default=[], metavar="HOST:PORT[,HOST:PORT]")
    parser.add_argument("--api-key-file", type=Path, default=None, help="one key per line")
    parser.add_argument("--refresh-interval", type=float, default=5.0, help="seconds between DNS look-ups")
    parser.add_argument("--health-interval", type=float, default=1.0, help="seconds between health probes")
    parser.add_argument("--max-attempts", type=int, default=3, help="backends tried per request and role")
    parser.add_argument(
        "--upstream-read-timeout",
        type=float,
        default=READ_TIMEOUT_S,
        help="seconds a backend may send nothing (a non-streaming answer's head comes once it is generated)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=REQUEST_TIMEOUT_S, help="seconds a request may take in all"
    )
    parser.add_argument(
        "--client-write-timeout",
        type=float,
        default=WRITE_TIMEOUT_S,
        help="seconds a client may take none of a streamed answer (it stopped reading): then it is given up",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=drain_timeout_default(),
        help="seconds requests in flight may take to finish after SIGTERM (pod/drain.py)",
    )
    parser.add_argument(
        "--pd-min-prompt-tokens",
        type=int,
        default=0,
        help="disaggregated: prompts estimated shorter go to a decode alone (it prefills them); 0: all P/D",
    )
    args, unknown = parser.parse_known_args(list(argv))
    services = {
        role: tuple(getattr(args, f"{role}_service"))
        for role in ("prefill", "decode", "worker")
        if getattr(args, f"{role}_service")
    }
    settings = RouterSettings(
        served_model_names=tuple(args.served_model_name),
        host=args.host,
        port=args.port,
        policy=args.policy,
        services=services,
        api_key_file=args.api_key_file,
        refresh_interval=args.refresh_interval,
        health_interval=args.health_interval,
        max_attempts=args.max_attempts,
        upstream_read_timeout=args.upstream_read_timeout,
        request_timeout=args.request_timeout,
        client_write_timeout=args.client_write_timeout,
        drain_timeout=args.drain_timeout,
        pd_min_prompt_tokens=args.pd_min_prompt_tokens,
    )
    return settings, unknown


def build(settings: RouterSettings, *, environ: Mapping[str, str] | None = None) -> Router:
    """The router; ValueError if it is disaggregated without a usable KV key."""
    signer = KVSigner.from_env(os.environ if environ is None else environ)
    if settings.disaggregated and signer is None:
        raise ValueError(
            f"disaggregated serving signs the KV hand-off: set {KV_KEY_ENV} (the same secret on the router "
            "and on every prefill and decode pod)"
        )
    metrics = RouterMetrics()
    backends = Backends(
        dict(settings.services),
        metrics=metrics,
        refresh_s=settings.refresh_interval,
        health_s=settings.health_interval,
    )
    roles = roles_for(disaggregated=settings.disaggregated)
    config = RouterConfig(
        served_names=settings.served_model_names,
        disaggregated=settings.disaggregated,
        policies={role: make_policy(settings.policy) for role in roles},
        max_attempts=settings.max_attempts,
        api_keys=ApiKeys(settings.api_key_file) if settings.api_key_file is not None else None,
        kv_signer=signer,
        read_timeout=settings.upstream_read_timeout,
        request_timeout=settings.request_timeout,
        write_timeout=settings.client_write_timeout,
        pd_min_prompt_tokens=settings.pd_min_prompt_tokens,
    )
    return Router(config, backends=backends, metrics=metrics)


def main(argv: Sequence[str]) -> int:
    try:
        settings, unknown = parse_args(argv)
        router = build(settings)
    except ValidationError as err:
        for problem in err.errors(include_url=False):
            print(f"error: {problem['msg']}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: --api-key-file: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if unknown:
        print(f"warning: the router ignores: {' '.join(unknown)}", file=sys.stderr)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    mode = "disaggregated" if settings.disaggregated else "colocated"
    logging.getLogger("kubemoe_runtime.router").warning(
        "router: %s, policy %s, listening on %s:%d", mode, settings.policy, settings.host, settings.port
    )
    drain = Drain()
    app = DrainMiddleware(build_router_app(router), drain)
    config = server_config(app, host=settings.host, port=settings.port, lifespan="on")
    DrainingServer(config, drain=drain, timeout=settings.drain_timeout, on_timeout=router.end_in_flight).run()
    return 0
