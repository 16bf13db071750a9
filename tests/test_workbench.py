"""Issue 26: the workbench's state (Session), its adapters, exports and command line --
everything but the browser (tests/test_workbench_browser.py drives the page in Chromium).

The numbers a session shows must *equal* ``Experiment.evaluate_circuit`` on the same edges:
every check below builds its own Experiment on the same batch and compares exactly.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

import apexlens
from apexlens import ApexlensError
from apexlens.reference import naive_path_patch
from apexlens.ui.workbench import engine, loopback_warning
from apexlens.ui.workbench.session import Session, mib_node

from backends import model_backends

N, SEED = 8, 0
# the README's induction circuit (recovery about 1.04 on 32 prompts)
INDUCTION = [("embed", "0.1.v")] + [
    e
    for h in range(4)
    for e in [
        ("0.1", f"1.{h}.k"),
        ("embed", f"1.{h}.q"),
        ("embed", f"1.{h}.v"),
        (f"1.{h}", "logits"),
    ]
]
INDUCTION_NAMES = [f"{s}->{r}" for s, r in INDUCTION]


@pytest.fixture(scope="module")
def model():
    return apexlens.load_model("induction-2l")


@pytest.fixture(scope="module")
def reference(model):
    """An independent Experiment on the batch the session uses."""
    b = apexlens.get_task("induction").batch(N, seed=SEED)
    return apexlens.Experiment(
        model,
        b.clean_tokens,
        b.corrupted_tokens,
        metric=b.logit_diff(),
        positions=b.named_positions,
    )


@pytest.fixture()
def session(model):
    return Session.for_model(model, "induction", n=N, seed=SEED)


def _same_numbers(s: Session, ref: apexlens.Experiment) -> None:
    want = ref.evaluate_circuit(s.edge_pairs())
    assert s.current.recovery == want.recovery
    assert s.current.explained == want.proportion_explained
    assert torch.equal(
        torch.tensor(s.current.per_example, dtype=torch.float64), want.scores.values.double()
    )


# ----------------------------------------------------------------------------- numbers
def test_numbers_equal_evaluate_circuit_after_every_change(session, reference):
    assert session.current.recovery == 1.0 and len(session.edges) == len(session.universe) == 81
    _same_numbers(session, reference)
    for edge in ["0.1->1.3.k", "embed->0.1.v", "1.2->logits"]:
        session.toggle_edge(edge)
        assert edge not in session.edges
        _same_numbers(session, reference)
    session.set_edges(INDUCTION, "README circuit")
    _same_numbers(session, reference)
    session.toggle_node("1.3")
    assert not any(
        "1.3" in e.split("->")[0] or e.split("->")[1].startswith("1.3.") for e in session.edges
    )
    _same_numbers(session, reference)
    session.add_text("0.1@end->1.3.k@end, 1.3@end->logits")  # positions where the task names them
    assert {"0.1@end->1.3.k@end", "1.3@end->logits@end"} <= session.edges
    _same_numbers(session, reference)


def test_universe_is_full_graph_spelled_as_apexlens(session, model):
    want = {f"{s}->{r}" for s, r in apexlens.full_graph(model)}
    assert set(session.universe) == want
    assert "0.1->1.3.k" in want and "embed->logits" in want
    assert session.position_names == ["end"]  # prev / next differ between examples


def test_undo_redo_and_history(session):
    first = session.current
    a = session.toggle_edge("0.1->1.3.k")
    b = session.toggle_edge("0.1->1.2.k")
    assert [e.id for e in session.history] == [1, 2, 3]
    assert session.undo() is a and session.undo() is first
    assert session.edges == first.edges and not session.can_undo
    with pytest.raises(ApexlensError, match="nothing to undo"):
        session.undo()
    assert session.redo() is a and session.redo() is b
    with pytest.raises(ApexlensError, match="nothing to redo"):
        session.redo()
    session.undo()
    session.toggle_edge("embed->1.0.q")  # a new change clears redo
    assert not session.can_redo
    assert len(session.history) == 4  # revisited hypotheses are not evaluated twice
    restored = session.restore(1)
    assert restored is first and session.can_undo


def test_toggle_node_removes_then_adds_all_its_edges(session):
    full = session.edges
    session.toggle_node("0.1")
    touching = {e for e in full if e.startswith("0.1->") or e.split("->")[1].startswith("0.1.")}
    assert len(touching) == 16 and session.edges == full - touching
    session.toggle_node("0.1")
    assert session.edges == full
    session.toggle_node("1.3.k")  # a port: only the edges into it
    assert session.edges == full - {
        "embed->1.3.k",
        "0.0->1.3.k",
        "0.1->1.3.k",
        "0.2->1.3.k",
        "0.3->1.3.k",
    }
    session.start_empty()
    session.toggle_node("1.3", at="end")
    assert "0.1@end->1.3.k@end" in session.edges and "1.3@end->logits@end" in session.edges


def test_compare_two_hypotheses(session):
    session.toggle_edge("0.1->1.3.k")
    session.toggle_edge("embed->0.1.v")
    c = session.compare(1, 3)
    assert c["only_a"] == ["embed->0.1.v", "0.1->1.3.k"] and c["only_b"] == []
    assert c["common"] == 79 and c["a"].recovery == 1.0 and c["b"] is session.current
    with pytest.raises(ApexlensError, match="no hypothesis #99"):
        session.compare(1, 99)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "text, message",
    [
        ("1.3->0.1.k", "cannot exist: it goes backwards"),
        ("0.1->0.2.q", "heads of the same layer"),
        ("5.1->logits", "this model has 2 layers of 4 heads"),
        ("0.1->m0", "this model has no MLPs"),
        ("logits->1.3.q", "logits does not send"),
        ("0.1->embed", "embed does not receive"),
        ("0.1.q->1.3.k", "does not send"),
        ("0.1@prev->1.3.k", "differs between examples"),
        ("0.1@end->1.3.k@3", "joins different positions"),
        ("0.1@99->1.3.k", "out of range"),
        ("0.1@nowhere->1.3.k", "unknown position name"),
        ("0.x->1.3.k", "edge 0.x -> 1.3.k"),
        ("hello", "is not an edge"),
        ("", "no edge given"),
    ],
)
def test_impossible_edges_are_refused_and_change_nothing(session, text, message):
    before, n = session.edges, len(session.history)
    with pytest.raises(ApexlensError, match=re.escape(message)):
        session.add_text(text)
    assert session.edges == before and len(session.history) == n


# ----------------------------------------------------------------------------- files
def test_circuit_json_round_trip(session, model):
    session.set_edges(INDUCTION)
    text = session.to_json()
    obj = json.loads(text)
    assert obj["format"] == "apexlens.circuit" and obj["version"] == 1
    assert obj["ablation"] == "resample" and sorted(map(tuple, obj["edges"])) == sorted(INDUCTION)
    other = Session.for_model(model, "induction", n=N, seed=SEED, start="empty")
    other.load_json(text, "c.json")
    assert other.edges == session.edges and other.current.recovery == session.current.recovery
    assert engine.circuit_from_json(obj) == (session.edge_pairs(), "resample")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"format": "apexlens.circuit", "edges": [["0.1", ', "not valid JSON (line 1"),
        (b"\xff\xfe", "not valid JSON"),
        ("[1, 2]", "not a circuit file"),
        ('{"format": "apexlens.circuit", "version": 2, "edges": []}', "version 2 is not supported"),
        ('{"format": "other", "version": 1, "edges": []}', "not an apexlens circuit"),
        ('{"format": "apexlens.circuit", "version": 1, "edges": [["0.1"]]}', "edge 0 is ['0.1']"),
        (
            '{"format": "apexlens.circuit", "version": 1, "edges": [["1.3", "0.1.k"]]}',
            "goes backwards",
        ),
        ('{"edges": {"a0.h1->a1.h3<k>": {"score": 1.0}}}', "no edge carries 'in_graph'"),
        (
            '{"edges": {"a0.h1->a1.mlp<k>": {"in_graph": true}}}',
            "node 'a1.mlp<k>' has no apexlens equivalent",
        ),
    ],
)
def test_bad_files_give_a_clear_message_and_change_nothing(session, text, message):
    before = session.edges
    with pytest.raises(ApexlensError, match=re.escape(message)):
        session.load_json(text, "bad.json")
    assert session.edges == before


def test_mib_graph_json_maps_onto_apexlens_edges(session, reference):
    graph = {
        "cfg": {"n_layers": 2},
        "nodes": {"input": {"in_graph": True}, "a0.h1": {"in_graph": True}},
        "edges": {
            "input->a0.h1<v>": {"score": 0.5, "in_graph": True},
            "a0.h1->a1.h3<k>": {"score": 1.2, "in_graph": True},
            "input->a1.h3<q>": {"score": 0.3, "in_graph": True},
            "a1.h3->logits": {"score": 0.9, "in_graph": True},
            "input->logits": {"score": 0.01, "in_graph": False},
        },
    }
    session.load_json(json.dumps(graph), "mib.json")
    assert session.edges == {"embed->0.1.v", "0.1->1.3.k", "embed->1.3.q", "1.3->logits"}
    _same_numbers(session, reference)
    assert [mib_node(n) for n in ("input", "a3.h7", "a3.h7<q>", "m2", "logits")] == [
        "embed",
        "3.7",
        "3.7.q",
        "m2",
        "logits",
    ]


# ----------------------------------------------------------------------------- batched
def _exp(model, n=N):
    b = apexlens.get_task("induction").batch(n, seed=SEED)
    return apexlens.Experiment(
        model,
        b.clean_tokens,
        b.corrupted_tokens,
        metric=b.logit_diff(),
        positions=b.named_positions,
    )


@pytest.mark.parametrize("backend", model_backends())
def test_evaluate_keep_is_evaluate_circuit_and_the_reference(toy_model_factory, backend):
    """``Experiment.evaluate_keep`` (what a toggle runs) on the keep-matrix of a hypothesis is
    ``evaluate_circuit`` on its edges, bit for bit, on both model classes; and the full graph
    minus one edge is the naive frozen path patch of that edge (float64, apexlens.reference)."""
    m64 = toy_model_factory("induction-2l", backend, torch.float64)
    exp = _exp(m64)
    index = exp.edge_index()
    full = [(str(s), str(r)) for s, r in apexlens.full_graph(m64)]
    hyps = [INDUCTION, [], full[::3], full, [("0.1@end", "1.3.k@end"), ("1.3", "logits")]]
    for edges in hyps:
        want = exp.evaluate_circuit(edges)
        got = exp.evaluate_keep(index.keep(edges, exp.n_pos, exp.named_positions))
        assert got.recovery == want.recovery
        assert got.proportion_explained == want.proportion_explained
        assert torch.equal(got.scores.values, want.scores.values)
        last = exp.n_pos - 1  # named from the matrix: @end is the last position
        assert sorted(got.edges) == sorted(
            (s.replace("@end", f"@{last}"), r.replace("@end", f"@{last}")) for s, r in edges
        )
    for s, r in [("0.1", "1.3.k"), ("embed", "0.1.v"), ("1.2", "logits")]:
        keep = index.keep(full, exp.n_pos)
        i, j = index.sender_id(apexlens.parse_node(s)), index.receiver_id(apexlens.parse_node(r))
        keep[i, j] = False
        slow = naive_path_patch(
            m64,
            exp.clean_tokens,
            exp.corrupted_tokens,
            senders=[s],
            receivers=[r],
            metric=exp.readout.metric,
            mlps="frozen",
        )[0]
        torch.testing.assert_close(exp.evaluate_keep(keep).scores.values, slow, rtol=0, atol=1e-9)


def test_evaluate_keep_refuses_a_matrix_that_is_not_one(reference):
    valid = reference.edge_index().valid
    for bad, message in [
        (valid.float(), "boolean tensor of shape"),
        (valid[:, :-1], "boolean tensor of shape"),
        ([[True]], "got list"),
        (~valid, "not an edge of this model's graph"),
    ]:
        with pytest.raises(ApexlensError, match=re.escape(message)):
            reference.evaluate_keep(bad)


def test_session_keep_matrices_are_edge_index_keep(session, reference):
    """The matrices a session evaluates are ``EdgeIndex.keep`` of its edges, positions too,
    whether built afresh or flipped from the last one (random walks of toggles)."""
    index = reference.edge_index()
    keeps = session.evaluator.keeps
    at_end = ["0.1@end->1.3.k@end", "embed@end->1.0.q@end", "0.1@end->1.2.k@end"]
    rng = random.Random(0)
    edges = set(INDUCTION_NAMES)
    walk = [frozenset(session.universe), frozenset(), frozenset(at_end), frozenset(edges)]
    for _ in range(60):
        e = rng.choice(session.universe + at_end)
        edges ^= {e}
        walk.append(frozenset(edges))
    walk.append(frozenset(rng.sample(session.universe, 70)))  # more than Keeps.FLIPS away
    for hyp in walk:
        want = index.keep(session.edge_pairs(hyp), reference.n_pos, reference.named_positions)
        got = keeps(hyp)
        assert torch.equal(got, want), sorted(hyp)
        got.fill_(True)  # the caller's copy: changing it changes nothing of the next ones


def test_weights_rows_equal_evaluate_circuit_per_hypothesis(model):
    """Weighing runs every leave-one-out hypothesis as a row of batched passes
    (``Experiment.evaluate_keeps``): each row is ``evaluate_circuit`` of that hypothesis."""
    s = Session(_exp(apexlens.load_model("induction-2l", dtype=torch.float64)), start=INDUCTION)
    s.add_text("0.1@end->1.3.k@end")
    w = s.weights()
    for edge in s.sorted(s.edges):
        without = s.exp.evaluate_circuit(s.edge_pairs(s.edges - {edge}))
        assert w[edge] == pytest.approx(s.current.recovery - without.recovery, abs=1e-10)


def test_weights_are_exact_removal_effects(session, reference):
    session.set_edges(INDUCTION)
    w = session.weights()
    assert set(w) == session.edges
    for edge in ["0.1->1.3.k", "embed->0.1.v", "1.0->logits"]:
        without = reference.evaluate_circuit(session.edge_pairs(session.edges - {edge}))
        assert w[edge] == pytest.approx(session.current.recovery - without.recovery, abs=1e-5)
    assert w["embed->0.1.v"] > 0.3  # the previous-token head's value input carries induction


# ----------------------------------------------------------------------------- starting points
def test_starting_points_match_the_library(session, reference):
    metric = reference.readout.metric
    scores = apexlens.attribute_edges(reference, None, None, metric=metric, method="eap")
    session.start_top_k("eap", 7)
    assert session.edge_pairs() == sorted(
        scores.top(7), key=lambda e: session.universe.index(f"{e[0]}->{e[1]}")
    )
    session.start_discover(threshold=0.1, method="eap")
    found = apexlens.discover(reference, None, None, metric=metric, threshold=0.1, order=scores)
    assert session.edges == {f"{s}->{r}" for s, r in found.edges}
    assert session.current.recovery == found.recovery
    session.start_empty()
    assert session.edges == frozenset()
    session.start_full()
    assert session.current.recovery == 1.0
    with pytest.raises(ApexlensError, match="method must be one of"):
        session.start_top_k("magic", 3)


def test_path_contributions_are_experiment_path_patch(session, reference):
    res = session.path_contributions("logits")
    want = reference.path_patch("all-heads", "logits")
    assert torch.equal(res.per_example, want.per_example)


# ----------------------------------------------------------------------------- exports
def test_snapshot_is_self_contained_and_defines_its_columns(session):
    session.toggle_edge("0.1->1.3.k")
    session.weights()
    session.path_contributions("logits")
    page = session.snapshot_html()
    assert page.count("<script") >= 1 and not re.search(r"<script[^>]*src=", page)  # inlined
    sections = page.split("<h2>")[1:]
    assert [s.split("</h2>")[0] for s in sections] == [
        "current hypothesis",
        "circuit",
        "per-example metric",
        "edge weights",
        "history",
        "heads → logits",
        "circuit JSON",
        "Provenance",
    ]
    for s in sections:
        head = re.search(r"<thead>(.*?)</thead>", s, re.S)
        if head:
            cols = [c.replace("<wbr>", "") for c in re.findall(r"<th[^>]*>(.*?)</th>", head.group(1))]
            defined = set(re.findall(r"<dt><code>(.*?)</code></dt>", s))
            assert set(cols) <= defined, (s[:40], set(cols) - defined)
    assert f"{session.current.recovery:.6f}" in page


def test_figures_export_and_app_builds(session):
    pytest.importorskip("dash")
    from apexlens.ui.workbench.app import make_app
    from apexlens.ui.workbench.figures import figures_html

    html = figures_html(session)
    assert html.count("plotly-graph-div") >= 2
    app = make_app(session)
    assert app.server is not None and app.config.suppress_callback_exceptions


def test_missing_dash_names_the_extra(monkeypatch, session):
    import builtins

    real = builtins.__import__

    def no_dash(name, *a, **k):
        if name == "dash" or name.startswith("dash."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dash)
    from apexlens.ui.workbench.app import make_app

    with pytest.raises(ApexlensError, match=re.escape('pip install "apexlens[workbench]"')):
        make_app(session)


# ----------------------------------------------------------------------------- serving
def test_loopback_by_default_and_a_warning_otherwise():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert loopback_warning(host) is None
    assert "anyone who can reach" in loopback_warning("0.0.0.0")
    assert "no authentication" in loopback_warning("192.168.1.5")


def test_notebook_function_serves_and_returns_the_session(reference, capsys):
    pytest.importorskip("dash")
    s = apexlens.workbench(reference, mode="server", start="empty")
    try:
        url = capsys.readouterr().out.strip().split()[2]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as r:
            page = r.read().decode()
        assert "apexlens workbench" in page and r.status == 200
        assert s.edges == frozenset() and s.exp is reference
    finally:
        s.server.stop()


def test_notebook_inline_runs_dash_in_jupyter_mode(reference, monkeypatch):
    dash = pytest.importorskip("dash")
    calls = {}
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: calls.update(kw))
    s = apexlens.workbench(reference, mode="inline")
    assert calls["jupyter_mode"] == "inline" and calls["debug"] is False
    assert calls["use_reloader"] is False and calls["host"] == "127.0.0.1"
    assert s.app is not None


def test_notebook_shows_the_page_inline_in_a_real_kernel():
    """``apexlens.workbench(...)`` in a Jupyter kernel displays the page inline (an iframe on
    127.0.0.1) and returns the session."""
    pytest.importorskip("dash")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "import apexlens\n"
        "s = apexlens.workbench('induction-2l', n=4)\n"
        "print(type(s).__name__, len(s.edges), s.current.recovery)"
    )
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code)]
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    frames = [o for o in outputs if "text/html" in o.get("data", {})]
    assert frames and re.search(
        r'<iframe[^>]*src="http://127\.0\.0\.1:\d+/"', frames[0]["data"]["text/html"]
    )
    assert any(o.get("text", "").startswith("Session 81 1.0") for o in outputs)


def test_cli_serves_and_prints_its_url(tmp_path):
    pytest.importorskip("dash")
    circuit = tmp_path / "c.json"
    circuit.write_text(engine.circuit_to_json(INDUCTION))
    cmd = [sys.executable, "-m", "apexlens", "workbench", "induction-2l", "--n", "4"]
    cmd += ["--no-browser", "--port", "0", "--circuit", str(circuit)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and "http://" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and "apexlens workbench" in r.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    pytest.importorskip("dash")
    from apexlens.ui.cli import main

    assert main(["workbench", "induction-2l", "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert main(["workbench", "induction-2l", "--circuit", str(tmp_path / "missing.json")]) == 2
    assert "--circuit" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert (
        main(["workbench", "induction-2l", "--n", "2", "--circuit", str(bad), "--no-browser"]) == 2
    )
    assert "bad.json is not valid JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors in the page
def _callback(url: str, app, output: str, trigger: str | dict, value, states=None):
    """POST one Dash callback request to a running workbench, as the page does: the
    callback whose outputs start with ``output``, fired by ``trigger`` (an id, or a
    pattern-matching id such as an edge's) with ``value``; ``states``: id -> value.
    Returns ``(status, JSON body or None)``."""
    key = next(k for k in app.callback_map if k.lstrip(".").startswith(output))
    spec = app.callback_map[key]
    inputs, changed = [], None
    for i in spec["inputs"]:
        if i["id"].startswith("{"):  # a pattern-matching input: only the triggering component
            hit = isinstance(trigger, dict) and trigger["type"] == json.loads(i["id"])["type"]
            inputs.append(
                [{"id": trigger, "property": i["property"], "value": value}] if hit else []
            )
            tid = json.dumps(trigger, sort_keys=True, separators=(",", ":")) if hit else None
        else:
            hit, tid = i["id"] == trigger, i["id"]
            inputs.append({**i, "value": value if hit else None})
        changed = f"{tid}.{i['property']}" if hit else changed
    names = key.split("@")[0].strip(".").split("...")
    outputs = [dict(zip(("id", "property"), o.split("."), strict=True)) for o in names]
    body = {
        "output": key,
        "outputs": outputs if len(outputs) > 1 else outputs[0],
        "inputs": inputs,
        "state": [{**s, "value": (states or {}).get(s["id"])} for s in spec.get("state", [])],
        "changedPropIds": [changed],
    }
    req = urllib.request.Request(
        url + "_dash-update-component",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if text else None
    except urllib.error.HTTPError as e:
        return e.code, None


@pytest.fixture()
def served(model):
    pytest.importorskip("dash")
    from apexlens.ui.workbench.app import serve

    s = Session.for_model(model, "induction", n=N, seed=SEED)
    server = serve(s, port=0)
    yield s, server
    server.stop()


def test_bad_input_in_a_callback_is_shown_in_the_page(served, monkeypatch):
    s, server = served

    def refuse(receiver):
        raise ApexlensError("no paths today")

    monkeypatch.setattr(s.evaluator, "path_contributions", refuse)
    status, body = _callback(server.url, server.app, "heat-logits.figure", "heat-go", 1)
    assert status == 200 and body["sideUpdate"]["message"]["children"] == "no paths today"
    # malformed click data (a click with no point): a message, not a crash
    status, body = _callback(
        server.url, server.app, "heat-qkv.figure", "heat-logits", {"points": []}
    )
    assert status == 200 and "bad input (IndexError" in body["sideUpdate"]["message"]["children"]
    status, body = _callback(
        server.url, server.app, "recovery", "edge-add", 1, {"edge-text": "1.3->0.1.k"}
    )
    assert status == 200 and "goes backwards" in body["response"]["message"]["children"]


def test_a_bug_in_a_callback_is_dashs_error_and_the_server_goes_on(served, reference):
    """An unexpected exception is not caught by the workbench: Dash answers that request
    with an error (500), the change is rolled back, and the next requests work."""
    s, server = served
    before, n = s.edges, len(s.history)
    working = s.state._evaluate_new

    def bug(*args):
        raise RuntimeError("a bug")

    s.state._evaluate_new = bug
    edge = {"type": "edge", "edge": "0.1->1.3.k"}
    assert _callback(server.url, server.app, "recovery", edge, 1)[0] == 500
    assert s.edges == before and len(s.history) == n
    s.state._evaluate_new = working
    status, body = _callback(server.url, server.app, "recovery", edge, 1)
    assert status == 200 and "0.1->1.3.k" not in s.edges
    want = reference.evaluate_circuit(s.edge_pairs())
    assert body["response"]["recovery"]["children"] == f"{want.recovery:.6f}"
    with urllib.request.urlopen(server.url, timeout=10) as r:
        assert r.status == 200
