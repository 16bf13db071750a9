"""Plotly figures for feature visualization (next to :mod:`apexlens.ui.plotting`).

* :func:`fv_trajectory` -- the activation of each restart's discrete input, step by step
* :func:`fv_check_figure` -- the manipulation check: the optimisation against the natural
  maximum, the natural distribution with the FV marked, which upstream components the
  activation comes through (FV vs natural top examples), and the calibrated test (each
  measure of the checked feature among its peers')
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import torch
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


MEASURE_AXIS = {
    "activation": "(FV - natural max) / natural spread",
    "natural_start": "(FV - natural-start climb) / spread",
    "mechanism": "log attribution distance / natural",
    "representation": "log residual distance / natural",
}


def fv_check_figure(check: FVCheck, token_labels: TokenLabels | None = None) -> go.Figure:
    """The check in two rows. Top: the optimisation (natural max dashed), the natural
    activation distribution with the FV's activation marked, and the attribution share of each
    upstream component (FV vs the mean of the natural top examples). Bottom, the calibrated
    test: per measure, the checked feature (red) among its peers (grey), with its rank
    p-value. The title carries the verdict and the combined p-value."""
    names = list(check.measures)
    fig = make_subplots(
        rows=2,
        cols=4,
        specs=[[{}, {}, {"colspan": 2}, None], [{}, {}, {}, {}]],
        subplot_titles=(
            "optimisation (discrete input per step)",
            "natural activations vs the FV",
            "where the activation comes from (share)",
            *(f"{m}: p = {float(check.p_values[j]):.3g}" for j, m in enumerate(names)),
        ),
        horizontal_spacing=0.07,
        vertical_spacing=0.2,
    )
    _trajectory_traces(check.fv, fig, row=1, col=1)
    fig.add_hline(y=check.natural_max, line_dash="dash", line_color="#1f77b4", row=1, col=1)
    _natural_panel(check, fig)
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
    _peer_panels(check, fig)
    text = " ".join(labels_of(check.fv.best_tokens, token_labels))
    verdict = "SUSPICIOUS" if check.flagged else "consistent"
    fig.update_layout(
        title={
            "text": f"{check.feature.label}: {verdict} (p = {check.p_value:.3g}, alpha = "
            f"{check.alpha:g}, {len(check.peers)} peers) -- FV '{text}' at "
            f"{check.fv_activation:.2f} = {check.ratio:.2f}x the natural max",
            "font": {"size": 14},
        },
        barmode="group",
        legend={"orientation": "h", "y": -0.12},
        height=760,
        margin={"t": 90},
    )
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_yaxes(title_text="activation", row=1, col=1)
    fig.update_xaxes(title_text="activation", row=1, col=2)
    # a label at every power of ten only (plotly also labels 2 and 5 in between: unreadable)
    fig.update_yaxes(title_text="inputs (log)", type="log", dtick=1, row=1, col=2)
    fig.update_yaxes(title_text="signed share of |attribution|", row=1, col=3)
    return fig


def _natural_panel(check: FVCheck, fig: go.Figure) -> None:
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


def _peer_panels(check: FVCheck, fig: go.Figure) -> None:
    """One strip per measure: the peers' statistics (grey) and the checked feature's (red)."""
    labels = [check.feature.label, *check.peers]
    g = torch.Generator().manual_seed(0)
    jitter = (torch.rand(len(labels) - 1, generator=g) - 0.5) * 0.5
    for j, m in enumerate(check.measures):
        col = check.statistics[:, j].tolist()
        fig.add_trace(
            go.Scatter(
                x=jitter.tolist(), y=col[1:], mode="markers", text=labels[1:],
                marker={"color": "rgba(100,100,100,0.55)", "size": 7},
                name="peer features", legendgroup="peers", showlegend=j == 0,
                hovertemplate="%{text}<br>%{y:.3f}<extra></extra>",
            ),
            row=2, col=j + 1,
        )
        fig.add_trace(
            go.Scatter(
                x=[0.0], y=col[:1], mode="markers", text=labels[:1],
                marker={"color": "#d62728", "size": 13, "symbol": "diamond"},
                name="the checked feature", legendgroup="checked", showlegend=j == 0,
                hovertemplate="%{text}<br>%{y:.3f}<extra></extra>",
            ),
            row=2, col=j + 1,
        )
        fig.update_xaxes(showticklabels=False, range=[-0.6, 0.6], row=2, col=j + 1)
        fig.update_yaxes(title_text=MEASURE_AXIS.get(m, m), row=2, col=j + 1)
