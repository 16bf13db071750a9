"""One self-contained HTML report: figures and tables, plotly.js inlined once.

Every section may carry a caption (what the figure shows and how to read its sign), and
every table is followed by the definitions of its columns: those in :data:`COLUMNS`, the
columns apexlens itself reports, and any passed as ``definitions=``.
"""

from __future__ import annotations

import html
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
    # circuits (CircuitResult.to_frame)
    "n_edges": "number of edges kept in the circuit hypothesis; every other edge is ablated",
    "metric": "mean metric on the clean prompts with only the circuit's edges kept",
    "clean": "mean metric on the clean prompts, nothing ablated",
    "ablated": "mean metric with every edge ablated (resample ablation: the corrupted run)",
    "recovery": "(metric - ablated) / (clean - ablated): 1 = the circuit alone restores the "
    "whole clean behaviour, 0 = nothing; above 1 = more than clean",
    "proportion_explained": "1 - aue / ate (Goldowsky-Dill et al. 2023): the share of the "
    "output change that the circuit accounts for; 1 = outputs as clean, 0 = no better than "
    "ablating everything (it can go below 0)",
    "aue": "mean KL divergence (nats) from the clean output distribution to the output "
    "distribution under the circuit hypothesis, averaged over prompts (clean -> hypothesis)",
    "ate": "mean KL divergence (nats) from the clean output distribution to the fully "
    "ablated one, averaged over prompts (clean -> fully ablated)",
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
    "p_value": "one-sided normal p-value of z, Bonferroni-corrected for the sigmas and the "
    "vocabulary searched",
    "used": "whether this sigma entered the test (dropped: too many degenerate passes)",
    "ablation": "how an edge outside the hypothesis is ablated: 'resample' (the corrupted "
    "run's value), 'mean' (its mean over reference prompts) or 'zero'",
    # feature visualization (apexlens.fv_check)
    "fv_activation": "the feature on the visualization's best discrete input",
    "natural_max": "the largest activation over every natural input and position",
    "ratio": "fv_activation / natural_max",
    "percentile": "share of natural activations below the visualization's (%)",
    "token_similarity": "bag-of-token cosine, visualization vs the natural top contexts",
    "representation_similarity": "cosine of the residual stream the feature reads, "
    "visualization vs the mean of the natural top examples",
    "representation_floor": "the lowest such cosine of a natural top example vs the others",
    "mechanism_similarity": "cosine of the upstream attribution profiles, visualization vs the "
    "natural top mean",
    "mechanism_floor": "the lowest such cosine of a natural top example vs the others",
    "flagged": "ratio >= 2 and (mechanism or representation) similarity below the natural floor "
    "by more than 0.05",
    "reason": "why it is flagged",
    "fv": "signed share of the visualization's attribution",
    "natural": "signed share of the natural top examples' attribution (mean)",
}
"""Definitions of the table columns apexlens reports (printed under every table)."""


def _table(frame: pd.DataFrame, definitions: Mapping[str, str]) -> str:
    out = [frame.to_html(index=False, float_format=lambda x: f"{x:.4g}")]
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
) -> Path:
    """Write ``sections`` to one HTML file that opens with no network (plotly.js is embedded
    with the first figure).

    Each section is ``(heading, figure | DataFrame | str)`` or ``(heading, item, caption)``;
    the caption is printed under the item. A table is followed by the definitions of those
    of its columns found in :data:`COLUMNS` or ``definitions`` (which take precedence).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    glossary = {**COLUMNS, **(definitions or {})}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}h2{margin-top:2em}p.caption{color:#333;max-width:900px}"
        "dl.columns{font-size:0.85em;color:#444;display:grid;grid-template-columns:max-content 1fr;"
        "gap:2px 12px;max-width:1000px}dl.columns dd{margin:0}</style></head><body>",
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
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
