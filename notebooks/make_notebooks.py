"""Writes the tutorial notebooks (run it after changing a cell; the test suite executes them)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

IOI = [
    new_markdown_cell(
        "# Probing GPT-2's heads on IOI with path patching\n\n"
        "Indirect object identification (Wang et al. 2022): *When Mary and John went to the store, "
        "John gave a drink to* -> *Mary*. We path-patch every head to the logits, then to the "
        "name-mover heads' queries. This needs GPT-2 from the Hugging Face hub; without it the "
        "notebook says so and runs the same analysis on the shipped `induction-2l` toy model."
    ),
    new_code_cell(
        "import plotly.io as pio\n"
        "import apexlens\n"
        "from apexlens import plotting\n"
        "from apexlens.tasks import get_task\n\n"
        'pio.renderers.default = "plotly_mimetype+notebook"\n'
        "try:\n"
        '    model = apexlens.load_model("gpt2")\n'
        '    task = get_task("ioi", tokenizer=model.tokenizer)\n'
        '    receivers = ["9.9.q", "9.6.q", "10.0.q"]  # the name movers\n'
        "except apexlens.ApexlensError as err:\n"
        '    print("GPT-2 is not available here:", str(err)[:160])\n'
        '    print("Running on the shipped induction-2l model instead.")\n'
        '    model = apexlens.load_model("induction-2l")\n'
        '    task = get_task("induction")\n'
        "    receivers = None\n"
        "batch = task.batch(16, seed=0)\n"
        "exp = apexlens.Experiment(model, batch.clean_tokens, batch.corrupted_tokens,\n"
        "                          metric=batch.logit_diff(), positions=batch.named_positions)\n"
        'print(f"clean logit diff {exp.clean_values.mean():.3f}, corrupted {exp.corrupted_values.mean():.3f}")'
    ),
    new_markdown_cell("## Every head -> logits (MLPs recomputed on the way)"),
    new_code_cell(
        'to_logits = exp.path_patch("all-heads", "logits")\nplotting.head_heatmap(to_logits)'
    ),
    new_markdown_cell(
        "## Every head -> the receivers' queries (or the strongest layer-1 head's key)"
    ),
    new_code_cell(
        "if receivers is None:\n"
        "    strongest = int(to_logits.normalized()[1].argmin())\n"
        '    receivers = [f"1.{strongest}.k"]\n'
        'to_receivers = exp.path_patch("all-heads", receivers)\n'
        "print(to_receivers.to_frame().sort_values('normalized').head(5).to_string(index=False))\n"
        "plotting.head_heatmap(to_receivers)"
    ),
    new_code_cell("plotting.path_graph(to_receivers, top_k=5)"),
]

APEX = [
    new_markdown_cell(
        "# APEX: finding a backdoor target from clean inputs\n\n"
        "APEX (Ren, Luo, Li 2026) adds Gaussian noise to hidden activations, inputs and weights "
        "fixed. Small noise measures how stable each prediction is; large noise makes "
        "predictions concentrate on what the *model* is biased toward. The shipped `backdoor` "
        "model answers a fixed target whenever a trigger token appears; we never show it the "
        "trigger, and still find the target."
    ),
    new_code_cell(
        "import plotly.io as pio\n"
        "import plotly.express as px\n"
        "import apexlens\n"
        "from apexlens import plotting\n"
        "from apexlens.tasks import get_task\n\n"
        'pio.renderers.default = "plotly_mimetype+notebook"\n'
        'task = get_task("backdoor")\n'
        "tokens = task.batch(64, seed=0).clean_tokens  # no trigger anywhere\n"
        "labels = task.token_labels(range(task.d_vocab))\n"
        "sigmas = [0.25, 0.5, 1, 2, 4, 8]\n"
        "sweeps = {name: apexlens.apex(apexlens.load_model(name), tokens, sigmas=sigmas, n_draws=32,\n"
        '                              sites="embed", relative=True, seed=0, token_labels=labels)\n'
        '          for name in ("backdoor", "backdoor-clean")}\n'
        "apexlens.compare(sweeps)"
    ),
    new_code_cell("plotting.apex_curves(sweeps)"),
    new_code_cell('plotting.token_histogram(sweeps["backdoor"], 4.0)'),
    new_markdown_cell("## Sample regularity: confident samples escape later"),
    new_code_cell(
        'res = sweeps["backdoor-clean"]\n'
        "px.scatter(x=res.clean_margin.tolist(), y=res.escape_noise.tolist(),\n"
        '           labels={"x": "clean logit margin (top-1 minus top-2)", "y": "escape noise"})'
    ),
]


DISCOVERY = [
    new_markdown_cell(
        "# Discovering the induction circuit, and auditing the fast attributions\n\n"
        "The shipped `induction-2l` model continues repeated token blocks: on *A B C ... A B* it "
        "predicts *C*. We ask which **edges** of its computational graph carry that behaviour. "
        "The corrupted prompts replace the first copy of the block, so the previous-token "
        "information an induction head's keys need is gone while its query is unchanged.\n\n"
        "Plan: (1) score every edge exactly -- the true change of the logit difference when that "
        "single edge is ablated -- and with the gradient approximations EAP and EAP-IG; (2) "
        "audit the approximations against the exact scores; (3) compare their MIB faithfulness "
        "curves; (4) prune greedily, exactly, to a small circuit."
    ),
    new_code_cell(
        "import plotly.io as pio\n"
        "import apexlens\n"
        "from apexlens import plotting_discovery as pdisc\n\n"
        'pio.renderers.default = "plotly_mimetype+notebook"\n'
        'model = apexlens.load_model("induction-2l")\n'
        'batch = apexlens.get_task("induction").batch(32, seed=0)\n'
        "metric = batch.logit_diff()\n"
        "exp = apexlens.Experiment(model, batch.clean_tokens, batch.corrupted_tokens, metric=metric)\n"
        "scores = {m: apexlens.attribute_edges(exp, None, None, metric=metric, method=m, ig_steps=5)\n"
        '          for m in ("exact", "eap", "eap-ig")}\n'
        'print(len(scores["exact"]), "edges")\n'
        'scores["exact"].summary(8)'
    ),
    new_markdown_cell(
        "## Auditing EAP and EAP-IG against the exact effects\n\n"
        "Rank correlation, top-k overlap, and the edges with a large true effect that an "
        "approximation ranks low. Attention patterns here are sharp, so gradients through the "
        "softmax are small even where swapping the key changes everything: that is where a "
        "first-order method misses."
    ),
    new_code_cell(
        'for m in ("eap", "eap-ig"):\n'
        '    audit = scores[m].compare(scores["exact"])\n'
        "    print(audit)\n"
        "audit.missed"
    ),
    new_code_cell('pdisc.score_scatter(scores["eap-ig"], scores["exact"])'),
    new_markdown_cell(
        "## Faithfulness the MIB way\n\n"
        "Keep the top 0.1% ... 100% of edges by |score| and evaluate each circuit exactly: "
        "`f = (m(circuit) - m(empty)) / (m(full) - m(empty))`. CPR is the area under `f` "
        "(higher is better), CMD the area under `|1 - f|` (lower is better)."
    ),
    new_code_cell(
        "curves = {m: apexlens.faithfulness(exp, None, None, s, metric=metric) for m, s in scores.items()}\n"
        "pdisc.faithfulness_curve(curves)"
    ),
    new_markdown_cell(
        "## Greedy exact pruning (ACDC semantics)\n\n"
        "From the logits backwards, try removing each edge (least important first); keep the "
        "removal when the logit difference moves by less than the threshold. Every step is an "
        "exact circuit evaluation. We expect the textbook induction circuit: a previous-token "
        "head in layer 0 feeding the keys of induction heads in layer 1, whose values read the "
        "token embedding and whose outputs reach the logits."
    ),
    new_code_cell(
        "gap = float(exp.clean_values.mean() - exp.corrupted_values.mean())\n"
        'found = apexlens.discover(exp, None, None, metric=metric, threshold=0.02 * gap, order=scores["exact"])\n'
        "print(found)\n"
        "print(sorted(found.edges))\n"
        'pdisc.circuit_graph(found, scores["exact"])'
    ),
    new_markdown_cell(
        "**Reading it.** The kept edges run `embed -> 0.x.v` (the previous-token head copies "
        "the token), `0.x -> 1.y.k` (its output becomes the induction heads' keys), "
        "`embed -> 1.y.q/v` and `1.y -> logits`. The audit tells us how far a gradient ranking "
        "can be trusted on this model before spending exact evaluations on it."
    ),
]


def main() -> None:
    for name, cells in (
        ("01_ioi_path_patching.ipynb", IOI),
        ("02_apex_backdoor.ipynb", APEX),
        ("03_discovery.ipynb", DISCOVERY),
    ):
        nb = new_notebook(
            cells=cells,
            metadata={
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
            },
        )
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
