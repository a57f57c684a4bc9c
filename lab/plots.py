"""Figures from data: attention patterns and MoE routing, as matplotlib ``Figure``s.

Pure functions: arrays (or tensors) in, a new ``Figure`` out, or drawn into the
``ax`` you pass (widgets redraw one figure in place). Nothing here runs a model:
``lab.probe`` records what these functions draw::

    with lab.probe(model, "pattern") as cache:
        model(idx)
    attention_heatmap(cache["blocks.0.attn.pattern"][0, 3], tokens)

Figures are created without ``pyplot``, so no global state is touched and a figure
no longer referenced is freed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Arc

if TYPE_CHECKING:
    from lab.train import History

ArrayLike = np.ndarray | torch.Tensor | Sequence


def as_array(data: ArrayLike, ndim: int, name: str) -> np.ndarray:
    """``data`` as a float numpy array of ``ndim`` dimensions (else a clear error)."""
    if isinstance(data, torch.Tensor):
        data = data.detach().float().cpu().numpy()
    array = np.asarray(data, dtype=float)
    if array.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {array.shape}; "
            f"select one sequence (and one head) first, e.g. pattern[0, head]"
        )
    return array


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    """``ax``, or the axes of a new figure of ``figsize`` inches."""
    if ax is not None:
        return ax
    return Figure(figsize=figsize, layout="constrained").subplots()


def attention_heatmap(
    pattern: ArrayLike,
    tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """One head's pattern (T queries, S keys) as a heatmap, queries down, keys across.
    With a KV cache S > T: the queries are the last T of the S ``tokens``."""
    pattern = as_array(pattern, 2, "pattern")
    T, S = pattern.shape
    own_figure = ax is None  # only then is there room for a colorbar
    ax = new_axes(ax, (1.5 + 0.3 * S, 1.0 + 0.3 * T))
    image = ax.imshow(pattern, vmin=0.0, vmax=1.0, cmap="viridis")
    _label_tokens(ax, tokens, T, S)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    if own_figure:
        ax.figure.colorbar(image, ax=ax, shrink=0.8, label="attention")
    return ax.figure


def attention_grid(
    patterns: ArrayLike,
    tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    ncols: int | None = None,
) -> Figure:
    """Every head's pattern (n_head, T, S) side by side, titled ``head h``, with token
    labels and one colorbar; panels grow with the text so labels stay readable."""
    patterns = as_array(patterns, 3, "patterns")
    n_head, T, S = patterns.shape
    ncols = ncols or min(n_head, 4 if S <= 16 else 2)
    nrows = -(-n_head // ncols)
    panel = max(2.5, 0.09 * S)  # inches: about 6 pt a token label
    figure = Figure(figsize=(panel * ncols + 0.8, panel * nrows + 0.4), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for h, ax in enumerate(axes):
        if h >= n_head:
            ax.remove()
            continue
        image = ax.imshow(patterns[h], vmin=0.0, vmax=1.0, cmap="viridis")
        _label_tokens(ax, tokens, T, S)
        ax.set_title(f"head {h}")
    figure.colorbar(image, ax=axes[:n_head].tolist(), shrink=0.8, label="attention")
    if title:
        figure.suptitle(title)
    return figure


def attention_arcs(
    pattern: ArrayLike,
    tokens: Sequence[str],
    *,
    threshold: float = 0.1,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Token-to-token attention as arcs over the text: an arc joins each query to each
    earlier key it gives at least ``threshold`` of its attention, thicker and darker
    the more (a token's attention to itself is not drawn)."""
    pattern = as_array(pattern, 2, "pattern")
    T, S = pattern.shape
    _check_tokens(tokens, S)
    width = min(8.0, max(4.0, 0.17 * S))  # inches: fits beside a heatmap
    ax = new_axes(ax, (width, 0.45 * width))
    fontsize = min(9.0, 72 * width / S * 0.85)  # each token gets its share of the width
    for j, token in enumerate(tokens):
        ax.text(j, 0, _show(token), ha="center", va="top", fontsize=fontsize, family="monospace")
    offset = S - T  # query i sits at position offset + i
    for i in range(T):
        for j in range(offset + i):
            weight = float(pattern[i, j])
            if weight >= threshold:
                query = offset + i
                ax.add_patch(
                    Arc(
                        ((query + j) / 2, 0.1), query - j, query - j, theta1=0, theta2=180,
                        color="tab:blue", alpha=min(1.0, 0.15 + weight), linewidth=0.5 + 3 * weight,
                    )
                )  # fmt: skip
    ax.set_xlim(-0.5, S - 0.5)
    ax.set_ylim(-0.6, max(1.0, S / 2))
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax.figure


