"""Figures, the HTML report, the demo and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import apexlens
from apexlens.toys.models import load_model
from apexlens.toys.tasks import get_task
from apexlens.ui import plotting
from apexlens.ui.cli import main


@pytest.fixture(scope="module")
def induction():
    model = load_model("induction-2l")
    batch = get_task("induction").batch(8, seed=0)
    exp = apexlens.Experiment(
        model, batch.clean_tokens, batch.corrupted_tokens, metric=batch.logit_diff()
    )
    return model, batch, exp


def test_head_heatmap(induction):
    _, _, exp = induction
    res = exp.path_patch("all-heads", "logits")
    fig = plotting.head_heatmap(res)
    heat = fig.data[0]
    assert heat.zmid == 0
    torch.testing.assert_close(torch.tensor(heat.z, dtype=torch.float64), res.normalized().double())
    assert heat.customdata[1][3][0] == "1.3"
    assert heat.customdata[1][3][1] == pytest.approx(float(res.values[1, 3]))
    raw = plotting.head_heatmap(res, normalized=False).data[0]
    assert raw.z[0][0] == pytest.approx(
        float(res.values[0, 0] - res.clean.mean), rel=1e-3, abs=1e-6
    )
    with pytest.raises(apexlens.ApexlensError, match="all heads"):
        plotting.head_heatmap(exp.path_patch(["0.1"], "logits"))


def test_path_graph(induction):
    _, _, exp = induction
    edges = [("embed", "0.1.q"), ("0.1", "1.3.k"), ("1.3", "logits")]
    fig = plotting.path_graph(edges, weights=[0.5, -2.0, 1.0])
    lines = {t.name: t for t in fig.data if t.mode == "lines" and not t.showlegend}
    assert set(lines) == {"embed -> 0.1.q", "0.1 -> 1.3.k", "1.3 -> logits"}
    # width follows |effect|
    assert lines["0.1 -> 1.3.k"].line.width > lines["embed -> 0.1.q"].line.width
    nodes = next(t for t in fig.data if t.mode == "markers")  # a box each, hover names it
    names = [text.split("<br>")[0] for text in nodes.text]
    assert set(names) == {"embed", "0.1", "1.3", "logits"}
    xs = dict(zip(names, nodes.x, strict=True))
    assert xs["embed"] < xs["0.1"] < xs["1.3"] < xs["logits"]  # laid out by layer
    top = plotting.path_graph(exp.path_patch("all-heads", "logits"), top_k=3)
    assert len([t for t in top.data if t.mode == "lines" and not t.showlegend]) == 3


def test_apex_figures_and_scores_plot():
    tokens = get_task("backdoor").batch(16, seed=0).clean_tokens
    sweeps = {
        name: apexlens.apex(
            load_model(name), tokens, sigmas=[0.5, 2.0], n_draws=4, sites="embed", relative=True
        )
        for name in ("backdoor", "backdoor-clean")
    }
    fig = plotting.apex_curves(sweeps)
    assert len(fig.data) == 4 and fig.layout.xaxis.type == "log"
    assert list(fig.data[0].y) == sweeps["backdoor"].summary()["top1_share"].tolist()
    hist = plotting.token_histogram(sweeps["backdoor"], 2.0)
    ids, counts = sweeps["backdoor"].histogram(2.0)
    assert sum(hist.data[0].customdata) == int(counts[:15].sum())
    s = apexlens.Scores(torch.arange(10.0))
    sp = plotting.scores_plot({"a": s})
    mean_trace = sp.data[1]
    assert mean_trace.y[0] == pytest.approx(4.5) and mean_trace.error_y.array[0] > 0


def test_cli_help_and_errors(capsys):
    for cmd in (
        ["--help"],
        ["path-patch", "--help"],
        ["apex", "--help"],
        ["demo", "--help"],
        ["visualize", "--help"],
    ):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
    assert "--receivers" in capsys.readouterr().out
    for argv, message in [
        (["path-patch", "induction-2l", "--senders", "0.9"], "out of range"),
        (["path-patch", "induction-2l", "--receivers", "nowhere"], "unknown node"),
        (["apex", "backdoor", "--sigmas", "-1"], "sigma"),
        (["apex", "backdoor", "--sigmas", "a,b"], "numbers"),
        (["bogus"], "invalid choice"),
        (["path-patch"], "required"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_outputs(tmp_path, capsys):
    out = tmp_path / "pp"
    assert main(["path-patch", "induction-2l", "--n", "4", "--out", str(out)]) == 0
    import pandas as pd

    frame = pd.read_csv(out / "path_patch.csv")
    assert len(frame) == 8 and {"sender", "value", "normalized"} <= set(frame.columns)
    summary = json.loads((out / "path_patch.json").read_text())
    assert len(summary["values"]) == 2 and len(summary["values"][0]) == 4
    assert "Plotly.newPlot" in (out / "path_patch.html").read_text()
    out2 = tmp_path / "ap"
    assert (
        main(
            ["apex", "backdoor", "--n", "4", "--sigmas", "1,4", "--draws", "4", "--out", str(out2)]
        )
        == 0
    )
    assert list(pd.read_csv(out2 / "apex.csv")["sigma"]) == [1.0, 4.0]
    assert json.loads((out2 / "apex.json").read_text())["summary"][0]["sigma"] == 1.0
    assert main(["models"]) == 0
    assert "induction-2l" in capsys.readouterr().out


def test_console_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "apexlens", "models"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and "backdoor-clean" in r.stdout
