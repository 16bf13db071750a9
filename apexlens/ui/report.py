"""One self-contained HTML report: figures and tables, plotly.js inlined once.

Every section may carry a caption (what the figure shows and how to read its sign), and
every table is followed by the definitions of its columns: those in :data:`COLUMNS`, the
columns apexlens itself reports, and any passed as ``definitions=``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

COLUMNS: dict[str, str] = {
    # path patching (PathPatchResult.to_frame)
    "sender": "the node whose output is patched: 'L.H' is head H of layer L, 'mL' MLP L, "
    "'embed' the embeddings",
    "layer": "the sender's layer",
    "head": "the sender's head index within its layer",
    "value": "the metric (e.g. logit difference answer - wrong) with this sender's path "
    "patched from the corrupted run, averaged over the prompts",
    "normalized": "(value - clean) / (clean - corrupted): 0 = patching this path changes "
    "nothing; -1 = it removes the whole clean-corrupted difference (the path carries the "
    "behaviour); positive = the path works against the behaviour",
    "sem": "standard error of the mean of value over the prompts",
    "ci_low": "lower end of the 95% percentile-bootstrap interval of value's mean",
    "ci_high": "upper end of the 95% percentile-bootstrap interval of value's mean",
    "normalized_low": "lower end of the 95% percentile-bootstrap interval of normalized (the "
    "ratio computed in every bootstrap sample of the prompts)",
    "normalized_high": "upper end of the 95% percentile-bootstrap interval of normalized",
    # circuits (CircuitResult.to_frame)
    "n_edges": "number of edges kept in the circuit hypothesis; every other edge is ablated",
    "metric": "mean metric on the clean prompts with only the circuit's edges kept",
    "metric_low": "lower end of the 95% percentile-bootstrap interval of metric",
    "metric_high": "upper end of the 95% percentile-bootstrap interval of metric",
    "recovery_low": "lower end of the 95% percentile-bootstrap interval of recovery (the "
    "ratio computed in every bootstrap sample of the prompts)",
    "recovery_high": "upper end of the 95% percentile-bootstrap interval of recovery",
    "proportion_explained_low": "lower end of the 95% percentile-bootstrap interval of "
    "proportion_explained",
    "proportion_explained_high": "upper end of the 95% percentile-bootstrap interval of "
    "proportion_explained",
    "clean": "mean metric on the clean prompts, nothing ablated",
    "ablated": "mean metric with every edge ablated (resample ablation: the corrupted run; "
    "mean ablation: every edge at its mean; zero ablation: every edge zero)",
    "recovery": "(metric - ablated) / (clean - ablated): 1 = the circuit alone restores the "
    "whole clean behaviour, 0 = nothing; above 1 = more than clean",
    "proportion_explained": "1 - aue / ate (Goldowsky-Dill et al. 2023): the share of the "
    "output change that the circuit accounts for; 1 = outputs as clean, 0 = no better than "
    "ablating everything (it can go below 0)",
    "aue": "mean KL divergence (nats) from the clean output distribution to the output "
    "distribution under the circuit hypothesis, averaged over prompts (clean -> hypothesis)",
    "ate": "mean KL divergence (nats) from the clean output distribution to the fully "
    "ablated one, averaged over prompts (clean -> fully ablated)",
    # discovery (EdgeScores.to_frame, FaithfulnessResult.to_frame, DiscoveryResult.summary)
    "receiver": "the input the edge ends in: 'L.H.q' / '.k' / '.v' a head's query, key or "
    "value input, 'mL' MLP L's input, 'logits' the unembedding",
    "score": "the edge's score: for method exact, the change of the mean metric when that "
    "edge alone is ablated; for eap / eap-ig a gradient estimate of it",
    "abs_score": "|score|, what edges are ranked by",
    "rank": "1 = the largest |score|",
    "fraction": "share of all edges kept in the circuit (the top edges by |score|)",
    "faithfulness": "(m(circuit) - m(empty)) / (m(full) - m(empty)): 1 = the circuit "
    "reproduces the full model's metric, 0 = no better than ablating every edge",
    "of": "number of edges in the graph pruning started from",
    "threshold": "an edge is removed when removing it moves the mean metric by less than this",
    # APEX (ApexResult.to_frame, apexlens.compare)
    "model": "which model the row belongs to",
    "sigma": "noise level: the standard deviation of the Gaussian noise added at the sites "
    "(with relative noise: in units of the clean activation's RMS)",
    "entropy": "entropy (nats) of the histogram of predicted tokens over all draws and "
    "prompts at this sigma: low = predictions concentrate on few tokens",
    "effective_n": "exp(entropy): the effective number of distinct predicted tokens",
    "top1_share": "share of all noisy predictions that are the dominant token",
    "dominant_token": "the most often predicted token id at this sigma (ties: lowest id)",
    "dominant_label": "the dominant token's label",
    "flip_rate": "share of noisy predictions that differ from the prompt's own clean "
    "(noise-free) prediction",
    "kl": "KL(P_sigma || P_clean) in nats: how far the mean noisy next-token distribution "
    "has moved from the mean clean one",
    "escaped": "share of prompts whose clean prediction has lost its majority at this sigma "
    "(at most half of the draws still predict it)",
    "nonfinite": "share of noisy forward passes whose logits overflowed to NaN/inf at this "
    "sigma; they predict nothing and are left out of every other column",
    "degenerate": "share of noisy forward passes that are numerical artefacts (NaN/inf logits, "
    "an overflowed norm, constant or tied logits); left out of every other column",
    "top1_share_se": "Monte-Carlo standard error of top1_share (prompts as independent units)",
    "top1_share_heldout": "top1_share of a token chosen on half of the draws and measured on "
    "the other half (both ways, averaged): free of the upward bias of picking the largest",
    "flip_rate_se": "Monte-Carlo standard error of flip_rate (prompts as independent units)",
    "escaped_se": "standard error of escaped over the prompts",
    # APEX bias decision (ApexBias.to_frame)
    "token": "the token whose gain under noise is most significant at this sigma",
    "label": "the token's label",
    "share": "that token's share of the noisy predictions",
    "share_se": "standard error of share (prompts as independent units)",
    "clean_share": "that token's share of the clean (noise-free) predictions",
    "gain": "share - clean_share: how much of all predictions the token gains under noise",
    "gain_se": "standard error of gain (prompts as independent units)",
    "z": "(gain - delta) / gain_se: the one-sided test statistic against 'gain <= delta'",
    "p_value": "APEX bias: one-sided normal p-value of z, Bonferroni-corrected for the sigmas "
    "and the vocabulary searched; fv_check: the rank of the Cauchy-combined measures among the "
    "peers' (false-alarm rate <= alpha when the feature is exchangeable with its peers)",
    "used": "whether this sigma entered the test (dropped: too many degenerate passes)",
    "ablation": "how an edge outside the hypothesis is ablated: 'resample' (the corrupted "
    "run's value: recovery is the share of the clean-corrupted difference the circuit "
    "carries), 'mean' (its mean over reference prompts: against an average input) or 'zero' "
    "(off-distribution); the same edges can recover very different shares under each",
    # feature visualization (apexlens.fv_check)
    "fv_activation": "the feature on the visualization's best discrete input",
    "natural_max": "the largest activation over every natural input and position",
    "ratio": "fv_activation / natural_max",
    "percentile": "share of natural activations below the visualization's (%)",
    "token_similarity": "bag-of-token cosine, visualization vs the natural top contexts",
    "start_activation": "the best activation the visualization's swap phase reaches when it "
    "starts from the natural top contexts",
    "start_ratio": "fv_activation / start_activation",
    "representation_similarity": "cosine of the residual stream the feature reads, "
    "visualization vs the mean of the natural top examples",
    "representation_floor": "the lowest such cosine of a natural top example vs the others",
    "mechanism_similarity": "cosine of the upstream attribution profiles, visualization vs the "
    "natural top mean",
    "mechanism_floor": "the lowest such cosine of a natural top example vs the others",
    "activation": "(fv_activation - natural max) / (natural max - natural median)",
    "natural_start": "(fv_activation - start_activation) / (natural max - natural median)",
    "mechanism": "log of the Mahalanobis distance of the visualization's attribution shares "
    "from the natural top examples', over the median leave-one-out distance among them",
    "representation": "the same for the unit residual stream the feature reads",
    "p_activation": "rank p-value of the activation measure among the peer features",
    "p_natural_start": "rank p-value of the natural-start measure among the peer features",
    "p_mechanism": "rank p-value of the mechanism measure among the peer features",
    "p_representation": "rank p-value of the representation measure among the peer features",
    "alpha": "the false-alarm rate the check flags at",
    "n_peers": "peer features of the same kind and layer, visualized the same way",
    "flagged": "p_value <= alpha",
    "reason": "why it is flagged",
    "fv": "signed share of the visualization's attribution",
    "natural": "signed share of the natural top examples' attribution (mean)",
}
"""Definitions of the table columns apexlens reports (printed under every table)."""


def _table(frame: pd.DataFrame, definitions: Mapping[str, str]) -> str:
    """A table in a box that scrolls sideways when it is wider than the page (columns are
    never cut), then the definitions of its columns."""
    table = frame.to_html(index=False, float_format=lambda x: f"{x:.4g}")
    # long column names may break after an underscore: "proportion_explained_high"
    table = re.sub(r"<th>(.*?)</th>", lambda m: f"<th>{m.group(1).replace('_', '_<wbr>')}</th>",
                   table)
    out = ["<div class='table'>", table, "</div>"]
    defined = [c for c in frame.columns if str(c) in definitions]
    if defined:
        out.append("<dl class='columns'>")
        for c in defined:
            out.append(
                f"<dt><code>{html.escape(str(c))}</code></dt>"
                f"<dd>{html.escape(definitions[str(c)])}</dd>"
            )
        out.append("</dl>")
    return "\n".join(out)


def write_report(
    path: str | Path,
    sections: Sequence[tuple[str, Any] | tuple[str, Any, str]],
    *,
    title: str = "apexlens report",
    intro: str = "",
    definitions: Mapping[str, str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``sections`` to one HTML file that opens with no network (plotly.js is embedded
    with the first figure).

    Each section is ``(heading, figure | DataFrame | str)`` or ``(heading, item, caption)``;
    the caption is printed under the item. A table is followed by the definitions of those
    of its columns found in :data:`COLUMNS` or ``definitions`` (which take precedence); a
    table wider than the page scrolls sideways. ``provenance`` (versions, time, command and
    options; default: the versions and the time) is printed at the end.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    glossary = {**COLUMNS, **(definitions or {})}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    js_done = False
    for section in sections:
        heading, item = section[0], section[1]
        caption = section[2] if len(section) > 2 else ""  # type: ignore[misc]
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(item, go.Figure):
            parts.append(item.to_html(full_html=False, include_plotlyjs=not js_done))
            js_done = True
        elif isinstance(item, pd.DataFrame):
            parts.append(_table(item, glossary))
        else:
            parts.append(f"<pre>{html.escape(str(item))}</pre>")
        if caption:
            parts.append(f"<p class='caption'>{html.escape(caption)}</p>")
    parts.append(_footer(provenance))
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _footer(provenance: Mapping[str, Any] | None) -> str:
    from apexlens.results import provenance as versions

    items = dict(provenance) if provenance is not None else versions()
    rows = "".join(
        f"<dt>{html.escape(str(k))}</dt><dd><code>{html.escape(_plain(v))}</code></dd>"
        for k, v in items.items()
    )
    return f"<footer><h2>Provenance</h2><dl class='columns'>{rows}</dl></footer>"


def _plain(v: Any) -> str:
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
    "p{max-width:1000px}"
    "div.table{overflow-x:auto;max-width:100%;margin:0.5em 0;padding-bottom:4px;"
    "scrollbar-color:#999 #eee}"
    "div.table::-webkit-scrollbar{height:10px}div.table::-webkit-scrollbar-track{background:#eee}"
    "div.table::-webkit-scrollbar-thumb{background:#999;border-radius:5px}"
    "table{border-collapse:collapse;font-size:0.9em}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}"
    "th{white-space:normal;vertical-align:bottom;min-width:4em}"
    "h2{margin-top:2em}p.caption{color:#333;max-width:900px}"
    "dl.columns{font-size:0.85em;color:#444;display:grid;grid-template-columns:max-content 1fr;"
    "gap:2px 12px;max-width:1000px}dl.columns dd{margin:0;overflow-wrap:anywhere}"
    "footer{margin-top:3em;color:#555}"
)
"""The report's CSS: text in readable widths; tables and figures use the window's width up
to 1400 px, and a wider table scrolls sideways in its box (with a visible scrollbar) rather
than being cut."""
