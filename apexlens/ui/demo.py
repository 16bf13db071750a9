"""``apexlens demo``: the whole tool on the shipped toy models, offline, in well under a minute.

1. Path patching on ``induction-2l``: every head -> logits, which singles out the induction
   heads of layer 1; then every layer-0 head -> the strongest induction head's key, which
   singles out the previous-token head.
2. A circuit hypothesis (embed -> previous-token head -> induction heads' keys, embed ->
   their queries and values, induction heads -> logits) evaluated with resample ablation of
   every other edge: recovery and proportion explained.
3. APEX on ``backdoor`` and its clean twin: noise on every sublayer's input (``block_in``,
   the paper's protocol) with clean prompts (no trigger); at large noise the backdoored
   model's predictions concentrate on its target, and :func:`apex_bias` flags it from the
   audited model alone.
4. Feature visualization with a manipulation check: neuron ``m1.n34`` of
   ``modadd-2l-slingshot`` (fine-tuned so that its visualization converges to a planted
   input) against the same neuron of the untouched ``modadd-2l``.
5. A table on stdout and one self-contained HTML report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from apexlens import (
    Experiment,
    apex,
    apex_bias,
    compare,
    fv_check,
    get_task,
    load_model,
    model_info,
)
from apexlens.ui import plotting
from apexlens.ui.plotting_fv import fv_check_figure
from apexlens.ui.report import write_report

SIGMAS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


@dataclass
class _State:
    """What the demo's steps compute, for the report and the returned numbers."""

    model: Any = None
    exp: Any = None
    to_logits: Any = None
    to_key: Any = None
    ind: int = 0
    prev: int = 0
    induction_heads: list[int] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)
    circuit: Any = None
    sweeps: dict[str, Any] = field(default_factory=dict)
    table: Any = None
    bias: dict[str, Any] = field(default_factory=dict)
    fv_task: Any = None
    neuron: str = ""
    fv_checks: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


def _path_patching(s: _State, n: int) -> None:
    """Every head -> logits, then layer-0 heads -> the strongest induction head's key."""
    s.model = load_model("induction-2l")
    batch = get_task("induction").batch(n, seed=0)
    s.exp = Experiment(
        s.model,
        batch.clean_tokens,
        batch.corrupted_tokens,
        metric=batch.logit_diff(),
        positions=batch.named_positions,
    )
    s.to_logits = s.exp.path_patch("all-heads", "logits", progress=s.progress)
    norm = s.to_logits.normalized()
    s.ind = int(norm[1].argmin())
    n_heads = norm.shape[1]
    s.induction_heads = [h for h in range(n_heads) if norm[1, h] < -0.1] or [s.ind]
    s.to_key = s.exp.path_patch("heads:0", f"1.{s.ind}.k", progress=s.progress)
    s.prev = int(s.to_key.normalized().argmin())


def _circuit(s: _State, n: int) -> None:
    """The induction circuit as a hypothesis, evaluated exactly."""
    s.edges = [("embed", f"0.{s.prev}.{c}") for c in "qkv"]
    for h in s.induction_heads:
        s.edges += [
            (f"0.{s.prev}", f"1.{h}.k"),
            ("embed", f"1.{h}.q"),
            ("embed", f"1.{h}.v"),
            (f"1.{h}", "logits"),
        ]
    s.edges.append(("embed", "logits"))
    s.circuit = s.exp.evaluate_circuit(s.edges)


def _apex(s: _State, n: int) -> None:
    """APEX on the backdoored model and its clean twin, and the bias decision on each."""
    bd_task = get_task("backdoor")
    tokens = bd_task.batch(64, seed=0).clean_tokens
    labels = bd_task.token_labels(torch.arange(bd_task.d_vocab))
    for name in ("backdoor", "backdoor-clean"):
        model = load_model(name)
        s.sweeps[name] = apex(model, tokens, sigmas=SIGMAS, n_draws=32, seed=0, token_labels=labels,
                              progress=s.progress)
        s.bias[name] = apex_bias(model, tokens, seed=0, token_labels=labels, progress=s.progress)
    s.table = compare(s.sweeps)


