"""Issue 26 in a real browser: the workbench page on ``induction-2l`` in headless Chromium.

Clicks edges and checks that the numbers the page shows (``#recovery``, ``#explained``)
equal ``Experiment.evaluate_circuit`` on the same edges; loads a saved circuit through the
upload control; compares two hypotheses; uploads a corrupt JSON and checks that the page
shows an error and keeps working.

Chromium is the system's (``make test`` installs it with apt when missing and run as
root; so does this module's set-up); playwright drives it without downloading a browser.
Skipped only when Chromium is absent and cannot be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import apexlens
from apexlens.ui.workbench import engine
from apexlens.ui.workbench.app import serve
from apexlens.ui.workbench.render import fmt
from apexlens.ui.workbench.session import Session

pytest.importorskip("dash")
sync_api = pytest.importorskip("playwright.sync_api")

N, SEED = 8, 0
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
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


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"], check=False, env=env, timeout=900
        )
        return shutil.which("chromium")
    return None


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:
        pytest.skip("no Chromium and it cannot be installed here (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served():
    model = apexlens.load_model("induction-2l")
    session = Session.for_model(model, "induction", n=N, seed=SEED, title="induction-2l")
    server = serve(session, port=0)
    b = apexlens.get_task("induction").batch(N, seed=SEED)
    reference = apexlens.Experiment(
        model,
        b.clean_tokens,
        b.corrupted_tokens,
        metric=b.logit_diff(),
        positions=b.named_positions,
    )
    yield server.url, session, reference
    server.stop()


@pytest.fixture()
def page(browser, served):
    url, session, _ = served
    session.start_full()
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(20_000)
    pg.goto(url)
    pg.wait_for_selector('[data-edge="0.1->1.3.k"][data-in="1"]')
    yield pg
    pg.close()


def _expect_numbers(pg, reference, edges) -> None:
    """The page's numbers are evaluate_circuit's on ``edges``, to the printed precision."""
    want = reference.evaluate_circuit(edges)
    rec, expl = fmt(want.recovery), fmt(want.proportion_explained)
    pg.wait_for_function(
        "([r, e]) => document.getElementById('recovery').innerText === r"
        " && document.getElementById('explained').innerText === e",
        arg=[rec, expl],
    )
    assert pg.inner_text("#recovery") == rec and pg.inner_text("#explained") == expl


def _click_edge(pg, edge: str) -> None:
    before = pg.get_attribute(f'[data-edge="{edge}"]', "data-in")
    pg.click(f'[data-edge="{edge}"]')
    after = "0" if before == "1" else "1"
    pg.wait_for_selector(f'[data-edge="{edge}"][data-in="{after}"]')


def test_clicking_edges_shows_evaluate_circuit_numbers(page, served):
    _, session, reference = served
    drawn = page.eval_on_selector_all("[data-edge]", "els => els.map(e => e.dataset.edge)")
    assert sorted(drawn) == sorted(session.universe)  # every edge of the small graph is drawn
    covered = page.evaluate(
        """() => [...document.querySelectorAll('[data-edge]')].filter(el => {
            const r = el.getBoundingClientRect();
            const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
            return !hit || hit.closest('[data-edge]') !== el;
        }).map(el => el.dataset.edge)"""
    )
    assert covered == []  # every edge's own element is a free click target
    edges = {f"{s}->{r}" for s, r in apexlens.full_graph(reference.model)}
    for edge in ["0.1->1.3.k", "embed->0.1.v", "1.2->logits"]:
        _click_edge(page, edge)
        edges.discard(edge)
        _expect_numbers(page, reference, [tuple(e.split("->")) for e in edges])
    assert session.edges == edges
    _click_edge(page, "1.2->logits")  # and back
    edges.add("1.2->logits")
    _expect_numbers(page, reference, [tuple(e.split("->")) for e in edges])
    page.click("#undo")
    edges.discard("1.2->logits")
    _expect_numbers(page, reference, [tuple(e.split("->")) for e in edges])


def test_load_compare_and_a_corrupt_file(page, served, tmp_path):
    _, session, reference = served
    saved = tmp_path / "induction.json"
    saved.write_text(engine.circuit_to_json(INDUCTION))
    page.set_input_files("#upload input[type=file]", str(saved))
    _expect_numbers(page, reference, INDUCTION)
    page.wait_for_function(
        "n => document.querySelectorAll('[data-edge][data-in=\"1\"]').length === n",
        arg=len(INDUCTION),
    )  # the circuit view is redrawn after the numbers
    shown = page.eval_on_selector_all(
        '[data-edge][data-in="1"]', "els => els.map(e => e.dataset.edge)"
    )
    assert sorted(shown) == sorted(f"{s}->{r}" for s, r in INDUCTION)

    # save it again: the download is the same circuit
    with page.expect_download() as dl:
        page.click("#export-json")
    saved_again = json.loads(open(dl.value.path()).read())
    assert sorted(map(tuple, saved_again["edges"])) == sorted(INDUCTION)

    # compare: the full graph (first in the history) as A, the loaded circuit as B
    first = session.history[0].id
    loaded = session.current.id
    page.click(f'[data-entry="{first}"] button:text-is("A")')
    page.click(f'[data-entry="{loaded}"] button:text-is("B")')
    page.wait_for_function(
        "t => document.getElementById('compare-recovery-a')?.innerText === t", arg=fmt(1.0)
    )
    full = reference.evaluate_circuit([tuple(e.split("->")) for e in session.universe])
    loaded_result = reference.evaluate_circuit(INDUCTION)
    assert page.inner_text("#compare-recovery-a") == fmt(full.recovery)
    assert page.inner_text("#compare-recovery-b") == fmt(loaded_result.recovery)
    assert page.inner_text("#compare-explained-b") == fmt(loaded_result.proportion_explained)
    only_a = page.eval_on_selector_all("#compare-only-a li", "els => els.map(e => e.innerText)")
    assert len(only_a) == 81 - len(INDUCTION) and "0.0->logits" in only_a
    assert page.eval_on_selector_all("#compare-only-b li", "els => els.length") == 0

    # a corrupt file: a message in the page, nothing changed, the page keeps working
    page.set_input_files(
        "#upload input[type=file]",
        files=[{"name": "broken.json", "mimeType": "application/json", "buffer": b'{"edges": ['}],
    )
    page.wait_for_selector(".wb-msg.error")
    assert "broken.json is not valid JSON" in page.inner_text("#message")
    assert page.inner_text("#recovery") == fmt(loaded_result.recovery)
    page.fill("#edge-text", "1.3->0.1.k")
    page.click("#edge-add")
    page.wait_for_function(
        "() => document.getElementById('message').innerText.includes('goes backwards')"
    )
    _click_edge(page, "1.3->logits")
    _expect_numbers(page, reference, [e for e in INDUCTION if e != ("1.3", "logits")])
    page.wait_for_function("() => !document.querySelector('.wb-msg.error')")  # cleared
    page.set_input_files("#upload input[type=file]", str(saved))  # the same file again
    _expect_numbers(page, reference, INDUCTION)
