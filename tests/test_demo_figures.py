"""The demo's figures are report-grade: every plot axis says what it shows and in which unit, every figure
has a title naming its data, and the loss and IC figures carry what a quant reads from them (the best
epoch; the cumulative IC). Figures are captured as matplotlib objects when the demo saves them."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from fintensor import demo


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """{name: Figure} of one quick synthetic demo, plus its result."""
    captured = []
    original = Figure.savefig

    def keep(fig, path, *args, **kwargs):
        captured.append(fig)
        return original(fig, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", keep)
        result = demo.run(None, out=tmp_path_factory.mktemp("demo"), quick=True, epochs=3, device="cpu", say=None)
    assert result.ok, result.stages[-1]
    return dict(zip(demo.FIGURES, captured)), result


def plot_axes(fig):
    """The data axes (colour bars are axes too: they carry a label of their own)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


@pytest.mark.parametrize("name", demo.FIGURES)
def test_every_axis_is_labelled_and_every_figure_titled(figures, name):
    fig = figures[0][name]
    axes = plot_axes(fig)
    assert "synthetic" in axes[0].get_title(), f"{name}: the title does not name the data"
    for ax in axes:
        assert ax.get_ylabel(), f"{name}: an axis without a y label"
    assert any(ax.get_xlabel() for ax in axes), f"{name}: no x label"
    for cbar in [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]:
        assert cbar.get_ylabel() or cbar.get_xlabel(), f"{name}: a colour bar without a label"


def test_units_and_gaps_are_said(figures):
    figs = figures[0]
    assert "CNY" in plot_axes(figs["rolling_band"])[0].get_ylabel()
    assert "unadjusted" in plot_axes(figs["rolling_band"])[0].get_ylabel()  # the synthetic market is raw
    assert "suspended" in plot_axes(figs["prices"])[1].get_xlabel()
    assert "without a trade" in plot_axes(figs["ticks_heatmap"])[0].get_xlabel()
    assert "shares" in plot_axes(figs["prices"])[1].get_ylabel()
    assert "holidays" in plot_axes(figs["daily_ic"])[0].get_xlabel()


def test_loss_figure_marks_the_best_epoch_and_shows_valid_ic(figures):
    figs, result = figures
    ax, ic = plot_axes(figs["loss"])
    labels = [line.get_label() for line in ax.get_lines() + ic.get_lines()]
    best = [line for line in ax.get_lines() if line.get_label().startswith("best epoch")]
    assert len(best) == 1 and "valid IC" in labels and {"train loss", "valid loss"} <= set(labels)
    history = [line for line in ic.get_lines() if line.get_label() == "valid IC"][0].get_ydata()
    # the marked epoch is the one with the best validation IC (the default metric)
    assert best[0].get_xdata()[0] == 1 + int(np.argmax(history))


def test_daily_ic_figure_has_the_cumulative_ic(figures):
    figs, result = figures
    bars_ax, total_ax = plot_axes(figs["daily_ic"])
    bars = [patch.get_height() for patch in bars_ax.patches]
    total = [line for line in total_ax.get_lines() if line.get_label() == "cumulative IC"][0].get_ydata()
    np.testing.assert_allclose(total, np.cumsum(bars), rtol=1e-12)
    assert np.mean(bars) == pytest.approx(result.metrics["ic"], rel=1e-9)  # the same days as the IC row