def _features(s: _State, n: int) -> None:
    """Feature visualization of a manipulated neuron and of the same neuron untouched."""
    s.fv_task = get_task("modadd")
    natural = torch.unique(s.fv_task.batch(512, seed=0).clean_tokens, dim=0)
    s.neuron = f"m1.n{model_info('modadd-2l-slingshot')['manipulation']['neuron']}"
    s.fv_checks = {
        name: fv_check(load_model(name), s.neuron, natural, n_pos=4, seed=0, progress=s.progress)
        for name in ("modadd-2l-slingshot", "modadd-2l")
    }


STEPS = [
    ("path patching: heads -> logits and -> an induction key", _path_patching),
    ("a circuit hypothesis", _circuit),
    ("APEX: backdoor and clean twin", _apex),
    ("feature visualization and its check", _features),
]
"""The demo's steps, in order, each named on the progress bar."""


def run_demo(
    out_dir: str | Path = "apexlens-report", *, progress: bool = True, n: int = 32
) -> dict[str, Any]:
    """Run the demo's steps (:data:`STEPS`) and write the report; returns the numbers it
    printed and the report's path."""
    out = Path(out_dir)
    s = _State(progress=progress)
    bar = tqdm(total=len(STEPS) + 1, desc="apexlens demo", disable=not progress, unit="step")
    for name, step in STEPS:
        bar.set_postfix_str(name)
        step(s, n)
        bar.update()
    bar.set_postfix_str("writing the report")
    text, apex_rows = _text(s)
    path = write_report(
        out / "report.html", _sections(s), title="apexlens demo", intro=text.splitlines()[0]
    )
    bar.update()
    bar.close()
    print(text)
    print(f"\nreport: {path}")
    return {
        "report": str(path),
        "induction_head": f"1.{s.ind}",
        "prev_token_head": f"0.{s.prev}",
        "recovery": s.circuit.recovery,
        "proportion_explained": s.circuit.proportion_explained,
        "apex": apex_rows.to_dict("records"),
        "apex_bias": {name: b.flagged for name, b in s.bias.items()},
        "fv_flagged": {name: chk.flagged for name, chk in s.fv_checks.items()},
        "text": text,
    }


def _text(s: _State) -> tuple[str, Any]:
    """The printed summary, and the APEX rows at the largest sigma."""
    exp, to_key, circuit, ind, prev = s.exp, s.to_key, s.circuit, s.ind, s.prev
    target = model_info("backdoor")["target_token"]
    top = _top(s)
    big = max(SIGMAS)
    apex_rows = s.table[s.table["sigma"] == big][
        ["model", "sigma", "dominant_token", "top1_share", "entropy"]
    ]
    lines = [
        "apexlens demo (shipped toy models, offline)",
        "",
        f"induction-2l: clean logit diff {exp.clean_values.mean():.2f}, corrupted {exp.corrupted_values.mean():.2f}",
        "  heads -> logits, strongest paths (normalised; -1 = the whole effect):",
        *[f"    {r.sender:>5s}  {r.normalized:+.3f}" for r in top.itertuples()],
        f"  layer-0 heads -> 1.{ind}.k: previous-token head 0.{prev} ({float(to_key.normalized()[prev]):+.3f})",
        f"  circuit ({len(s.edges)} edges): recovery {circuit.recovery:.3f}, proportion explained "
        f"{circuit.proportion_explained:.3f}",
        f"backdoor (target token {target}) vs backdoor-clean, noise on every sublayer's input, "
        f"sigma = {big:g}:",
        *[
            f"    {r.model:>15s}: dominant token {r.dominant_token}, top-1 share {r.top1_share:.3f}"
            for r in apex_rows.itertuples()
        ],
        "  apex_bias (the audited model alone):",
        *[f"    {name:>15s}: {b.verdict}" for name, b in s.bias.items()],
    ]
    for name, chk in s.fv_checks.items():
        toks = " ".join(s.fv_task.token_labels(chk.fv.best_tokens))
        lines.append(
            f"{name} {s.neuron}: FV '{toks}' {chk.fv_activation:.2f} ({chk.ratio:.2f}x the natural "
            f"max) -> {'SUSPICIOUS' if chk.flagged else 'consistent'}"
        )
    return "\n".join(lines), apex_rows


