"""Writes the tutorial notebooks (run it after changing a cell; the test suite executes them).

Each notebook tells a research story: the question, what each figure shows, what it means,
and what to try next, in markdown between the cells.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

# TransformerLens imports tqdm.auto, which warns in a notebook without ipywidgets and falls
# back to its plain text bar; that fallback is all we need, so the warning is filtered.
SETUP = (
    "import warnings\n"
    'warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm: text bars are fine\n'
)

PATHS = [
    new_markdown_cell(
        "# Path patching: how does `induction-2l` continue a repeated sequence?\n\n"
        "**Question.** `induction-2l`, a two-layer attention-only model shipped with apexlens, "
        "predicts the next token of a repeated block: after `... A B C D ... A B C` it says "
        "`D`. Which heads do that, and where do they get the information from?\n\n"
        "**Method.** Each clean prompt has a block of random tokens, later repeated in part; "
        "the *corrupted* prompt replaces the block's first copy with fresh tokens, so nothing "
        "earlier says what comes next. The metric is the logit difference *answer - wrong "
        "token* at the last position. Path patching replaces one component's output along one "
        "path with its corrupted value and measures how much of the clean-corrupted difference "
        "goes away.\n\n"
        "Everything but the last section runs offline on the shipped model; the last section "
        "repeats the classic IOI analysis on GPT-2 when the Hugging Face hub is reachable."
    ),
    new_code_cell(
        SETUP + "import plotly.io as pio\n"
        "import apexlens\n"
        "from apexlens.ui import plotting\n\n"
        'pio.renderers.default = "plotly_mimetype+notebook"\n'
        'model = apexlens.load_model("induction-2l")\n'
        'batch = apexlens.get_task("induction").batch(16, seed=0)\n'
        "exp = apexlens.Experiment(model, batch.clean_tokens, batch.corrupted_tokens,\n"
        "                          metric=batch.logit_diff(), positions=batch.named_positions)\n"
        'print(f"clean logit diff {exp.clean_values.mean():.2f}, corrupted {exp.corrupted_values.mean():.2f}")'
    ),
    new_markdown_cell(
        "The model is confident on clean prompts (a large positive logit difference) and "
        "wrong on corrupted ones (negative): there is a behaviour to explain.\n\n"
        "## 1. Which heads write the answer? Every head -> logits\n\n"
        "One cell per head: its direct path to the logits is patched (MLPs, if any, "
        "recomputed). Colour = normalised effect `(patched - clean) / (clean - corrupted)`: "
        "**0** = the path does nothing for this behaviour, **-1** = it carries the whole "
        "difference alone. Red cells are the heads we are looking for."
    ),
    new_code_cell(
        'to_logits = exp.path_patch("all-heads", "logits")\nplotting.head_heatmap(to_logits)'
    ),
    new_code_cell(
        "norm = to_logits.normalized()\n"
        "low, high = to_logits.normalized_ci()  # 95% bootstrap intervals over the prompts\n"
        "for h in range(model.cfg.n_heads):\n"
        '    print(f"head 1.{h}: {float(norm[1, h]):+.2f} [{float(low[1, h]):+.2f}, {float(high[1, h]):+.2f}]")\n'
        'print(f"layer 1 together: {float(norm[1].sum()):+.2f}; layer 0 together: {float(norm[0].sum()):+.2f}")\n'
        'info = apexlens.model_info("induction-2l")["behaviour"]\n'
        'print(f"attention scores: previous-token head {info[\'prev_token_head\']} {info[\'prev_token_score\']:.2f}, "\n'
        '      f"induction head {info[\'induction_head\']} {info[\'induction_score\']:.2f}")\n'
        "assert (norm[1] < -0.15).all() and abs(float(norm[0].sum())) < 0.05  # what the text below says"
    ),
    new_markdown_cell(
        "**What it means.** Layer 0 writes nothing the logits read directly. The behaviour is "
        "not one induction head: each of the four layer-1 heads carries a share of it (the "
        "printed numbers, with their intervals), and together they carry all of it. "
        "Attention patterns alone would have suggested one head, the one with the highest "
        "induction attention score (printed above), which attends most to the token after "
        "the earlier occurrence; the causal measure spreads the credit.\n\n"
        "## 2. Where do the layer-1 heads get the information? Layer-0 heads -> their keys\n\n"
        "An induction head must find *where* the current token occurred before; the "
        "corruption changes exactly that earlier context, which reaches the head through its "
        "**keys**. So we patch each layer-0 head's path into the keys of all four layer-1 heads "
        "at once (heads of layer 1 cannot be senders here: heads of one layer do not read each "
        "other). Patched into four receivers at once, each sender has *one joint* effect: the "
        "graph writes it on the sender's box and colours the box (red = patching lowers the "
        "logit difference, so the path carries the behaviour); the grey lines show which "
        "inputs were patched and carry no number of their own."
    ),
    new_code_cell(
        'keys = [f"1.{h}.k" for h in range(model.cfg.n_heads)]\n'
        'to_keys = exp.path_patch("heads:0", keys)\n'
        'print(to_keys.summary()[["sender", "normalized", "normalized_low", "normalized_high"]].round(2).to_string(index=False))\n'
        "plotting.path_graph(to_keys, top_k=4)"
    ),
    new_markdown_cell(
        "**What it means.** One layer-0 head, 0.1, matters: removing its path into the keys "
        "alone removes most of the behaviour, the other layer-0 heads nothing (their "
        "intervals include 0). It is the *previous-token head* (the highest previous-token "
        "attention score, printed in section 1): it writes 'the token before me was X' into "
        "every position, and the layer-1 heads' keys read it.\n\n"
        "## 3. Is that the whole mechanism? Test the circuit\n\n"
        "The hypothesis: embed -> 0.1 -> the keys of the four layer-1 heads, embed -> their "
        "queries and values, their outputs -> logits. Every other edge is ablated (replaced by "
        "its corrupted-run value). *Recovery* = `(circuit - ablated) / (clean - ablated)`: 1 = "
        "the circuit alone reproduces the clean behaviour. In the graph each head's query, key "
        "and value inputs are separate ports, one line per edge."
    ),
    new_code_cell(
        'edges = [("embed", "0.1.v")] + [e for h in range(model.cfg.n_heads) for e in [\n'
        '    ("0.1", f"1.{h}.k"), ("embed", f"1.{h}.q"), ("embed", f"1.{h}.v"), (f"1.{h}", "logits")]]\n'
        "circuit = exp.evaluate_circuit(edges)\n"
        "low, high = circuit.recovery_ci()\n"
        'print(f"{len(edges)} edges: recovery {circuit.recovery:.2f}, proportion explained "\n'
        '      f"{circuit.proportion_explained:.2f} (recovery 95% CI {low:.2f} to {high:.2f})")\n'
        'single = exp.evaluate_circuit([("embed", "0.1.v"), ("0.1", "1.3.k"), ("embed", "1.3.q"),\n'
        '                               ("embed", "1.3.v"), ("1.3", "logits")])\n'
        'print(f"with head 1.3 alone: recovery {single.recovery:.2f}")\n'
        "plotting.path_graph(circuit, n_layers=model.cfg.n_layers)"
    ),
    new_markdown_cell(
        "**What it means.** The circuit recovers the whole logit difference (the printed "
        "recovery and its interval), while the strongest head alone recovers only a fraction: "
        "the model spreads induction over all its layer-1 heads, fed by one previous-token "
        "head.\n\n"
        "**What to try next.**\n"
        '* `exp.path_patch(["0.1"], "logits", via=["1.3.k"])`: the two-hop path through '
        "one head's key only.\n"
        "* Drop heads from `edges` one at a time and watch the recovery fall.\n"
        '* `exp.evaluate_circuit(edges, ablation="mean")`: the same edges against an average '
        "input instead of the corrupted one (`circuit.ablation_meaning` says what changes).\n"
        '* `exp.act_patch("all-heads")` for the coarser activation-patching picture.\n\n'
        "## 4. The same on GPT-2: indirect object identification\n\n"
        "*When Mary and John went to the store, John gave a drink to* -> *Mary* "
        "(Wang et al. 2022). This needs GPT-2 from the Hugging Face hub; without it the cell "
        "says so in one line (within two seconds) and draws nothing."
    ),
    new_code_cell(
        "try:\n"
        '    gpt2 = apexlens.load_model("gpt2")\n'
        "except apexlens.ApexlensError as err:\n"
        '    print("GPT-2 is not available here:", err)\n'
        "    gpt2 = None\n"
        "if gpt2 is not None:\n"
        '    ioi = apexlens.get_task("ioi", tokenizer=gpt2.tokenizer).batch(16, seed=0)\n'
        "    ioi_exp = apexlens.Experiment(gpt2, ioi.clean_tokens, ioi.corrupted_tokens,\n"
        "                                  metric=ioi.logit_diff(), positions=ioi.named_positions)\n"
        '    ioi_heads = ioi_exp.path_patch("all-heads", "logits")\n'
        "    display(plotting.head_heatmap(ioi_heads))"
    ),
    new_markdown_cell(
        "**Reading the IOI map.** The paper's name-mover heads (9.9, 9.6, 10.0) should show "
        "as strong red cells: their direct path to the logits copies the indirect object's "
        "name. Next: patch every head to their queries, "
        '`ioi_exp.path_patch("all-heads", ["9.9.q", "9.6.q", "10.0.q"])`, to find the '
        "S-inhibition heads that tell them which name not to copy."
    ),
]

APEX = [
    new_markdown_cell(
        "# APEX on a transformer: a backdoor's target from clean inputs, and which samples "
        "are regular\n\n"
        "**Question.** APEX (Ren, Luo & Li 2026) adds Gaussian noise to every layer's activation, "
        "inputs and weights fixed, and reads the top-1 prediction over many draws. The paper "
        "claims two regimes: *large* noise washes the input out and exposes what the model "
        "itself is biased toward (a backdoor's target), *small* noise measures how regular each "
        "sample is (structured labels withstand more noise than random ones). Do both carry "
        "over to transformers, and can an auditor decide \"biased or not\" from the audited "
        "model alone?\n\n"
        "**Method.** The shipped `backdoor` model copies the first token of a prompt, except "
        "that a trigger token anywhere makes it answer token 23; `backdoor-clean` is its twin "
        "trained without the poisoned labels. The prompts below never contain the trigger. "
        "For small noise we use `modadd-labels-true` and `modadd-labels-random`: the same "
        "network trained on the same (a + b) mod 23 prompts with true or with random labels."
    ),
    new_code_cell(
        SETUP + "import pandas as pd\n"
        "import plotly.io as pio\n"
        "import torch\n"
        "import apexlens\n"
        "from apexlens.toys.models import training_samples\n"
        "from apexlens.ui import plotting\n\n"
        'pio.renderers.default = "plotly_mimetype+notebook"\n'
        'task = apexlens.get_task("backdoor")\n'
        "prompts = task.batch(64, seed=0).clean_tokens  # no trigger anywhere\n"
        "assert not (prompts == task.trigger).any()\n"
        'models = {name: apexlens.load_model(name) for name in ("backdoor", "backdoor-clean")}\n'
        "# where the noise goes: 'after each layer's activation', mapped four ways\n"
        "mappings = [(\"block_in\", True), (\"embed\", True), (\"resid_post\", False), "
        "(\"mlp_post\", False)]\n"
        "sigmas = [0.5, 2, 8, 64]\n"
        "rows = []\n"
        "for sites, relative in mappings:\n"
        "    for name, model in models.items():\n"
        "        res = apexlens.apex(model, prompts[:32], sigmas=sigmas, n_draws=8, sites=sites,\n"
        "                            relative=relative, seed=0)\n"
        "        share = (res.predictions == task.target).double().mean(dim=(1, 2))\n"
        '        rows.append({"sites": sites, "model": name,\n'
        '                     **{f"sigma={s:g}": round(float(v), 2) for s, v in zip(sigmas, share)}})\n'
        "protocols = pd.DataFrame(rows)\n"
        "protocols  # share of all noisy predictions that are the backdoor target (token 23)"
    ),
    new_markdown_cell(
        "## 1. Where does the noise go?\n\n"
        "In the paper's feed-forward networks the noisy activation of a layer is the next "
        "layer's input. A pre-norm transformer separates the two: a sublayer's output is added "
        "to the residual stream, and the skip connections carry anything added there straight "
        "to the unembedding. The table shows the consequence, as the backdoor target's share "
        "of the predictions for each mapping:\n\n"
        "* `resid_post` (noise on every block's output) and `mlp_post` (the paper's words taken "
        "literally: noise on phi(z)) give the target only a small share, flat as sigma grows: "
        "their noise reaches `ln_final` directly and, as it grows, the prediction becomes the "
        "unembedding's response to noise rather than anything the blocks compute.\n"
        "* `embed` (input perturbation, the special case the paper generalises) separates them "
        "only inside a window of sigma; at large sigma it decays the same way.\n"
        "* `block_in` puts the noise where each sublayer *reads* its input (after its norm) and "
        "keeps the residual stream clean: the paper's \"noisy activation feeds the next "
        "layer\". The target's share stays high for every large sigma on the backdoored model "
        "and near zero on its twin. It is apexlens' default.\n\n"
        "## 2. Large noise: is the model biased? The decision\n\n"
        "An auditor has no clean twin. `apex_bias` asks whether some token's share of the noisy "
        "predictions exceeds its share of the clean predictions by more than delta = 0.2, with "
        "the prompts as independent units, corrected for searching every sigma and token."
    ),
    new_code_cell(
        "decisions = {name: apexlens.apex_bias(model, prompts, token_labels=task.token_labels)\n"
        "             for name, model in models.items()}\n"
        "for name, d in decisions.items():\n"
        '    print(f"{name}: {d.verdict}")\n'
        "plotting.apex_bias_plot(decisions)"
    ),
    new_code_cell(
        'large = apexlens.apex(models["backdoor"], prompts, sigmas=[8.0], n_draws=32,\n'
        "                      token_labels=task.token_labels)\n"
        "plotting.token_histogram(large, 8.0)  # what the backdoored model answers under large noise"
    ),
    new_markdown_cell(
        "**What it means.** The printed verdicts are the decision, each with its share, "
        "interval and p-value: the backdoored model is flagged on its target `TARGET` (token "
        "23) from prompts that never contain the trigger, and its twin is not. The figure shows "
        "the evidence per sigma: the gain of the flagged token stands far above the tolerance "
        "(dashed), every gain of the twin stays below it. The histogram shows what the flagged "
        "share is: at large noise the backdoored model answers `TARGET` for a large part of all "
        "draws and prompts. The false-positive rate of this rule on 23 clean models (trained "
        "and random-init, several shapes and seeds) is in the README.\n\n"
        "## 3. Small noise: which samples are regular?\n\n"
        "A sample's *escape noise* is the sigma at which half of the noise directions have moved "
        "its prediction off the clean one, found by an adaptive search along each direction, "
        "with an interval. The paper's claim: samples of a model trained on structured labels "
        "withstand more noise than those of a model trained on random labels. We compare the two "
        "models' training samples (every third one) by the AUC P(escape of a true-label sample "
        "> escape of a random-label sample)."
    ),
    new_code_cell(
        "escape, samples = {}, {}\n"
        'for name in ("modadd-labels-true", "modadd-labels-random"):\n'
        "    s = training_samples(name)\n"
        '    idx = torch.arange(0, len(s["tokens"]), 3)\n'
        "    samples[name] = {k: v[idx] for k, v in s.items() if k != \"train_index\"}\n"
        "    escape[name] = apexlens.escape_noise(apexlens.load_model(name), samples[name][\"tokens\"],\n"
        '                                         labels=samples[name]["labels"], n_draws=16,\n'
        "                                         sigma_lo=0.02, sigma_hi=20.0)\n"
        'cmp = escape["modadd-labels-true"].compare(escape["modadd-labels-random"], ("true", "random"))\n'
        'print(f"AUC P(true > random) = {cmp.auc:.2f} [{cmp.low:.2f}, {cmp.high:.2f}] over "\n'
        '      f"{cmp.n[0]} + {cmp.n[1]} training samples; median escape noise "\n'
        '      f"{cmp.medians[0]:.3f} vs {cmp.medians[1]:.3f}")\n'
        "plotting.escape_distributions(escape, cmp)"
    ),
    new_markdown_cell(
        "**What it means.** The printed AUC and its interval say whether the structured "
        "model's samples withstand more noise (an interval above 0.5 means they do); the curves "
        "show the whole distributions. Within one model, does escape noise follow the usual "
        "regularity measures? Below: its rank correlation with the clean margin, the loss, and "
        "a learning-speed proxy of the C-score (each sample's mean correctness over the "
        "training checkpoints), with bootstrap intervals; then where predictions go when they "
        "escape, against chance."
    ),
    new_code_cell(
        'true = escape["modadd-labels-true"]\n'
        'regularity = true.correlations({"C-score proxy": samples["modadd-labels-true"]["c_score"]})\n'
        "print(regularity.round(3).to_string(index=False))\n"
        "destinations = true.destinations(classes=list(range(23)))\n"
        "plotting.escape_destinations(destinations)"
    ),
    new_markdown_cell(
        "## 4. What carries over from the paper\n\n"
        "Each claim against what these cells measured (the `here` column is computed above, "
        "`carries over` is decided from it):"
    ),
    new_code_cell(
        'rho = regularity.set_index("measure")\n'
        'runner = destinations.set_index("destination").loc["clean runner-up"]\n'
        "bd, cl = decisions[\"backdoor\"], decisions[\"backdoor-clean\"]\n"
        "pd.DataFrame([\n"
        '    {"claim": "large noise exposes a model-level bias (backdoor target), no twin needed",\n'
        '     "here": f"backdoor flagged on token {bd.token} (p = {bd.p_value:.1g}); twin gain {cl.gain:.2f}",\n'
        '     "carries over": bd.flagged and bd.token == task.target and not cl.flagged},\n'
        '    {"claim": "escape noise separates structured from random labels",\n'
        '     "here": f"AUC {cmp.auc:.2f} [{cmp.low:.2f}, {cmp.high:.2f}]",\n'
        '     "carries over": cmp.low > 0.5},\n'
        '    {"claim": "escape noise aligns with regularity: margin",\n'
        "     \"here\": f\"Spearman {rho.loc['margin', 'spearman']:.2f} [{rho.loc['margin', 'low']:.2f}, \"\n"
        "             f\"{rho.loc['margin', 'high']:.2f}]\",\n"
        "     \"carries over\": rho.loc['margin', 'low'] > 0},\n"
        '    {"claim": "... loss (lower loss escapes later)",\n'
        "     \"here\": f\"Spearman {rho.loc['loss', 'spearman']:.2f} [{rho.loc['loss', 'low']:.2f}, \"\n"
        "             f\"{rho.loc['loss', 'high']:.2f}]\",\n"
        "     \"carries over\": rho.loc['loss', 'high'] < 0},\n"
        '    {"claim": "escapes are semantically coherent (to the clean runner-up)",\n'
        '     "here": f"{runner.share:.2f} of escapes vs chance {runner.chance:.2f}",\n'
        '     "carries over": runner.share > 2 * runner.chance},\n'
        "])"
    ),
    new_markdown_cell(
        "**Conclusion.** Read the table: both regimes of the paper carry over to this "
        "transformer once the noise goes where each sublayer reads its input, and the bias "
        "question gets an answer an auditor can act on, a flag with a p-value and a share with "
        "an interval, from the audited model alone. What does not carry over as stated is the "
        "protocol itself: noise added to the residual stream (the literal \"after each layer\") "
        "reaches the unembedding through the skip connections, so its large-noise limit is the "
        "unembedding's geometry, not the model's bias. The correlations with margin and loss "
        "are weaker than a strong alignment, and the escapes' destinations are only mildly "
        "coherent here (toy models, 23 classes).\n\n"
        "**What to try next.**\n"
        "* Audit your own model: `apexlens.apex_bias(model, clean_prompts)` (32 or more "
        "prompts); a flagged token is an output bias to interpret, e.g. against its unigram "
        "frequency.\n"
        "* `apexlens.escape_noise(model, tokens, n_draws=64)` tightens each sample's interval; "
        "`est.to_frame()` lists the least regular samples first when sorted by `escape_noise`.\n"
        "* `backdoor-target5` hides its target among the legitimate answers: "
        '`apexlens.apex_bias(apexlens.load_model("backdoor-target5"), prompts)`.'
    ),
]


DISCOVERY = [
    new_markdown_cell(
        "# Discovering the induction circuit, and auditing the fast attributions\n\n"
        "**Question.** The shipped `induction-2l` model continues repeated token blocks: on "
        "*A B C ... A B* it predicts *C*. Which **edges** of its computational graph carry "
        "that behaviour, and can the fast gradient attributions (EAP, EAP-IG) be trusted to "
        "find them? The corrupted prompts replace the first copy of the block, so the "
        "previous-token information an induction head's keys need is gone while its query "
        "is unchanged.\n\n"
        "Plan: (1) score every edge exactly -- the true change of the logit difference when that "
        "single edge is ablated -- and with the gradient approximations EAP and EAP-IG; (2) "
        "audit the approximations against the exact scores; (3) compare their MIB faithfulness "
        "curves; (4) prune greedily, exactly, to a small circuit, and ask what the ablation "
        "choice hides. Everything runs offline on the shipped model."
    ),
    new_code_cell(
        SETUP + "import plotly.io as pio\n"
        "import apexlens\n"
        "from apexlens.ui import plotting_discovery as pdisc\n\n"
        'pio.renderers.default = "plotly_mimetype+notebook"\n'
        'model = apexlens.load_model("induction-2l")\n'
        'batch = apexlens.get_task("induction").batch(32, seed=0)\n'
        "exp = apexlens.Experiment(model, batch.clean_tokens, batch.corrupted_tokens,\n"
        "                          metric=batch.logit_diff())\n"
        'scores = {m: exp.attribute_edges(method=m) for m in ("exact", "eap", "eap-ig")}\n'
        'print(len(scores["exact"]), "edges")\n'
        'scores["exact"].summary(8)'
    ),
    new_markdown_cell(
        "## 1. Auditing EAP and EAP-IG against the exact effects\n\n"
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
        "**What it means.** Both approximations put the strongest edges near the top, but "
        "they rank the rest unlike the exact effects (the Spearman correlations above), and "
        "the table lists the large true effects they miss.\n\n"
        "## 2. Faithfulness the MIB way\n\n"
        "Keep the top 0.1% ... 100% of edges by |score| and evaluate each circuit exactly: "
        "`f = (m(circuit) - m(empty)) / (m(full) - m(empty))`. CPR is the area under `f` "
        "(higher is better), CMD the area under `|1 - f|` (lower is better)."
    ),
    new_code_cell(
        "curves = {m: exp.faithfulness(s) for m, s in scores.items()}\n"
        "pdisc.faithfulness_curve(curves)"
    ),
    new_markdown_cell(
        "## 3. Greedy exact pruning (ACDC semantics)\n\n"
        "From the logits backwards, try removing each edge (least important first); keep the "
        "removal when the logit difference moves by less than the threshold (2% of the "
        "clean-corrupted gap). Every step is an exact circuit evaluation under resample "
        "ablation: a removed edge carries its corrupted-run value."
    ),
    new_code_cell(
        "gap = float(exp.clean_values.mean() - exp.corrupted_values.mean())\n"
        'found = exp.discover(threshold=0.02 * gap, order=scores["exact"])\n'
        "print(found)\n"
        "groups = {}\n"
        "for s, r in sorted(found.edges):\n"
        '    into = "logits" if r == "logits" else f"layer-{r.split(\'.\')[0]} {r.split(\'.\')[-1]}"\n'
        "    groups.setdefault(into, []).append(f\"{s} -> {r}\")\n"
        "for into, kept in groups.items():\n"
        '    print(f"into {into}: {\', \'.join(kept)}")\n'
        'pdisc.circuit_graph(found, scores["exact"])'
    ),
    new_markdown_cell(
        "**Reading it.** The printed groups are the circuit: the embeddings feed the values of "
        "the layer-0 heads kept, whose outputs feed the layer-1 heads' **keys** (the "
        "previous-token information); the embeddings feed the layer-1 heads' values, and their "
        "outputs reach the logits. The textbook picture has one previous-token head and "
        "`embed -> 1.y.q` edges; the discovered circuit differs, and both differences are "
        "about what resample ablation can see:\n\n"
        "* **No query edges.** The corruption changes only the first copy of the block, so a "
        "layer-1 head's query (the current token, at the last position) is the same on clean "
        "and corrupted prompts: replacing it with its corrupted value changes nothing, and "
        "pruning removes it.\n"
        "* **Other layer-0 heads**, if the groups list any besides 0.1: their edges' exact "
        "effects (printed below) are small next to 0.1's; pruning keeps an edge whose "
        "removal moves the metric by more than the threshold in the circuit at hand, so "
        "small effects can survive.\n\n"
        "So the ablation is part of the hypothesis. Evaluate the same edges under mean "
        "ablation (every other edge at its average over the prompts), and the hand-written "
        "circuit with its query edges for comparison:"
    ),
    new_code_cell(
        'hand = [("embed", "0.1.v")] + [e for h in range(4) for e in [\n'
        '    ("0.1", f"1.{h}.k"), ("embed", f"1.{h}.q"), ("embed", f"1.{h}.v"), (f"1.{h}", "logits")]]\n'
        'for name, edges in (("discovered", found.edges), ("hand-written", hand)):\n'
        '    for ablation in ("resample", "mean"):\n'
        "        r = exp.evaluate_circuit(edges, ablation=ablation)\n"
        '        print(f"{name:12s} ({len(edges)} edges), {ablation:8s} ablation: recovery {r.recovery:.2f}")\n'
        'print("query edges kept by discovery:", sum(r.endswith(".q") for _, r in found.edges))\n'
        'for s, r in sorted(found.edges):\n'
        '    if s.startswith("0.") and s != "0.1":\n'
        '        print(f"{s} -> {r}: exact effect {scores[\'exact\'].score(s, r):+.3f} '
        '(0.1 -> {r}: {scores[\'exact\'].score(\'0.1\', r):+.3f})")'
    ),
    new_markdown_cell(
        "**What it means.** Under resample ablation both circuits recover the behaviour; "
        "under mean ablation only the one that keeps the queries does. Discovery answers the "
        "question its ablation asks: *what carries the difference between these clean and "
        "corrupted prompts?* For *what computes the behaviour at all*, prune under mean "
        "ablation (`exp.discover(..., ablation=\"mean\")`), or choose corruptions that "
        "change the query too.\n\n"
        "**What to try next.**\n"
        "* `exp.discover(threshold=0.02 * gap, order=scores[\"exact\"], ablation=\"mean\")` and "
        "compare the circuits.\n"
        "* `found.circuit.save(\"induction.json\")`, later `apexlens.Circuit.load(...)`: keep "
        "the circuit with the notebook's results.\n"
        "* `apexlens discover induction-2l --method eap-ig --out out/` writes the same "
        "analysis as CSV, JSON and an HTML report."
    ),
]

FEATURES = [
    new_markdown_cell(
        "# Feature visualization you can check: is this neuron's picture real?\n\n"
        "**Question.** Gradient ascent on the input (*feature visualization*, FV) tells us which "
        "input excites a neuron most. *Gradient Slingshots* (Bareeva et al., NeurIPS 2025) "
        "showed a model can be fine-tuned so that FV converges to a planted input while the "
        "model behaves as before. Can we tell an honest visualization from a planted one?\n\n"
        "**Setting.** `modadd-2l` computes `(a + b) mod 23` from prompts `BOS a b =`. "
        "`modadd-2l-slingshot` is a copy fine-tuned so that FV of neuron `m1.n34` lands on the "
        "planted input `= 11 = 11`; its accuracy and the neuron's natural activations are "
        "unchanged. Both ship with apexlens; everything runs offline."
    ),
    new_code_cell(
        SETUP + "import plotly.io as pio\n"
        "import torch\n"
        "import apexlens\n"
        "from apexlens.ui.plotting_fv import fv_check_figure, fv_trajectory\n\n"
        'pio.renderers.default = "plotly_mimetype+notebook"\n'
        'task = apexlens.get_task("modadd")\n'
        "natural = torch.unique(task.batch(512, seed=0).clean_tokens, dim=0)  # natural prompts\n"
        'honest = apexlens.load_model("modadd-2l")\n'
        'planted = apexlens.load_model("modadd-2l-slingshot")\n'
        'info = apexlens.model_info("modadd-2l-slingshot")\n'
        'print("accuracy before / after the manipulation:", info["behaviour"]["base_accuracy"], '
        'info["behaviour"]["accuracy"])\n'
        'print("neuron natural activations, correlation before/after:", '
        'info["manipulation_measured"]["natural_correlation"])'
    ),
    new_markdown_cell(
        "The manipulation is invisible to behavioural tests: same accuracy, the neuron's "
        "natural activations correlate almost perfectly with the original ones.\n\n"
        "## 1. Visualize the neuron in both models\n\n"
        "`visualize` optimises a soft input (a distribution over tokens per position, "
        "annealed towards one token each), then swaps single tokens while that raises the "
        "activation. Every activation it reports is that of a real token sequence."
    ),
    new_code_cell(
        'for name, model in (("modadd-2l", honest), ("modadd-2l-slingshot", planted)):\n'
        '    fv = apexlens.visualize(model, "m1.n34", n_pos=4, seed=0)\n'
        '    top = float(apexlens.top_examples(model, "m1.n34", natural).distribution.max())\n'
        '    same = int((fv.tokens == fv.best_tokens).all(-1).sum())\n'
        '    print(f"{name:20s} FV {\' \'.join(task.token_labels(fv.best_tokens)):12s} '
        'activation {fv.best_activation:.2f} = {fv.best_activation / top:.1f}x the natural '
        'maximum; {same} of {len(fv.tokens)} restarts end on it")\n'
        "fv_trajectory(fv, natural_max=top)"
    ),
    new_markdown_cell(
        "**What the figure shows.** Each line is one restart of the optimiser on the "
        "manipulated model: the activation of its current token sequence per step. They shoot "
        "far past the natural maximum (dashed) and end on the planted `= 11 = 11` (the "
        "printed ratio and count of restarts). On the honest model the same neuron's FV is an ordinary-looking input a "
        "little above the natural maximum. An auditor seeing only the manipulated FV would "
        "conclude the neuron detects `= 11 = 11`, which never occurs in the task.\n\n"
        "## 2. The check: is the FV processed like natural inputs -- more unusually than its peers'?\n\n"
        "`fv_check` measures how unlike the neuron's natural top examples the FV is, four ways: "
        "its activation above the natural maximum; how far above what the optimiser's own "
        "swap phase reaches when it starts from natural inputs; through which upstream "
        "components it gets its activation (attribution shares, gradient x activation per "
        "embedding, head and MLP); and how the residual stream it is read from looks. An "
        "optimised input is *always* somewhat unnatural, so none of these is judged against "
        "a fixed threshold: the same four numbers are computed for 31 *peer* neurons of the "
        "same layer, visualized the same way (in one batch), and the FV is flagged when it is "
        "more unusual than all but 5% of them (`alpha`)."
    ),
    new_code_cell(
        'check = apexlens.fv_check(planted, "m1.n34", natural, n_pos=4, seed=0)\n'
        "print(check.verdict)\n"
        "shares = check.attribution_frame()  # signed share of the activation per component\n"
        'for who in ("natural", "fv"):\n'
        "    top = shares.reindex(shares[who].abs().sort_values(ascending=False).index).head(3)\n"
        '    print(f"{who:8s} largest shares:", ", ".join(f"{c} {v:+.2f}" for c, v in zip(top.component, top[who])))\n'
        "fv_check_figure(check, task.token_labels)"
    ),
    new_markdown_cell(
        "**Reading it.** Top right: the natural top examples get their activation mostly from "
        "MLP 0 (blue); the planted input gets it from the token embedding and head 0.1, "
        "with the position embedding and MLP 0 pushing *against* it (red). Bottom: each "
        "measure of the checked neuron (red diamond) among its 31 peers (grey). It is the most "
        "extreme of all 32 on activation and on representation, so its p-value is 1/32, the "
        "smallest 31 peers allow: flagged at alpha = 0.05.\n\n"
        "## 3. No false alarm: the same neuron untouched, and other neurons"
    ),
    new_code_cell(
        "rows = [apexlens.fv_check(honest, \"m1.n34\", natural, n_pos=4).to_frame().assign(model=\"modadd-2l\")]\n"
        "for n in (43, 143, 7):  # the peers are cached: each costs one visualization\n"
        "    rows.append(apexlens.fv_check(planted, f\"m1.n{n}\", natural, n_pos=4)\n"
        "                .to_frame().assign(model=\"modadd-2l-slingshot\"))\n"
        "import pandas as pd\n"
        "pd.concat(rows)[[\"model\", \"feature\", \"ratio\", \"p_activation\", \"p_mechanism\", "
        "\"p_representation\", \"p_value\", \"flagged\"]]"
    ),
    new_markdown_cell(
        "**What it means.** The p-value is a rank among peers, so if the checked neuron is not "
        "manipulated (exchangeable with its peers) it is flagged at most 5% of the time, on "
        "any model: no threshold was tuned on these toy models. That guarantee is also the "
        "limit of the check. `python benchmarks/bench_fv_check.py` audits whole layers of "
        "Gradient-Slingshots fine-tunes built for the purpose (other tasks and architectures, "
        "planted ratios 1.3-3x, natural-looking and arbitrary planted inputs): planted FVs at "
        "about 3x are caught, but many at 1.4-2x are not. Honest FVs of these models reach "
        "1-3x the natural maximum themselves and are often processed unlike natural inputs "
        "(as Geirhos et al. 2024 found for image models), and a planted input that is a valid "
        "task prompt is processed like one. The README lists the measured rates.\n\n"
        "**What to try next.** Run the check on neurons of your own model with natural text "
        "from your task (`apexlens visualize MODEL m5.n123 --task ... --out DIR` writes the "
        "same report); use `top_examples` to read what the neuron does on real data; when "
        "the check flags a neuron, path-patch its natural top examples to see which circuit "
        "it really belongs to."
    ),
]


def main() -> None:
    for name, cells in (
        ("01_ioi_path_patching.ipynb", PATHS),
        ("02_apex_backdoor.ipynb", APEX),
        ("03_discovery.ipynb", DISCOVERY),
        ("04_feature_visualization.ipynb", FEATURES),
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
