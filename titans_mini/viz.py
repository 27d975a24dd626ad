"""Plots and small ipywidgets explorers used by the course notebooks.

Lessons: every lesson from 01 on draws its figures with these helpers; 03–04 use the widgets.

Every function here only *draws*: the numbers come from the notebook (or the library), so a
learner can see exactly what is computed. Each plot helper takes an optional matplotlib ``ax``
and returns it, sets a title and axis labels, and never calls ``plt.show()`` itself unless it
owns the whole figure (the ``show_*`` and ``*_explorer`` functions).

Widgets use only core ipywidgets (sliders, Dropdown, Output, HBox/VBox, ``interactive_output``),
which behave the same on ipywidgets 7.7 (what Colab ships) and 8.x. Every explorer first draws a
static figure with its default settings, so the notebook reads well where widgets do not run
(GitHub, nbmake), then shows the interactive version below it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = [
    "to_numpy",
    "line_plot",
    "plot_heatmap",
    "plot_event_lines",
    "plot_surprise_trace",
    "plot_old_new_recall",
    "surprise_explorer",
    "momentum_forgetting_explorer",
]

# A small fixed palette so that the same setting has the same colour across plots of a lesson.
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
NOVEL_COLOR = "#ff7f0e"
REGIME_COLOR = "#7f7f7f"


def to_numpy(x) -> np.ndarray:
    """A tensor, list or array as a float numpy array (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _new_ax(ax, figsize=(6.4, 3.6)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _label(ax, title: str, xlabel: str, ylabel: str, *, legend_loc: str):
    """Title, axis labels, a light grid and a small legend: every line plot here ends like this."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)
    return ax


def line_plot(
    x,
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    markers: bool = True,
    ax=None,
    legend_title: str | None = None,
    ylim: tuple[float, float] | None = None,
):
    """One line per entry of ``series`` (label -> y values over ``x``)."""
    ax = _new_ax(ax)
    xs = to_numpy(x)
    for i, (label, ys) in enumerate(series.items()):
        ax.plot(xs, to_numpy(ys), marker="o" if markers else None, ms=3.5, lw=1.6,
                color=COLORS[i % len(COLORS)], label=str(label))
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if logy else "major")
    if len(series) > 1:
        ax.legend(title=legend_title, fontsize=8, title_fontsize=8)
    return ax


def plot_heatmap(
    matrix,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    ax=None,
    vmin: float | None = -1.0,
    vmax: float | None = 1.0,
    cmap: str = "RdBu_r",
    colorbar_label: str | None = None,
):
    """A matrix as an image (row 0 at the top) with a colour bar."""
    ax = _new_ax(ax, figsize=(4.2, 3.6))
    im = ax.imshow(to_numpy(matrix), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto",
                   interpolation="nearest")
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if colorbar_label:
        cb.set_label(colorbar_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def plot_event_lines(ax, novel_positions=(), regime_positions=(), *, label: bool = True):
    """Mark ground-truth events: novel events as orange ticks at the top of the axes,
    regime changes as grey dashed vertical lines."""
    novel = to_numpy(novel_positions).ravel()
    regimes = to_numpy(regime_positions).ravel()
    for j, p in enumerate(regimes):
        ax.axvline(p, color=REGIME_COLOR, ls="--", lw=1.2,
                   label="regime change" if (label and j == 0) else None)
    if novel.size:
        ax.plot(novel, np.ones_like(novel), transform=ax.get_xaxis_transform(), ls="none",
                marker="v", ms=6, color=NOVEL_COLOR, clip_on=False,
                label="novel event" if label else None)
    return ax


def plot_surprise_trace(
    traces: Mapping[str, Sequence[float]] | Sequence[float],
    novel_positions=(),
    regime_positions=(),
    *,
    title: str = "Surprise along the stream",
    ylabel: str = "surprise  ‖∇ℓ_t‖",
    xlabel: str = "step t",
    logy: bool = False,
    ax=None,
):
    """Per-step surprise (one or several traces) with the ground-truth events marked."""
    ax = _new_ax(ax, figsize=(8.0, 3.2))
    if not isinstance(traces, Mapping):
        traces = {"surprise": traces}
    for i, (label, ys) in enumerate(traces.items()):
        ax.plot(to_numpy(ys), lw=1.0, color=COLORS[i % len(COLORS)], label=str(label))
    plot_event_lines(ax, novel_positions, regime_positions)
    if logy:
        ax.set_yscale("log")
    return _label(ax, title, xlabel, ylabel, legend_loc="upper right")


def plot_old_new_recall(
    steps,
    old,
    new,
    switch_step: int | None = None,
    *,
    title: str = "Recall of old and new items",
    ylabel: str = "recall accuracy",
    xlabel: str = "step t",
    ax=None,
):
    """Recall of the items written before ``switch_step`` ("old") and after it ("new")."""
    ax = _new_ax(ax, figsize=(6.0, 3.4))
    ax.plot(to_numpy(steps), to_numpy(old), lw=1.8, color=COLORS[0], label="old items (phase 1)")
    ax.plot(to_numpy(steps), to_numpy(new), lw=1.8, color=COLORS[1], label="new items (phase 2)")
    if switch_step is not None:
        ax.axvline(switch_step, color=REGIME_COLOR, ls="--", lw=1.2, label="switch")
    ax.set_ylim(-0.03, 1.03)
    return _label(ax, title, xlabel, ylabel, legend_loc="center right")


# --------------------------------------------------------------------------- widgets


def _widgets():
    try:
        import ipywidgets
        from IPython.display import display
    except ImportError as exc:  # pragma: no cover - the course extra installs them
        raise ImportError(
            "the explorers need ipywidgets: pip install 'titans_mini[course]'"
        ) from exc
    return ipywidgets, display


def surprise_explorer(
    compute: Callable[[str, float], dict],
    stream_kinds: Sequence[str],
    *,
    novelty_rate: float = 0.02,
    max_novelty_rate: float = 0.1,
    static: bool = True,
):
    """Pick a stream kind and its novelty rate; see the surprise trace.

    ``compute(kind, novelty_rate)`` returns a dict with ``"traces"`` (label -> per-step values),
    ``"novel"`` and ``"regime"`` (ground-truth positions) and optionally ``"title"``.
    Draws the default setting as a static figure first (when ``static``), then the widget.
    """
    widgets, display = _widgets()

    def draw(kind, rate):
        res = compute(kind, rate)
        ax = plot_surprise_trace(
            res["traces"], res["novel"], res["regime"],
            title=res.get("title", f"Surprise on the '{kind}' stream (novelty rate {rate:.3f})"),
            logy=res.get("logy", False),
        )
        ax.figure.tight_layout()
        plt.show()

    if static:
        draw(stream_kinds[0], novelty_rate)
    kind_w = widgets.Dropdown(options=list(stream_kinds), value=stream_kinds[0], description="stream")
    rate_w = widgets.FloatSlider(value=novelty_rate, min=0.0, max=max_novelty_rate, step=0.005,
                                 description="novelty", readout_format=".3f",
                                 continuous_update=False)
    out = widgets.interactive_output(draw, {"kind": kind_w, "rate": rate_w})
    ui = widgets.VBox([widgets.HBox([kind_w, rate_w]), out])
    display(ui)
    return ui


def momentum_forgetting_explorer(
    simulate: Callable[[float, float, float], dict],
    *,
    theta: float = 0.5,
    eta: float = 0.0,
    alpha: float = 0.0,
    max_theta: float = 1.5,
    static: bool = True,
):
    """Sliders for θ (step size), η (momentum) and α (forgetting); see old vs new recall.

    ``simulate(theta, eta, alpha)`` returns a dict with ``"steps"``, ``"old"``, ``"new"`` (recall
    over time) and ``"switch"`` (the step where the new items start).
    """
    widgets, display = _widgets()

    def draw(theta, eta, alpha):
        res = simulate(theta, eta, alpha)
        ax = plot_old_new_recall(
            res["steps"], res["old"], res["new"], res.get("switch"),
            title=f"Old vs new items: θ={theta:.2f}, η={eta:.2f}, α={alpha:.3f}",
        )
        ax.figure.tight_layout()
        plt.show()

    if static:
        draw(theta, eta, alpha)
    style = {"description_width": "30px"}
    theta_w = widgets.FloatSlider(value=theta, min=0.0, max=max_theta, step=0.05, description="θ",
                                  continuous_update=False, style=style)
    eta_w = widgets.FloatSlider(value=eta, min=0.0, max=0.99, step=0.01, description="η",
                                continuous_update=False, style=style)
    alpha_w = widgets.FloatSlider(value=alpha, min=0.0, max=0.2, step=0.005, description="α",
                                  readout_format=".3f", continuous_update=False, style=style)
    out = widgets.interactive_output(draw, {"theta": theta_w, "eta": eta_w, "alpha": alpha_w})
    ui = widgets.VBox([widgets.HBox([theta_w, eta_w, alpha_w]), out])
    display(ui)
    return ui


# --- lessons 05-07 ---------------------------------------------------------------------------
# (helpers used by notebooks 05-07; maintained with those lessons)


def plot_text_heat(
    text: str,
    values,
    *,
    title: str,
    colorbar_label: str,
    width: int = 64,
    cmap: str = "viridis",
    ax=None,
):
    """Characters of ``text`` in rows of ``width``, each cell coloured by its value in ``values``.

    ``values`` has one number per character (e.g. per-token surprise of a byte-level model).
    Newlines are shown as "⏎" and break nothing, so the grid keeps its shape.
    """
    vals = to_numpy(values).reshape(-1)
    if len(vals) != len(text):
        raise ValueError(f"need one value per character: {len(text)} characters, {len(vals)} values")
    rows = -(-len(text) // width)
    grid = np.full(rows * width, np.nan)
    grid[: len(vals)] = vals
    grid = grid.reshape(rows, width)
    ax = _new_ax(ax, figsize=(min(0.22 * width + 1.5, 16), 0.45 * rows + 1.0))
    im = ax.imshow(grid, cmap=cmap, aspect="auto", interpolation="nearest")
    lo, hi = np.nanmin(vals), np.nanmax(vals)
    for i, ch in enumerate(text):
        r, c = divmod(i, width)
        shown = "⏎" if ch == "\n" else ch
        bright = (vals[i] - lo) / (hi - lo + 1e-12) > 0.6
        ax.text(c, r, shown, ha="center", va="center", fontsize=8.5, family="monospace",
                color="black" if bright else "white")
    ax.set_xticks([])
    ax.set_yticks(range(rows))
    ax.set_yticklabels([str(r * width) for r in range(rows)], fontsize=7)
    ax.set_ylabel("character index")
    ax.set_xlabel(f"position in the row ({width} characters per row)")
    ax.set_title(title)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cb.set_label(colorbar_label)
    return ax
