"""Today's autoscaling policy against the one before it (#16), on the same load traces, side by side.

The model: one role, simulated in steps of the autoscaler's interval (INTERVAL_S).

- Load. A trace gives the concurrent streams wanted at each time; streams arrive at the rate that keeps
  that many in flight (Little: c * INTERVAL_S / STREAM_S per interval, open loop: a lost stream is not
  retried) and each lasts STREAM_S. A new stream goes to the least loaded group that serves and does
  not drain; if that group already holds QUEUE_LIMIT streams (its queue is full), it is refused: lost.
- Groups. A group added by the autoscaler serves only LOAD_S later (its weights load first).
- Latency. A group's TTFT p90 grows in proportion to the streams it holds (each engine step serves
  all of them, so a new stream's prefill waits its turn), and is at the target at CAPACITY streams.
  An interval meets the SLO when the p90 over its streams' TTFTs is within the target.
  A refused stream was never admitted, so it shows in no TTFT: a reading tops out at QUEUE_LIMIT /
  CAPACITY times the target, as a capped queue's does.
- The signal. The autoscaler reads ttft-p90, the mean over the groups that serve (loading and
  draining groups report nothing), times a seeded +-5 % noise that both policies see alike.
- Scale-down. Old: the group goes at once (Kubernetes' choice: a loading group first, then the one
  most recently ready) and its streams are lost. New: a loading group goes at once, otherwise the
  least loaded group drains: it takes no new stream, finishes its own (up to DRAIN_TIMEOUT_S, the
  operator's grace; what is left then is lost) and is billed until it goes.

The policies, both through `decide` (operator/kubemoe_operator/autoscale/decide.py), maxStep alike:
- old: ``ceil(current * value / target)`` over the groups that exist, not the ready ones; scale-up
  window 0, scale-down window 300 s, no cooldown, no full window of readings after a start; no drain;
- new: ``ceil(ready * value / target)``; the defaults (scale-up window 60 s, scale-down 600 s,
  cooldown 120 s); a full window of readings after a start; drain on scale-down.

Overshoot is the most groups asked for beyond the most the load had needed so far (ceil(streams /
CAPACITY)). Group-seconds count every group that exists: loading, serving or draining.

Run: `PYTHONPATH=. .venv/bin/python bench/bench_autoscale_policy.py` (`make bench`).
"""

from __future__ import annotations

import math
import platform
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kubemoe_operator.api.spec import Autoscaling, MetricTarget
from kubemoe_operator.autoscale.decide import RoleMemory

INTERVAL_S = 15
LOAD_S = 300
STREAM_S = 60
CAPACITY = 4
"""Streams a group serves at the TTFT target."""
QUEUE_LIMIT = 16
"""Streams a group holds at most; beyond, new ones are refused."""
DRAIN_TIMEOUT_S = 150
TTFT_TARGET_S = 1.0
NOISE = 0.05
SEED = 16
MAX_GROUPS = 32
MAX_STEP = 4

Trace = Callable[[float], float]
"""Concurrent streams wanted at a time (seconds)."""


@dataclass(frozen=True)
class Policy:
    name: str
    autoscaling: Autoscaling
    new: bool
    """Counts the ready groups, needs a full window after a start, drains on scale-down."""


def _autoscaling(**windows: int) -> Autoscaling:
    target = MetricTarget(type="ttft-p90", target=TTFT_TARGET_S)
    return Autoscaling(
        min_replicas=1, max_replicas=MAX_GROUPS, metrics=[target], max_step=MAX_STEP, **windows
    )


OLD = Policy(
    "old",
    _autoscaling(scale_up_window_seconds=0, scale_down_window_seconds=300, cooldown_seconds=0),
    new=False,
)
NEW = Policy("new", _autoscaling(), new=True)


@dataclass
class Group:
    ready_at: float
    ends: list[float] = field(default_factory=list)
    """When each of its streams finishes."""
    draining_since: float | None = None

    def ttft(self) -> float:
        return TTFT_TARGET_S * len(self.ends) / CAPACITY


@dataclass(frozen=True)
class Tick:
    t: float
    offered: int
    """Streams that arrived this interval."""
    desired: int
    """Groups the role has after this interval's decision (draining ones not counted)."""
    billed: int
    """Groups that exist through this interval: loading, serving, draining."""
    loading: int
    needed: int
    """The most groups the load has needed so far."""
    ttft_p90: float


@dataclass
class Run:
    policy: Policy
    ticks: list[Tick] = field(default_factory=list)
    events: int = 0
    lost_on_removal: int = 0
    refused: int = 0

    @property
    def slo(self) -> float:
        return sum(k.ttft_p90 <= TTFT_TARGET_S for k in self.ticks) / len(self.ticks)

    @property
    def group_seconds(self) -> int:
        return sum(k.billed for k in self.ticks) * INTERVAL_S

    @property
    def overshoot(self) -> int:
        return max(k.desired - k.needed for k in self.ticks)


def p90(values: list[float]) -> float:
    return sorted(values)[math.ceil(0.9 * len(values)) - 1] if values else 0.0


