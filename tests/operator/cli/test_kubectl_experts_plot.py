"""`kubectl moe experts --plot FILE.png`: a real PNG drawn by matplotlib, read back; and the one-line
answer when matplotlib is not installed."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib import image as mpimg

from kubemoe_operator.cli.experts import ExpertsError, build_report
from kubemoe_operator.cli.kubectl_moe import main
from kubemoe_operator.cli.plot import write_plot
from tests.operator.cli import expert_objects as objs
from tests.operator.cli.kubectl_stub import install, keyed

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _draw(path: Path, **docs: Any) -> Any:
    report = build_report(objs.deployment(), {"decode": objs.config_map(**docs)}, roles=["decode"])
    write_plot(report, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return mpimg.imread(path)


def test_plot_is_a_png_of_sane_size(tmp_path: Path) -> None:
    pixels = _draw(tmp_path / "experts.png")
    height, width, channels = pixels.shape
    assert channels in (3, 4)
    # One role: one row of three panels, 17 x 4.2 inches at 100 dpi.
    assert 1200 <= width <= 2400, pixels.shape
    assert 300 <= height <= 1500, pixels.shape
    assert float(pixels[..., :3].std()) > 0.05  # drawn heatmaps, not a blank canvas


def test_plot_differs_between_two_loads(tmp_path: Path) -> None:
    first = _draw(tmp_path / "a.png")
    flipped = [list(reversed(layer)) for layer in objs.OBSERVED_TOKENS]
    second = _draw(tmp_path / "b.png", observed=objs.observed(flipped))
    assert first.shape == second.shape
    assert (abs(first - second) > 0.1).any()


def test_plot_before_any_rebalance_still_draws(tmp_path: Path) -> None:
    pixels = _draw(tmp_path / "p.png", rebalance=None)
    assert pixels.shape[0] >= 300


def test_command_writes_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install(
        tmp_path,
        keyed(
            {
                "modeldeployments.kubemoe.io/prod/tiny-moe": objs.deployment(),
                "configmaps/prod/tiny-moe-decode-experts": objs.config_map(),
            }
        ),
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "load.png"
    assert main(["experts", "tiny-moe", "-n", "prod", "--plot", str(out)]) == 0
    captured = capsys.readouterr()
    assert "e5 70.0%" in captured.out
    assert captured.err.strip() == f"wrote {out}"
    assert mpimg.imread(out).shape[1] >= 1200


def test_plot_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    report = build_report(objs.deployment(), {"decode": objs.config_map()}, roles=["decode"])
    with pytest.raises(ExpertsError, match=r"cannot write .*nowhere/x\.png") as err:
        write_plot(report, tmp_path / "nowhere" / "x.png")
    assert "\n" not in str(err.value)


def test_without_matplotlib_plot_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = install(tmp_path, keyed({}))
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` finds when not installed
    assert main(["experts", "tiny-moe", "--plot", str(tmp_path / "x.png")]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        "kubectl moe experts: --plot needs matplotlib, which is not installed:"
        " pip install matplotlib (from a checkout: pip install './operator[plot]')\n"
    )
    assert log.read_text() == ""  # said before asking the cluster anything
    assert not (tmp_path / "x.png").exists()
