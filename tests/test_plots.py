"""lab.plots on the Agg backend: the right axes, labels and data in each figure."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Arc

from lab import plots

TOKENS = ["the", " cat", " sat", "\n"]


def causal_pattern(T: int, S: int | None = None) -> np.ndarray:
    S = S or T
    rng = np.random.default_rng(0)
    allowed = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]
    weights = np.where(allowed, rng.random((T, S)), 0)
    return weights / weights.sum(-1, keepdims=True)


def test_heatmap_shows_the_pattern_with_token_labels():
    pattern = causal_pattern(4)
    figure = plots.attention_heatmap(torch.tensor(pattern), TOKENS, title="layer 0 head 1")
    ax = figure.axes[0]
    assert isinstance(figure, Figure) and len(figure.axes) == 2  # heatmap and colorbar
    np.testing.assert_allclose(ax.images[0].get_array(), pattern)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["the", "␣cat", "␣sat", "\\n"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("key", "query", "layer 0 head 1")
    figure.canvas.draw()  # renders on Agg without error


def test_heatmap_with_a_kv_cache_labels_the_last_queries():
    figure = plots.attention_heatmap(causal_pattern(1, 4), TOKENS)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["\\n"]
    assert ax.images[0].get_array().shape == (1, 4)


def test_heatmap_draws_into_a_given_axes():
    figure = Figure()
    ax = figure.subplots()
    assert plots.attention_heatmap(causal_pattern(4), ax=ax) is figure
    assert len(figure.axes) == 1  # no colorbar squeezed into someone else's layout


def test_grid_has_one_titled_panel_per_head():
    patterns = np.stack([causal_pattern(4)] * 6)
    patterns[5] = np.eye(4)
    figure = plots.attention_grid(patterns, TOKENS, title="layer 1")
    *panels, colorbar = figure.axes
    assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(6)]
    np.testing.assert_allclose(panels[5].images[0].get_array(), np.eye(4))
    assert figure.get_suptitle() == "layer 1"
    assert colorbar.get_ylabel() == "attention"


def test_long_texts_keep_every_token_label_and_arcs_fit_beside_a_heatmap():
    tokens = [f"t{i}" for i in range(47)]
    grid = plots.attention_grid(np.stack([causal_pattern(47)] * 4), tokens)
    labels = [t.get_text() for t in grid.axes[0].get_xticklabels()]
    assert labels == tokens
    arcs = plots.attention_arcs(causal_pattern(47), tokens)
    width, _ = arcs.get_size_inches()
    assert width <= 8.0  # was 0.6 in a token: 28 in (2256 px) for this text
    grid.canvas.draw()
    arcs.canvas.draw()


def test_arcs_join_queries_to_the_keys_they_attend_above_threshold():
    pattern = np.array(
        [[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.05, 0.9, 0.05, 0], [0.3, 0.3, 0.2, 0.2]]
    )
    figure = plots.attention_arcs(pattern, TOKENS, threshold=0.25)
    arcs = [p for p in figure.axes[0].patches if isinstance(p, Arc)]
    spans = sorted((a.center[0] - a.width / 2, a.center[0] + a.width / 2) for a in arcs)
    assert spans == [(0, 1), (0, 3), (1, 2), (1, 3)]  # (key, query) pairs >= 0.25, not self
    assert [t.get_text() for t in figure.axes[0].texts] == ["the", "␣cat", "␣sat", "\\n"]


def test_routing_heatmap_and_load_charts():
    weights = np.array([[0.7, 0.3, 0], [0, 0.6, 0.4], [0.5, 0, 0.5], [0, 0, 1.0]])
    figure = plots.routing_heatmap(weights, TOKENS)
    ax = figure.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), weights)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("expert", "token")
    load = (weights > 0).sum(0)
    bars = plots.expert_load(load).axes[0]
    assert [b.get_height() for b in bars.patches] == [2, 2, 3]
    assert bars.lines[0].get_ydata()[0] == pytest.approx(7 / 3)  # the balanced level
    history = np.array([[4, 0, 0], [2, 1, 1], [1, 1, 2]])
    stacked = plots.expert_load_over_time(history, steps=[0, 10, 20]).axes[0]
    bands = stacked.collections
    assert [band.get_label() for band in bands] == ["expert 0", "expert 1", "expert 2"]
    first = bands[0].get_paths()[0].vertices  # expert 0's band: from 0 up to its share
    np.testing.assert_allclose(sorted(set(first[:, 0])), [0, 10, 20])
    assert first[:, 1].max() == pytest.approx(1.0) and first[:, 1].min() == 0
    top = bands[2].get_paths()[0].vertices[:, 1]
    assert top.max() == pytest.approx(1.0) and top.min() == pytest.approx(0.5)  # 1 - share 0.5


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match=r"pattern must have 2 dimensions.*pattern\[0, head\]"):
        plots.attention_heatmap(np.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="got 3 tokens for 4 positions"):
        plots.attention_heatmap(causal_pattern(4), TOKENS[:3])
    with pytest.raises(ValueError, match="steps has 2 entries"):
        plots.expert_load_over_time(np.ones((3, 2)), steps=[0, 1])