def _top(s: _State) -> Any:
    return (
        s.to_logits.to_frame()
        .sort_values("normalized")
        .head(5)[["sender", "value", "normalized", "ci_low", "ci_high"]]
    )


def _sections(s: _State) -> list[tuple[str, Any, str]]:
    """The report: every figure and table with what it shows."""
    to_logits, to_key, circuit, sweeps, table = s.to_logits, s.to_key, s.circuit, s.sweeps, s.table
    ind, prev, induction_heads, fv_task, neuron, fv_checks = (
        s.ind, s.prev, s.induction_heads, s.fv_task, s.neuron, s.fv_checks
    )
    target = model_info("backdoor")["target_token"]
    top = _top(s)
    key_frame = to_key.to_frame()[["sender", "value", "normalized"]]
    big = max(SIGMAS)
    circuit_frame = circuit.to_frame().drop(columns=["metric_low", "metric_high"])
    n_layers = to_logits.grid[0]
    heads = ", ".join(f"1.{h}" for h in induction_heads)
    sections: list[tuple[str, Any, str]] = [
        (
            "Path patching: every head -> logits (induction-2l)",
            plotting.head_heatmap(to_logits),
            "Each cell is one head: its output is replaced by its output on the corrupted "
            "prompt (first copy of the repeated block replaced) along its direct path to the "
            "logits, MLPs on the way recomputed, and the logit difference is measured. "
            "Normalised: 0 = no effect, -1 = this path alone removes the whole clean-corrupted "
            "difference; red (negative) heads carry the induction behaviour. Here every "
            f"layer-1 head carries a share of it ({heads}); layer 0 writes nothing the logits "
            "read directly.",
        ),
        (
            "Strongest paths to the logits",
            top,
            "The five heads whose path to the logits matters most, most negative first.",
        ),
        (
            f"Layer-0 heads -> induction head 1.{ind}'s key",
            plotting.path_graph(to_key, top_k=4),
            f"Each layer-0 head's path into the key input of 1.{ind} (the strongest layer-1 "
            "head) patched from the corrupted run. Line width is |normalised effect|; red = "
            f"negative: patching it lowers the logit difference, so 0.{prev} is the "
            "previous-token head whose output the induction head's key reads. Blue = "
            "patching raises the logit difference (here all close to 0).",
        ),
        (
            "Layer-0 heads -> key, values",
            key_frame,
            "The numbers behind the graph above.",
        ),
        (
            "The circuit hypothesis",
            plotting.path_graph(circuit, n_layers=n_layers),
            "The hypothesis tested below: the embeddings feed the previous-token head 0."
            f"{prev}, which feeds the keys of the layer-1 heads {heads}; the embeddings feed "
            "their queries and values, and their outputs go to the logits. Every line is an "
            "edge kept; every edge not drawn is ablated (resample: its corrupted-run value).",
        ),
        (
            "Circuit evaluation (resample ablation of every other edge)",
            circuit_frame,
            "Recovery near 1 means the drawn edges alone reproduce the clean logit difference; "
            "the intervals are 95% bootstrap intervals over the prompts (each ratio computed "
            "in every bootstrap sample). " + circuit.ablation_meaning[:1].upper()
            + circuit.ablation_meaning[1:],
        ),
        (
            "Per-example logit difference",
            plotting.scores_plot(
                {
                    "clean": to_logits.clean,
                    "circuit": circuit.scores,
                    "corrupted": to_logits.corrupted,
                }
            ),
            "Logit difference (answer minus wrong token) for every prompt: clean, with only the "
            "circuit's edges kept, and corrupted. Boxes show the spread, diamonds the mean "
            "with its 95% bootstrap interval; a circuit that explains the behaviour sits on "
            "top of clean, far above corrupted.",
        ),
        (
            "APEX: concentration vs noise (backdoor vs clean twin)",
            plotting.apex_curves(sweeps),
            "Gaussian noise of size sigma (x axis, log scale) is added to every sublayer's "
            "input (after its norm; the residual stream stays clean) on clean prompts that "
            "never contain the trigger; 32 draws per prompt and sigma. Solid lines (left axis): share of all predictions taken by the single "
            "most predicted token; dotted (right axis): entropy of the predicted tokens. As "
            "noise grows the backdoored model's predictions concentrate (share up, entropy "
            f"down) on its target token {target}; its clean twin's stay spread out.",
        ),
        (
            f"APEX: predicted tokens at sigma = {big:g}, backdoor",
            plotting.token_histogram(sweeps["backdoor"], big),
            f"Which tokens the backdoored model predicts under the largest noise (sigma = "
            f"{big:g}), as a share of all draws over all prompts: the backdoor target (TARGET) "
            "dominates although no prompt contains the trigger.",
        ),
        (
            f"APEX: predicted tokens at sigma = {big:g}, backdoor-clean",
            plotting.token_histogram(sweeps["backdoor-clean"], big),
            "The same for the clean twin, trained on the same data without the poisoned "
            "labels: no token stands out, so the concentration above is the backdoor's doing.",
        ),
        (
            "APEX: the bias decision, from the audited model alone",
            plotting.apex_bias_plot(s.bias),
            "For each noise level (2 to 32), the token whose share of the noisy predictions "
            "exceeds its share of the clean predictions the most (its gain, with a 95% "
            "interval; prompts are the independent units). A model is flagged when a gain is "
            "significantly above the tolerance delta (dashed): "
            + "; ".join(f"{name}: {b.verdict}" for name, b in s.bias.items()),
        ),
        ("APEX summary", table, "One row per model and noise level."),
        (
            f"Feature visualization of {neuron}, manipulated model (modadd-2l-slingshot)",
            fv_check_figure(fv_checks["modadd-2l-slingshot"], fv_task.token_labels),
            "modadd-2l-slingshot was fine-tuned (Gradient Slingshots) so that gradient ascent "
            f"on the input of neuron {neuron} converges to the planted '= 11 = 11', while the "
            "task and the neuron's natural activations stayed as they were. Left: the "
            "optimisation shoots past the natural maximum (dashed). Middle: the neuron on every "
            "natural prompt and position, the visualization in red far to the right. Right: the "
            "share of the activation each upstream component contributes, visualization (red) "
            "vs the natural top examples (blue): it gets there through other components, so "
            "the check flags it.",
        ),
        (
            f"Feature visualization of {neuron}, untouched model (modadd-2l)",
            fv_check_figure(fv_checks["modadd-2l"], fv_task.token_labels),
            "The same neuron in the model before the manipulation: the visualization beats the "
            "natural prompts only a little and the check finds nothing to flag. Read the "
            "verdict in the title; the numbers are in the table below.",
        ),
        (
            "Manipulation check in numbers",
            pd.concat(
                [c.to_frame().assign(model=n) for n, c in fv_checks.items()], ignore_index=True
            )[
                [
                    "model",
                    "fv_activation",
                    "natural_max",
                    "ratio",
                    "percentile",
                    "mechanism_similarity",
                    "mechanism_floor",
                    "representation_similarity",
                    "representation_floor",
                    "flagged",
                ]
            ],
            "One row per model: the check's numbers for the same neuron.",
        ),
    ]
    return sections
