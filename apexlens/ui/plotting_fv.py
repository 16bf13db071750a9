"""Plotly figures for feature visualization (next to :mod:`apexlens.ui.plotting`).

* :func:`fv_trajectory` -- the activation of each restart's discrete input, step by step
* :func:`fv_check_figure` -- the manipulation check in three panels: the optimisation against
  the natural maximum, the natural distribution with the FV marked, and which upstream
  components the activation comes through (FV vs natural top examples)
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from apexlens.results import FeatureVisualization, FVCheck, TokenLabels, labels_of


def _trajectory_traces(fv: FeatureVisualization, fig: go.Figure, **where: Any) -> None:
    n = fv.trajectory.shape[1]
    steps = list(range(fv.trajectory.shape[0]))
    for i in reversed(range(n)):
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=fv.trajectory[:, i].tolist(),
                mode="lines",
                name="best restart" if i == 0 else f"restart {i}",
                line={
                    "color": "#d62728" if i == 0 else "rgba(100,100,100,0.35)",
                    "width": 2.5 if i == 0 else 1,
                },
                showlegend=i <= 1,
                legendgroup="best" if i == 0 else "other",
                hovertemplate="step %{x}<br>activation %{y:.3f}<extra></extra>",
            ),
            **where,
        )
    if fv.soft_steps and fv.trajectory.shape[0] > fv.soft_steps:
        fig.add_vline(x=fv.soft_steps - 0.5, line_dash="dot", line_color="grey", **where)


def fv_trajectory(
    fv: FeatureVisualization, *, natural_max: float | None = None, title: str | None = None
) -> go.Figure:
    """Activation of each restart's discrete input per step (soft-input steps, then the
    discrete swaps after the dotted line); the natural maximum dashed when given."""
    fig = go.Figure()
    _trajectory_traces(fv, fig)
    if natural_max is not None:
        fig.add_hline(
            y=natural_max,
            line_dash="dash",
            line_color="#1f77b4",
            annotation_text="natural max",
            annotation_position="bottom right",
        )
    fig.update_layout(
        title=title or f"feature visualization of {fv.feature.label}",
        xaxis_title="step (soft input, then discrete swaps)",
        yaxis_title="activation of the discrete input",
    )
    return fig


def fv_check_figure(check: FVCheck, token_labels: TokenLabels | None = None) -> go.Figure:
    """Three panels: the optimisation (natural max dashed), the natural activation
    distribution with the FV's activation marked, and the attribution share of each upstream
    component (FV vs the mean of the natural top examples). The title carries the verdict."""
    fig = make_subplots(
        rows=1,
        cols=3,
        column_widths=[0.3, 0.3, 0.4],
        subplot_titles=(
            "optimisation (discrete input per step)",
            "natural activations vs the FV",
            "where the activation comes from (share)",
        ),
        horizontal_spacing=0.08,
    )
    _trajectory_traces(check.fv, fig, row=1, col=1)
    fig.add_hline(y=check.natural_max, line_dash="dash", line_color="#1f77b4", row=1, col=1)
    fig.add_trace(
        go.Histogram(
            x=check.natural.distribution.tolist(),
            nbinsx=40,
            name="natural inputs (every position)",
            marker_color="#9ecae1",
            hovertemplate="activation %{x}<br>%{y} inputs<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.add_vline(x=check.fv_activation, line_color="#d62728", line_width=2.5, row=1, col=2)
    fig.add_annotation(
        x=check.fv_activation,
        y=1,
        yref="y2 domain",
        text=f"FV {check.fv_activation:.2f}",
        showarrow=False,
        xanchor="right",
        font={"color": "#d62728"},
        row=1,
        col=2,
    )
    frame = check.attribution_frame()
    for column, name, color in (
        ("natural", "natural top examples (mean)", "#1f77b4"),
        ("fv", "feature visualization", "#d62728"),
    ):
        fig.add_trace(
            go.Bar(x=frame["component"], y=frame[column], name=name, marker_color=color),
            row=1,
            col=3,
        )
    text = " ".join(labels_of(check.fv.best_tokens, token_labels))
    verdict = "SUSPICIOUS" if check.flagged else "consistent"
    fig.update_layout(
        title={
            "text": f"{check.feature.label}: {verdict} -- FV '{text}' at {check.fv_activation:.2f} "
            f"= {check.fv_activation / check.natural_max:.2f}x the natural max; mechanism cosine "
            f"{check.mechanism_similarity:.2f} (natural >= {check.mechanism_floor:.2f})",
            "font": {"size": 14},
        },
        barmode="group",
        legend={"orientation": "h", "y": -0.25},
        height=460,
        margin={"t": 90},
    )
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_yaxes(title_text="activation", row=1, col=1)
    fig.update_xaxes(title_text="activation", row=1, col=2)
    # a label at every power of ten only (plotly also labels 2 and 5 in between: unreadable)
    fig.update_yaxes(title_text="inputs (log)", type="log", dtick=1, row=1, col=2)
    fig.update_yaxes(title_text="signed share of |attribution|", row=1, col=3)
    return fig
