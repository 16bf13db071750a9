"""Answers of feature visualization: the visualization, the natural top examples, and the
check of one against the other."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.results.io import Saveable
from apexlens.results.labels import TokenLabels, labels_of
from apexlens.vocab.features import Feature


@dataclass
class FeatureVisualization(Saveable):
    """What :func:`apexlens.api.features` found, one row per restart, best first.

    ``tokens`` ``[restarts, n_pos]`` are the final discrete inputs and ``activation`` their
    feature values (measured by a plain forward pass). ``trajectory`` ``[steps, restarts]``
    holds the activation of each step's discrete input (the soft input projected to its most
    likely tokens; after ``soft_steps`` steps, the rounds of discrete swaps);
    ``soft_trajectory`` ``[soft_steps, restarts]`` the soft input's own activation.

    ``to_frame()`` columns: ``restart`` (rank, 0 = best), ``activation``, ``tokens`` (ids),
    ``text`` (labels when a task's ``token_labels`` is given).
    """

    feature: Feature
    tokens: Int[Tensor, "restarts pos"]
    activation: Float[Tensor, " restarts"]
    trajectory: Float[Tensor, "steps restarts"]
    soft_trajectory: Float[Tensor, "soft_steps restarts"]
    soft_steps: int
    seed: int

    @property
    def best_tokens(self) -> Int[Tensor, " pos"]:
        return self.tokens[0]

    @property
    def best_activation(self) -> float:
        return float(self.activation[0])

    def to_frame(self, token_labels: TokenLabels | None = None) -> pd.DataFrame:
        rows = []
        for i in range(self.tokens.shape[0]):
            toks = self.tokens[i]
            text = " ".join(labels_of(toks, token_labels)) if token_labels is not None else None
            rows.append(
                dict(
                    restart=i, activation=float(self.activation[i]), tokens=toks.tolist(), text=text
                )
            )
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        return self.to_frame().head(1)[["restart", "activation", "tokens"]]

    def __repr__(self) -> str:
        return (
            f"FeatureVisualization({self.feature.label}: best {self.best_activation:.4g} on "
            f"{self.best_tokens.tolist()}, {self.tokens.shape[0]} restarts, seed {self.seed})"
        )



@dataclass(repr=False)
class NaturalExamples(Saveable):
    """A feature on natural inputs: ``values`` ``[batch, pos]`` at every read position
    (``NaN`` where not read), and the top examples as ``(rows, cols)``, largest first.

    ``to_frame()`` columns: ``rank``, ``row``, ``position``, ``activation``, ``context``
    (the token ids up to and including the position).
    """

    feature: Feature
    tokens: Int[Tensor, "batch pos"]
    values: Float[Tensor, "batch pos"]
    rows: Int[Tensor, " k"]
    cols: Int[Tensor, " k"]

    @property
    def activations(self) -> Float[Tensor, " k"]:
        return self.values[self.rows, self.cols]

    @property
    def distribution(self) -> Float[Tensor, " n"]:
        """Every natural value read (finite), sorted."""
        v = self.values.flatten()
        return v[~v.isnan()].sort().values

    def percentile(self, value: float) -> float:
        """The share (in %) of natural values strictly below ``value``."""
        d = self.distribution
        return 100.0 * float((d < value).double().mean())

    def to_frame(self, token_labels: TokenLabels | None = None) -> pd.DataFrame:
        rows = []
        for rank, (r, c) in enumerate(zip(self.rows.tolist(), self.cols.tolist(), strict=True)):
            ctx = self.tokens[r, : c + 1]
            rows.append(
                dict(
                    rank=rank,
                    row=r,
                    position=c,
                    activation=float(self.values[r, c]),
                    context=" ".join(labels_of(ctx, token_labels)),
                )
            )
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        d = self.distribution
        return pd.DataFrame(
            [
                dict(
                    feature=self.feature.spec,
                    n=int(d.numel()),
                    mean=float(d.mean()),
                    max=float(d.max()),
                    top_k=int(self.rows.numel()),
                    top_k_min=float(self.activations.min()),
                )
            ]
        )

    def __repr__(self) -> str:
        d = self.distribution
        top = ", ".join(
            f"({r}, {c}): {float(self.values[r, c]):.4g}"
            for r, c in zip(self.rows[:3].tolist(), self.cols[:3].tolist(), strict=True)
        )
        more = ", ..." if self.rows.numel() > 3 else ""
        return (
            f"NaturalExamples({self.feature.label}: top {self.rows.numel()} of {d.numel()} "
            f"values read on {self.tokens.shape[0]} x {self.tokens.shape[1]} tokens, max "
            f"{float(d.max()) if d.numel() else float('nan'):.4g}; (row, position): {top}{more})"
        )


MEASURE_TEXT = {
    "activation": "its activation lies far above the natural maximum",
    "natural_start": "the optimiser does not reach it from natural inputs",
    "mechanism": "it is reached through other upstream components than natural inputs",
    "representation": "it is represented unlike natural inputs in the residual stream",
}
"""What each measure says when it is unusual (:mod:`apexlens.engines.features.measures`)."""

EVIDENCE = (
    "fv_activation", "natural_max", "natural_median", "start_activation",
    "mechanism_distance", "mechanism_null_median",
    "representation_distance", "representation_null_median",
)
"""The columns of :attr:`FVCheck.evidence`."""


@dataclass
class FVCheck(Saveable):
    """:func:`apexlens.fv_check`: is a feature visualization (FV) explained by natural inputs,
    as far as the same check on peer features of the same model can tell?

    The decision is a calibrated test (:mod:`apexlens.engines.features.measures`): four
    measures of how unlike its natural top examples the FV is (``activation``,
    ``natural_start``, ``mechanism``, ``representation``), each ranked among the same
    measure of ``peers`` (features of the same kind and layer, visualized the same way),
    combined by the Cauchy combination and ranked again. ``p_value`` is that rank: if the
    feature is not manipulated (exchangeable with its peers), ``P(p_value <= alpha) <=
    alpha``. ``flagged`` is ``p_value <= alpha``.

    ``statistics`` ``[1 + peers, measure]`` and ``evidence`` ``[1 + peers, EVIDENCE]`` hold the
    numbers of the checked feature (row 0) and of every peer (:meth:`peer_frame`), ``rank_p``
    each one's rank p-value per measure among all of them (``p_values``: row 0).

    Columns of ``to_frame()`` / ``summary()`` (one row): ``fv_activation``, ``natural_max``,
    ``ratio`` (fv / natural max), ``percentile``, ``start_activation`` (the best activation
    the optimiser's swap phase reaches from the natural top contexts) and ``start_ratio`` (fv
    / that), ``token_similarity``, ``mechanism_similarity`` / ``representation_similarity`` (the
    cosines to the natural mean) with their ``_floor`` (the lowest such cosine of a natural top
    example), each measure's statistic and ``p_<measure>``, ``p_value``, ``alpha``,
    ``n_peers``, ``flagged`` and ``reason``.
    """

    feature: Feature
    fv: FeatureVisualization
    natural: NaturalExamples
    fv_activation: float
    components: list[str]
    fv_attribution: Float[Tensor, " component"]
    natural_attribution: Float[Tensor, "k component"]
    mechanism_similarity: float
    mechanism_null: Float[Tensor, " k"]
    representation_similarity: float
    representation_null: Float[Tensor, " k"]
    token_similarity: float
    peers: list[str]
    measures: list[str]
    statistics: Float[Tensor, "feature measure"]
    evidence: Float[Tensor, "feature column"]
    rank_p: Float[Tensor, "feature measure"]
    p_value: float
    alpha: float

    @property
    def p_values(self) -> Float[Tensor, " measure"]:
        """The checked feature's rank p-value per measure (row 0 of :attr:`rank_p`)."""
        return self.rank_p[0]

    @property
    def natural_max(self) -> float:
        return float(self.natural.distribution.max())

    @property
    def start_activation(self) -> float:
        """The best activation the optimiser's swap phase reaches from the natural top
        contexts."""
        return float(self.evidence[0, EVIDENCE.index("start_activation")])

    @property
    def percentile(self) -> float:
        return self.natural.percentile(self.fv_activation)

    @property
    def mechanism_floor(self) -> float:
        return float(self.mechanism_null.min())

    @property
    def representation_floor(self) -> float:
        return float(self.representation_null.min())

    @property
    def ratio(self) -> float:
        """The FV's activation over the natural maximum."""
        return self.fv_activation / self.natural_max if self.natural_max > 0 else math.inf

    @property
    def flagged(self) -> bool:
        return self.p_value <= self.alpha

    @property
    def reasons(self) -> list[str]:
        """Why the FV is flagged (empty when it is not): the test, then each measure whose
        rank p-value is at most ``2 alpha``, most unusual first."""
        if not self.flagged:
            return []
        n = self.statistics.shape[0]
        out = [
            f"p = {self.p_value:.3g} <= alpha = {self.alpha:g}: more unusual than "
            f"{n - round(self.p_value * n)} of {n - 1} peer features"
        ]
        order = sorted(range(len(self.measures)), key=lambda m: float(self.p_values[m]))
        for m in order:
            if float(self.p_values[m]) <= 2 * self.alpha:
                name = self.measures[m]
                out.append(f"{MEASURE_TEXT[name]} (p = {float(self.p_values[m]):.3g})")
        return out

    @property
    def verdict(self) -> str:
        if self.flagged:
            return "suspicious: " + "; ".join(self.reasons)
        n = self.statistics.shape[0]
        return (
            f"consistent: p = {self.p_value:.3g} > alpha = {self.alpha:g} ({round(self.p_value * n) - 1}"
            f" of {n - 1} peer features are at least as unusual); {self.ratio:.2f}x the natural "
            "maximum"
        )

    def attribution_frame(self) -> pd.DataFrame:
        """Per upstream component: the FV's share of attribution and the natural mean share."""

        def share(x: Tensor) -> Tensor:
            s = x.abs().sum(-1, keepdim=True)
            return x / s.clamp_min(1e-30)

        nat = share(self.natural_attribution).mean(0)
        fv = share(self.fv_attribution[None])[0]
        return pd.DataFrame(dict(component=self.components, fv=fv.tolist(), natural=nat.tolist()))

    def peer_frame(self) -> pd.DataFrame:
        """One row per feature, the checked one first: ``feature``, ``checked``, ``ratio``,
        every :data:`EVIDENCE` column, every measure and its rank p-value among these rows."""
        p = self.rank_p
        rows = []
        for i, name in enumerate([self.feature.label, *self.peers]):
            ev = dict(zip(EVIDENCE, self.evidence[i].tolist(), strict=True))
            row: dict[str, object] = dict(feature=name, checked=i == 0)
            row["ratio"] = ev["fv_activation"] / ev["natural_max"] if ev["natural_max"] > 0 else math.inf
            row.update(ev)
            for j, m in enumerate(self.measures):
                row[m] = float(self.statistics[i, j])
                row[f"p_{m}"] = float(p[i, j])
            rows.append(row)
        return pd.DataFrame(rows)

    def to_frame(self) -> pd.DataFrame:
        row: dict[str, object] = dict(
            feature=self.feature.label,
            fv_activation=self.fv_activation,
            natural_max=self.natural_max,
            ratio=self.ratio,
            percentile=self.percentile,
            start_activation=self.start_activation,
            start_ratio=(
                self.fv_activation / self.start_activation if self.start_activation > 0 else math.inf
            ),
            token_similarity=self.token_similarity,
            representation_similarity=self.representation_similarity,
            representation_floor=self.representation_floor,
            mechanism_similarity=self.mechanism_similarity,
            mechanism_floor=self.mechanism_floor,
        )
        for j, m in enumerate(self.measures):
            row[m] = float(self.statistics[0, j])
            row[f"p_{m}"] = float(self.p_values[j])
        row.update(
            p_value=self.p_value, alpha=self.alpha, n_peers=len(self.peers),
            flagged=self.flagged, reason="; ".join(self.reasons),
        )
        return pd.DataFrame([row])

    def summary(self) -> pd.DataFrame:
        return self.to_frame()

    def __repr__(self) -> str:
        return f"FVCheck({self.feature.label}: {self.verdict})"
