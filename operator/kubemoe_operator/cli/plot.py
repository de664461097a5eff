"""`kubectl moe experts NAME --plot FILE.png`: the expert load as heatmaps, one row per role.

Left: layer x expert, each expert's share of its layer's tokens (the latest observed load, or the
load of the last rebalance before any observation). Middle and right: layer x rank, each rank's load
over the mean rank load under the placement before the last rebalance (previousSlots) and after it
(slots), both from the load that rebalance was computed from, on one colour scale centred on 1.0
(the mean); a cross marks a layer's busiest rank where it carries 10 % or more above the mean. The
point: the busiest rank cools down.

matplotlib is optional (`pip install './operator[plot]'` from a checkout) and imported only here, only when a
plot is asked for, so the CLI stays fast without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubemoe_operator.cli.experts import ExpertsError, Report, RoleLoad
from kubemoe_operator.plan.experts import rank_loads

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install matplotlib (from a checkout: pip install './operator[plot]')"
"""kubemoe-operator is not on PyPI: the extra is installed from the source tree."""
HOT = 1.1
"""A layer's busiest rank at or above this (over the mean) gets a cross."""


def require_matplotlib() -> None:
    """ExpertsError (one line, how to install it) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ExpertsError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None


def _shares(tokens: Sequence[Sequence[float]]) -> list[list[float]]:
    rows = []
    for layer in tokens:
        total = math.fsum(layer)
        rows.append([t / total if total > 0 else 0.0 for t in layer])
    return rows


def _relative_rank_loads(load: Sequence[float], slots: Sequence[int], *, ranks: int) -> list[float]:
    """Each rank's load over the mean rank load (all 1.0 when there is no load)."""
    loads = rank_loads(load, slots, ranks=ranks)
    total = math.fsum(loads)
    return [x * ranks / total if total > 0 else 1.0 for x in loads]


def _expert_panel(ax: Axes, fig: Figure, load: RoleLoad) -> None:
    if load.observed is not None and load.observed.layers:
        layers, tokens, what = load.observed.layers, load.observed.tokens, f"observed {load.observed.time}"
    elif load.rebalance is not None and load.rebalance.layers:
        layers, tokens, what = load.rebalance.layers, load.rebalance.tokens, "at the last rebalance"
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no load observed yet", ha="center", va="center", transform=ax.transAxes)
        return
    from matplotlib.colors import PowerNorm

    # A square-root scale: one very hot expert would otherwise leave the rest one colour.
    image = ax.imshow(
        _shares(tokens), aspect="auto", interpolation="nearest", cmap="viridis", norm=PowerNorm(gamma=0.5)
    )
    fig.colorbar(image, ax=ax, label="share of the layer's tokens")
    _layer_ticks(ax, layers)
    ax.set_xlabel("expert")
    ax.set_title(f"{load.role}: expert load ({what})", fontsize=9)


def _layer_ticks(ax: Axes, layers: Sequence[int]) -> None:
    step = max(1, math.ceil(len(layers) / 16))
    ticks = list(range(0, len(layers), step))
    ax.set_yticks(ticks, [str(layers[i]) for i in ticks])
    ax.set_ylabel("layer")


def _rank_panels(axes: Sequence[Axes], fig: Figure, load: RoleLoad) -> None:
    from matplotlib.colors import TwoSlopeNorm

    rb, ranks = load.rebalance, load.placement.ranks
    if rb is None or not rb.layers:
        for ax in axes:
            ax.set_axis_off()
        axes[0].text(
            0.5,
            0.5,
            "no rebalance yet: nothing to compare",
            ha="center",
            va="center",
            transform=axes[0].transAxes,
        )
        return
    before = [
        _relative_rank_loads(t, s, ranks=ranks) for t, s in zip(rb.tokens, rb.previous_slots, strict=True)
    ]
    after = [_relative_rank_loads(t, s, ranks=ranks) for t, s in zip(rb.tokens, rb.slots, strict=True)]
    values = [v for grid in (before, after) for row in grid for v in row]
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(*values, 0.9), vmax=max(*values, 1.1))
    image = None
    for ax, grid, title in (
        (axes[0], before, "before the last rebalance"),
        (axes[1], after, f"after it (generation {rb.generation})"),
    ):
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="coolwarm", norm=norm)
        hot = [(row.index(max(row)), i) for i, row in enumerate(grid) if max(row) >= HOT]
        if hot:
            ax.scatter(
                [x for x, _ in hot], [y for _, y in hot], marker="x", color="black", s=12, linewidths=0.8
            )
        _layer_ticks(ax, rb.layers)
        ax.set_xlabel("rank")
        ax.set_xticks(range(ranks), [str(r) for r in range(ranks)] if ranks <= 32 else None)
        worst = max(max(row) for row in grid)
        ax.set_title(f"{load.role}: rank load / mean, {title}: busiest {worst:.2f}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="rank load / mean rank load")


def figure(report: Report) -> Figure:
    """The figure (not yet drawn to a file)."""
    from matplotlib.figure import Figure

    rows = len(report.roles)
    layers = max((len(rr.rows) for rr in report.roles), default=1)
    fig = Figure(figsize=(17, rows * min(12.0, max(4.2, 1.5 + 0.09 * layers))), layout="constrained")
    grid: Any = fig.subplots(rows, 3, squeeze=False)
    for row, rr in zip(grid, report.roles, strict=True):
        _expert_panel(row[0], fig, rr.load)
        _rank_panels(row[1:], fig, rr.load)
    fig.suptitle(f"{report.namespace}/{report.name}: expert load")
    return fig


def write_plot(report: Report, path: Path) -> None:
    """Draw the report to `path` as a PNG with the Agg renderer; ExpertsError when it cannot be written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure(report)
    FigureCanvasAgg(fig)
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as err:
        raise ExpertsError(f"cannot write {path}: {err.strerror or err}") from None
