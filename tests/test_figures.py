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
def _lines(fig):
    return [t for t in fig.data if t.mode == "lines" and not t.showlegend]


def test_path_graph_has_a_sign_and_width_legend():
    fig = plotting.path_graph([("0.1", "1.3.k"), ("1.3", "logits")], weights=[0.5, -2.0])
    legend = [t for t in fig.data if t.showlegend]
    signs = [t for t in legend if not t.name.startswith("width")]
    names = " ".join(t.name for t in signs)
    assert len(signs) == 2 and "positive" in names and "negative" in names
    colours = {t.line.color for t in _lines(fig)}
    assert colours == {t.line.color for t in signs}  # the legend shows the colours drawn
    widths = [t for t in legend if t.name.startswith("width")]  # and what width means
    assert [t.name for t in widths] == ["width: |weight| = 2", "width: |weight| = 0.5"]
    drawn = sorted(t.line.width for t in _lines(fig))
    assert drawn == sorted(t.line.width for t in widths)


def test_path_graph_draws_q_k_v_as_ports_one_line_per_edge():
    edges = [("embed", "1.3.q"), ("embed", "1.3.v"), ("embed", "1.3.k"), ("0.1", "1.3.k")]
    fig = plotting.path_graph(edges)
    lines = _lines(fig)
    assert [t.name for t in lines] == [f"{s} -> {r}" for s, r in edges]
    ends = {t.name: (t.x[-1], t.y[-1]) for t in lines}
    q, k, v = (ends[f"embed -> 1.3.{c}"] for c in "qkv")
    assert q[1] > k[1] > v[1] and q[0] == k[0] == v[0]  # three ports, q on top
    assert ends["0.1 -> 1.3.k"] == k  # two senders into one port meet there
    starts = {(t.x[0], t.y[0]) for t in lines if t.name.startswith("embed")}
    assert len(starts) == 3  # and leave their sender each at its own point: no merged lines
    notes = " ".join(a.text for a in fig.layout.annotations)
    assert all(f"1.3.{c}" in notes for c in "qkv")  # each port labelled with its full name


def test_path_graph_hovers_anywhere_along_a_line():
    fig = plotting.path_graph([("embed", "1.3.q"), ("0.2", "m1")], weights=[0.25, -1.0])
    for t in _lines(fig):
        assert len(t.x) >= 8 and t.name in t.hovertemplate
        steps = [((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5
                 for x0, y0, x1, y1 in zip(t.x, t.y, t.x[1:], t.y[1:], strict=False)]
        assert max(steps) < 0.06  # a hover point every few pixels, end to end


def test_path_graph_lines_pass_between_boxes_not_behind_them():
    fig = plotting.path_graph([("embed", "1.1.q"), ("embed", "0.1.v"), ("0.0", "1.0.k")])
    boxes = [(s.x0, s.x1, s.y0, s.y1) for s in fig.layout.shapes if s.type == "rect"]
    for t in _lines(fig):
        inside = [
            (x, y) for x, y in zip(t.x[1:-1], t.y[1:-1], strict=True)
            for x0, x1, y0, y1 in boxes if x0 < x < x1 and y0 < y < y1
        ]
        assert not inside, t.name


def test_joint_path_graph_gives_one_number_per_sender(induction):
    _, _, exp = induction
    keys = [f"1.{h}.k" for h in range(4)]
    res = exp.path_patch("heads:0", keys)
    fig = plotting.path_graph(res, top_k=4)
    lines = _lines(fig)
    assert len(lines) == 16 and {t.line.color for t in lines} == {"#8c8c8c"}
    norm = res.normalized().tolist()
    notes = [a.text for a in fig.layout.annotations]
    for i, s in enumerate(res.senders):
        number = f"{norm[i]:+.2f}"
        assert sum(number in n and s in n for n in notes) == 1  # once, on the sender's box
        assert not any(f"{norm[i]:+.4g}" in t.hovertemplate.split(":")[-1] for t in lines
                       if t.name.startswith(s) and "joint" not in t.hovertemplate)
    assert all(any(k in n for n in notes) for k in keys)  # receivers named 1.h.k
    assert "joint" in fig.layout.title.text


def test_scores_plot_takes_a_circuit_result(induction):
    _, _, exp = induction
    circuit = exp.evaluate_circuit([("0.1", "1.3.k"), ("1.3", "logits")])
    fig = plotting.scores_plot(circuit)
    names = [t.name for t in fig.data if t.type == "box"]
    assert names == ["clean", "circuit", "ablated (resample)"]
    with pytest.raises(apexlens.ApexlensError, match="scores_plot takes"):
        plotting.scores_plot(42)


def test_apex_curves_right_axis_has_round_ticks(sweeps):
    # plotly's default for an overlaying axis ("sync") ticks it level with the left axis'
    # gridlines, at values such as 2.066 and 2.7536
    y2 = plotting.apex_curves(sweeps).layout.yaxis2
    assert y2.tickmode == "auto" and y2.showgrid is False


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
    lines = _lines(fig)
    assert lines and all(t.name.startswith("0.") for t in lines)
    assert len(lines) == 4
