"""vLLM's LMCache connector between prefill and decode: the prefill's LMCache stores a prompt's KV in a
store, the decode's loads it from there by hashes of the tokens. Both roles must name one store and
hash alike, or the decode finds nothing and silently recomputes every prompt
(examples/mixtral-8x22b-lmcache.yaml). What can be seen in the spec is checked here; a value from a
ConfigMap or Secret (pod.envFrom, valueFrom) cannot be, and is trusted."""

from __future__ import annotations

from kubemoe_operator.api.problems import Problem
from kubemoe_operator.api.spec import ModelDeploymentSpec, RoleSpec

STORE_VARIABLES = ("LMCACHE_REMOTE_URL", "LMCACHE_CONFIG_FILE")
"""Either names LMCache's shared store: the URL itself, or LMCache's YAML settings (remote_url)."""
HASH_SEED = "PYTHONHASHSEED"
DEFAULT_HASH_SEED = "0"
"""What the operator sets PYTHONHASHSEED to in both roles where the role's pod.env does not: vLLM and
LMCache seed their token-chunk hashes from it, and an unset one differs in every process."""
EXAMPLE = "examples/mixtral-8x22b-lmcache.yaml"


def uses_lmcache(spec: ModelDeploymentSpec) -> bool:
    return (
        spec.engine.kind == "vllm"
        and spec.serving.mode == "disaggregated"
        and spec.serving.kv_transfer.connector == "lmcache"
    )


def _literal(role: RoleSpec, name: str) -> str | None:
    """The value pod.env gives `name` directly (None: not given, or from a ConfigMap/Secret)."""
    env = role.pod.env if role.pod is not None else []
    return next((e.value for e in env if e.name == name), None)


def _names(role: RoleSpec) -> set[str]:
    return {e.name for e in role.pod.env} if role.pod is not None else set()


def hash_seed_env(spec: ModelDeploymentSpec, role: str) -> list[dict[str, str]]:
    """PYTHONHASHSEED for the engine container of `role`, where LMCache hands the KV over and the
    role's pod.env leaves it out (env wins over envFrom: set another seed in pod.env, in both roles)."""
    role_spec = next((given for name, given in spec.roles.items() if name == role), None)
    if not uses_lmcache(spec) or (role_spec is not None and HASH_SEED in _names(role_spec)):
        return []
    return [{"name": HASH_SEED, "value": DEFAULT_HASH_SEED}]


def lmcache_problems(spec: ModelDeploymentSpec) -> list[Problem]:
    """A role that names no store, two roles that name different ones, or different hash seeds."""
    if not uses_lmcache(spec) or spec.roles.prefill is None or spec.roles.decode is None:
        return []
    roles = {"prefill": spec.roles.prefill, "decode": spec.roles.decode}
    out = []
    for name, role in roles.items():
        env_from = role.pod.env_from if role.pod is not None else []
        if not env_from and not _names(role) & set(STORE_VARIABLES):
            out.append(
                Problem(
                    field=f"spec.roles.{name}.pod.env",
                    message="serving.kvTransfer.connector lmcache hands the KV over through a store "
                    "both roles reach, and this role names none (LMCACHE_REMOTE_URL or "
                    "LMCACHE_CONFIG_FILE): its LMCache would keep the KV in its own memory and the "
                    "decode recompute every prompt.",
                    fix="set LMCACHE_REMOTE_URL (the same store in prefill and decode, e.g. "
                    "redis://HOST:6379) in the pod.env of both roles, or LMCACHE_CONFIG_FILE, or give "
                    f"it through pod.envFrom; see {EXAMPLE}.",
                )
            )
    for name, default in (("LMCACHE_REMOTE_URL", None), (HASH_SEED, DEFAULT_HASH_SEED)):
        prefill = _literal(roles["prefill"], name) if name in _names(roles["prefill"]) else default
        decode = _literal(roles["decode"], name) if name in _names(roles["decode"]) else default
        if prefill is not None and decode is not None and prefill != decode:
            out.append(
                Problem(
                    field=f"spec.roles.decode.pod.env[{name}]",
                    message=f"{name} is {decode!r} in decode but {prefill!r} in prefill: the decode's "
                    "LMCache would never find the KV the prefill stored.",
                    fix=f"give {name} the same value in both roles' pod.env"
                    + (f" (or leave it out of both: the operator sets {default})." if default else "."),
                )
            )
    return out