def simulate(trace: Trace, *, minutes: float, policy: Policy, groups: int = 1, seed: int = SEED) -> Run:
    noise, memory, run = random.Random(seed), RoleMemory(), Run(policy)
    fleet = [Group(ready_at=-LOAD_S) for _ in range(groups)]
    owed, needed = 0.0, 0
    for t in range(0, int(minutes * 60), INTERVAL_S):
        for g in fleet:
            g.ends = [end for end in g.ends if end > t]
        for g in [g for g in fleet if g.draining_since is not None]:
            if not g.ends or t >= (g.draining_since or 0) + DRAIN_TIMEOUT_S:  # done, or out of time
                run.lost_on_removal += len(g.ends)
                fleet.remove(g)
        serving = [g for g in fleet if g.ready_at <= t and g.draining_since is None]
        owed += trace(t) * INTERVAL_S / STREAM_S
        offered = int(owed)
        owed -= offered
        for _ in range(offered):
            least = min(serving, key=lambda g: len(g.ends), default=None)
            if least is None or len(least.ends) >= QUEUE_LIMIT:
                run.refused += 1
            else:
                least.ends.append(t + STREAM_S)
        observed = p90([g.ttft() for g in fleet for _ in g.ends])
        jitter = 1 + noise.uniform(-NOISE, NOISE)
        reading = sum(g.ttft() for g in serving) / len(serving) * jitter if serving else None
        active = [g for g in fleet if g.draining_since is None]
        if not policy.new:
            memory.since = -math.inf  # no full window of readings needed
        decision = memory.decide(
            current=len(active),
            ready=len(serving) if policy.new else None,
            samples={"ttft-p90": reading},
            policy=policy.autoscaling,
            now=t,
        )
        if decision.desired != len(active):
            memory.changed(t)
            run.events += 1
        fleet += [Group(ready_at=t + LOAD_S) for _ in range(decision.desired - len(active))]
        for g in _victims(active, len(active) - decision.desired, policy, t):
            if policy.new and g.ends:
                g.draining_since = t
            else:
                run.lost_on_removal += len(g.ends)
                fleet.remove(g)
        needed = max(needed, min(MAX_GROUPS, math.ceil(trace(t) / CAPACITY)))
        loading = sum(g.ready_at > t for g in fleet)
        run.ticks.append(Tick(t, offered, decision.desired, len(fleet), loading, needed, observed))
    return run


def _victims(active: list[Group], count: int, policy: Policy, t: float) -> list[Group]:
    """Loading groups first; then the least loaded (new: the pod-deletion-cost the operator sets) or
    the most recently ready (old: what a ReplicaSet removes first)."""
    if policy.new:
        order = sorted(active, key=lambda g: (g.ready_at <= t, len(g.ends)))
    else:
        order = sorted(active, key=lambda g: (g.ready_at <= t, -g.ready_at))
    return order[: max(count, 0)]


def ramp(t: float) -> float:
    """1 stream for 5 minutes, up to 32 over 15, 32 for 5, down to 4 over 5, then 4."""
    m = t / 60
    if m < 5:
        return 1.0
    if m < 20:
        return 1 + 31 * (m - 5) / 15
    if m < 25:
        return 32.0
    return max(4.0, 32 - 28 * (m - 25) / 5)


def spike(t: float) -> float:
    """4 streams, 32 for 2 minutes from minute 10."""
    return 32.0 if 600 <= t < 720 else 4.0


def sawtooth(t: float) -> float:
    """32 streams for 5 minutes, 8 for 5, over and over."""
    return 32.0 if (t // 300) % 2 == 0 else 8.0


TRACES: dict[str, tuple[Trace, float]] = {
    "ramp 1->32->4": (ramp, 45),
    "spike 4->32->4": (spike, 30),
    "sawtooth 32/8": (sawtooth, 45),
}


def machine() -> str:
    """The CPU and its vector flags, as every bench prints them (pure Python here: they change nothing)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    info = {k.strip(): v.strip() for k, _, v in reversed([ln.partition(":") for ln in lines])}  # CPU 0's
    have = set(info.get("flags", "").split())
    flags = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in have)
    return f"{info.get('model name', '?')} ({platform.machine()}); flags: {flags or 'none of interest'}"


ROWS: list[tuple[str, Callable[[Run], str]]] = [
    ("SLO attainment (TTFT p90)", lambda r: f"{r.slo:.0%}"),
    ("group-seconds", lambda r: f"{r.group_seconds}"),
    ("scale events", lambda r: f"{r.events}"),
    ("most groups", lambda r: f"{max(k.desired for k in r.ticks)}"),
    ("overshoot (groups)", lambda r: f"{r.overshoot:+d}"),
    ("requests lost", lambda r: f"{r.lost_on_removal + r.refused}"),
    ("  on scale-down", lambda r: f"{r.lost_on_removal}"),
    ("  refused (queue full)", lambda r: f"{r.refused}"),
    ("requests offered", lambda r: f"{sum(k.offered for k in r.ticks)}"),
]


def main() -> None:
    print(f"# {machine()}")
    print(
        f"# interval {INTERVAL_S} s; a group serves {LOAD_S} s after it is added, {CAPACITY} streams at the"
        f" TTFT p90 target ({TTFT_TARGET_S:g} s), refuses beyond {QUEUE_LIMIT}; streams last {STREAM_S} s;"
        f" drain timeout {DRAIN_TIMEOUT_S} s; maxStep {MAX_STEP}; reading noise +-{NOISE:.0%} (seed {SEED})"
    )
    runs = {
        name: (simulate(trace, minutes=m, policy=OLD), simulate(trace, minutes=m, policy=NEW))
        for name, (trace, m) in TRACES.items()
    }
    width = 15
    print(f"{'':26}" + "".join(f"{f'{name} ({TRACES[name][1]:g} min)':>{2 * width}}" for name in runs))
    print(f"{'':26}" + f"{'old':>{width}}{'new':>{width}}" * len(runs))
    for label, cell in ROWS:
        print(
            f"{label:26}" + "".join(f"{cell(old):>{width}}{cell(new):>{width}}" for old, new in runs.values())
        )


if __name__ == "__main__":
    main()