def routing_heatmap(
    weights: ArrayLike,
    tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Token x expert weights (T, n_expert), e.g. ``RoutingRecord.combine_weights[0]``:
    which experts each token went to, and with what gate (0 = not routed there)."""
    weights = as_array(weights, 2, "weights")
    T, E = weights.shape
    own_figure = ax is None
    ax = new_axes(ax, (1.5 + 0.4 * E, 1.0 + 0.3 * T))
    image = ax.imshow(weights, vmin=0.0, vmax=max(1e-9, float(weights.max())), cmap="magma")
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    if tokens is not None:
        _check_tokens(tokens, T)
        ax.set_yticks(range(T), [_show(t) for t in tokens])
    ax.set_xlabel("expert")
    ax.set_ylabel("token")
    if title:
        ax.set_title(title)
    if own_figure:
        ax.figure.colorbar(image, ax=ax, shrink=0.8, label="gate")
    return ax.figure


def expert_load(load: ArrayLike, *, title: str | None = None, ax: Axes | None = None) -> Figure:
    """Tokens per expert (n_expert,) as bars, with the balanced load as a dashed line."""
    load = as_array(load, 1, "load")
    ax = new_axes(ax, (1.5 + 0.4 * len(load), 2.5))
    ax.bar(range(len(load)), load, color="tab:orange")
    ax.axhline(load.mean(), color="black", linestyle="--", linewidth=1, label="balanced")
    ax.set_xticks(range(len(load)), [str(e) for e in range(len(load))])
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens")
    ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    return ax.figure


def expert_load_over_time(
    history: ArrayLike,
    steps: Sequence[int] | None = None,
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Each expert's share of the load (history (n_steps, n_expert), counts or
    fractions) over training steps, stacked: a band per expert, its height the share
    (eight noisy overlapping lines read worse). Dotted lines mark the balanced bands."""
    history = as_array(history, 2, "history")
    n_steps, E = history.shape
    share = history / np.maximum(history.sum(axis=1, keepdims=True), 1e-12)
    steps = list(range(n_steps)) if steps is None else list(steps)
    if len(steps) != n_steps:
        raise ValueError(f"steps has {len(steps)} entries but history has {n_steps} rows")
    ax = new_axes(ax, (5.0, 2.8))
    colors = [matplotlib.colormaps["tab10"](e % 10) for e in range(E)]
    ax.stackplot(steps, share.T, labels=[f"expert {e}" for e in range(E)], colors=colors)
    for e in range(1, E):
        ax.axhline(e / E, color="white", linestyle=":", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("share of tokens (stacked)")
    ax.set_ylim(0, 1)
    ax.margins(x=0)
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=7)
    if title:
        ax.set_title(title)
    return ax.figure


def _label_tokens(ax: Axes, tokens: Sequence[str] | None, T: int, S: int) -> None:
    if tokens is None:
        return
    _check_tokens(tokens, S)
    labels = [_show(t) for t in tokens]
    fontsize = min(10.0, max(4.0, 240 / S))  # long texts: smaller labels, all of them shown
    ax.set_xticks(range(S), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(T), labels[S - T :], fontsize=fontsize)


def _check_tokens(tokens: Sequence[str], n: int) -> None:
    if len(tokens) != n:
        raise ValueError(f"got {len(tokens)} tokens for {n} positions; pass one label per key")


def _show(token: str) -> str:
    """A token label that stays visible: spaces and newlines made explicit."""
    return token.replace("\n", "\\n").replace(" ", "␣") if token.strip() != token else token


def memory_breakdown(
    bars: Mapping[str, Mapping[str, float]],
    *,
    limit: float | None = None,
    limit_label: str = "device",
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Stacked memory bars: ``bars`` maps a bar's label ("estimate", "measured") to
    component -> bytes (``MemoryBreakdown.as_dict()``; a ``total`` entry is ignored).
    Components that are zero in every bar are left out; each bar's total is written
    on top, and ``limit`` (bytes, e.g. the GPU's memory) is a dashed line, or, when it
    is over five times the tallest bar (which would then be too flat to read), a note.
    The unit (B, KiB, MiB, GiB, TiB: powers of 1024) follows the largest value shown."""
    if not bars:
        raise ValueError("bars is empty; pass {'estimate': breakdown.as_dict()}")
    parts = {
        label: {k: float(v) for k, v in b.items() if k != "total"} for label, b in bars.items()
    }
    names = list(dict.fromkeys(k for b in parts.values() for k in b))  # colour by position
    components = [k for k in names if any(b.get(k) for b in parts.values())]
    totals = [sum(b.values()) for b in parts.values()]
    line = limit is not None and limit <= 5 * max(totals)
    largest = max([*totals, limit if line else 0.0, 1.0])
    power = min(4, max(0, int(np.log(largest) // np.log(1024))))
    unit, scale = ("B", "KiB", "MiB", "GiB", "TiB")[power], 1024.0**power
    ax = new_axes(ax, (3.6 + 1.1 * len(parts), 3.2))
    x = np.arange(len(parts))
    bottom = np.zeros(len(parts))
    for component in components:
        heights = np.array([b.get(component, 0.0) for b in parts.values()]) / scale
        ax.bar(
            x, heights, bottom=bottom, width=0.6, color=f"C{names.index(component) % 10}",
            label=component.replace("_", " "),
        )  # fmt: skip
        bottom += heights
    for i, total in enumerate(totals):
        ax.text(i, total / scale, f"{total / scale:.3g}", ha="center", va="bottom", fontsize=8)
    if line:
        ax.axhline(limit / scale, color="black", linestyle="--", linewidth=1, label=limit_label)
    elif limit is not None:
        note = f"{limit_label}: {limit / scale:,.0f} {unit}, off the scale"
        ax.text(0.98, 0.98, note, transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.set_xticks(x, list(parts))
    ax.set_xlim(-0.6, len(parts) - 0.4)
    ax.set_ylabel(f"memory ({unit})")
    handles, labels = ax.get_legend_handles_labels()  # top of the stack first
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if title:
        ax.set_title(title)
    return ax.figure


# label of each curve -> its panel; "validation ..." curves are drawn with markers
TRAINING_PANELS = {
    "loss": ("train loss", "validation loss"),
    "validation accuracy": ("validation accuracy",),
    "learning rate": ("learning rate",),
    "tokens/s": ("tokens/s",),
}


def training_series(history: History) -> dict[str, tuple[list[float], list[float]]]:
    """Each curve of ``training_curves`` as (steps, values), by label, from a
    ``lab.train.History`` (or anything with its ``step, loss, lr, tokens_per_s, evals``)."""
    evals = history.evals
    eval_steps = [e["step"] for e in evals]
    return {
        "train loss": (list(history.step), list(history.loss)),
        "validation loss": (eval_steps, [e["val_loss"] for e in evals]),
        "validation accuracy": (eval_steps, [e["val_accuracy"] for e in evals]),
        "learning rate": (list(history.step), list(history.lr)),
        "tokens/s": (list(history.step), list(history.tokens_per_s)),
    }


def training_curves(
    history: History, *, figure: Figure | None = None, title: str | None = None
) -> Figure:
    """Loss (train per step, validation per evaluation), validation accuracy, learning
    rate and tokens/s against the step, in a 2 x 2 grid (``TRAINING_PANELS``).

    With ``figure`` (one this function made) the lines' data are replaced and the axes
    rescaled instead of drawing anew: a live view redraws one figure in place. Lines
    with other labels (a target you added) are left as they are."""
    series = training_series(history)
    if figure is None:
        # Fixed margins: constrained layout would cost ~5x the drawing at every redraw.
        figure = Figure(figsize=(8.0, 4.8))
        figure.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.9, wspace=0.25, hspace=0.6)
        axes = figure.subplots(2, 2).ravel()
        for ax, (panel, labels) in zip(axes, TRAINING_PANELS.items(), strict=True):
            for label in labels:
                marker = "o" if label.startswith("validation") else None
                color = "C1" if marker else "C0"
                ax.plot([], [], label=label, color=color, marker=marker, markersize=3, lw=1.2)
            ax.set_title(panel, fontsize=10)
            ax.set_xlabel("step")
        axes[0].legend(fontsize=8)
        axes[1].set_ylim(0.0, 1.02)
    if title:
        figure.suptitle(title)
    for ax in figure.axes:
        for line in ax.lines:
            if line.get_label() in series:
                line.set_data(*series[line.get_label()])
        ax.relim()
        ax.autoscale_view()
    return figure
