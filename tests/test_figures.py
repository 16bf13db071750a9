"""Issue 12, items 1-3: integer heatmap ticks, readable APEX axes, honest path graphs."""

from __future__ import annotations

import pytest

import apexlens
from apexlens.toys.models import load_model
from apexlens.toys.tasks import get_task
from apexlens.ui import plotting


@pytest.fixture(scope="module")
def induction():
    model = load_model("induction-2l")
    batch = get_task("induction").batch(8, seed=0)
    exp = apexlens.Experiment(
        model,
        batch.clean_tokens,
        batch.corrupted_tokens,
        metric=batch.logit_diff(),
        positions=batch.named_positions,
    )
    return model, batch, exp


@pytest.fixture(scope="module")
def sweeps():
    tokens = get_task("backdoor").batch(8, seed=0).clean_tokens
    return {
        name: apexlens.apex(
            load_model(name),
            tokens,
            sigmas=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
            n_draws=4,
            sites="embed",
            relative=True,
        )
        for name in ("backdoor", "backdoor-clean")
    }


# ----------------------------------------------------------------------------- 1. heatmap
def test_head_heatmap_has_integer_ticks_only(induction):
    _, _, exp = induction
    fig = plotting.head_heatmap(exp.path_patch("all-heads", "logits"))
    for axis, n in ((fig.layout.xaxis, 4), (fig.layout.yaxis, 2)):
        assert axis.tickmode == "array"
        assert list(axis.tickvals) == list(range(n))
        assert list(axis.ticktext) == [str(i) for i in range(n)]


def test_head_heatmap_labels_follow_the_result_kind(induction):
    _, _, exp = induction
    res = exp.path_patch("all-heads", "logits")
    pp = plotting.head_heatmap(res)
    assert "path patching" in pp.layout.title.text
    assert "-1" in pp.data[0].colorbar.title.text  # says what the sign means
    ap = exp.act_patch("all-heads")
    ap.kind = "act_patch"  # what act_patch results carry once the engine sets it
    fig = plotting.head_heatmap(ap)
    assert "activation patching" in fig.layout.title.text
    assert "restored" in fig.data[0].colorbar.title.text
    assert "path patching" not in fig.layout.title.text


# ----------------------------------------------------------------------------- 2. APEX axis
def test_apex_curves_ticks_at_the_swept_sigmas(sweeps):
    fig = plotting.apex_curves(sweeps)
    x = fig.layout.xaxis
    assert x.type == "log" and x.tickmode == "array"
    assert list(x.tickvals) == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert list(x.ticktext) == ["0.25", "0.5", "1", "2", "4", "8"]


def test_apex_curves_legend_leaves_the_right_axis_free(sweeps):
    fig = plotting.apex_curves(sweeps)
    assert fig.layout.yaxis2.side == "right"
    legend = fig.layout.legend
    # a horizontal legend outside the plot area (above or below), never on the right margin
    assert legend.orientation == "h"
    assert legend.y is not None and (legend.y < 0 or legend.y > 1)


# ----------------------------------------------------------------------------- 3. path graph
def test_path_graph_has_a_sign_legend():
    fig = plotting.path_graph([("0.1", "1.3.k"), ("1.3", "logits")], weights=[0.5, -2.0])
    legend = [t for t in fig.data if t.showlegend]
    names = " ".join(t.name for t in legend)
    assert len(legend) == 2 and "positive" in names and "negative" in names
    colours = {t.line.color for t in fig.data if t.mode == "lines" and not t.showlegend}
    assert colours == {t.line.color for t in legend}  # the legend shows the colours drawn


@pytest.mark.parametrize(
    "edge", [("1.0", "1.3.k"), ("1.0", "1.3"), ("1.3", "0.1.q"), ("m1", "1.0.q"), ("m0", "m0")]
)
def test_path_graph_refuses_impossible_edges(edge):
    with pytest.raises(apexlens.ApexlensError, match="not a path") as e:
        plotting.path_graph([edge])
    assert len(str(e.value).splitlines()) == 1


def test_path_graph_of_a_result_draws_only_real_paths(induction):
    _, _, exp = induction
    # layer-1 senders have no path to 1.3.k: they must not show up as edges
    res = exp.path_patch("all-heads", "1.3.k")
    fig = plotting.path_graph(res, top_k=5)
    lines = [t for t in fig.data if t.mode == "lines" and not t.showlegend]
    assert lines and all(t.name.startswith("0.") for t in lines)
    assert len(lines) == 4
