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


@dataclass
class FVCheck(Saveable):
    """:func:`apexlens.fv_check`: is a feature visualization explained by natural inputs?

    Columns of ``to_frame()`` / ``summary()`` (one row):

    * ``fv_activation`` -- the FV's activation (its best discrete input);
    * ``natural_max`` -- the largest natural activation; ``ratio`` = fv / natural max;
    * ``percentile`` -- the share of natural activations below the FV's (in %);
    * ``token_similarity`` -- bag-of-token cosine between the FV and the natural top-k
      contexts (0: no token in common, 1: the same token counts);
    * ``representation_similarity`` -- cosine between the residual stream the feature reads
      (at the read position), FV vs the mean of the natural top-k; ``representation_floor``:
      the lowest such cosine of a natural top example against the others;
    * ``mechanism_similarity`` -- cosine between upstream attribution profiles (gradient x
      activation per embedding, head and MLP), FV vs the natural top-k mean;
      ``mechanism_floor``: the lowest such cosine of a natural top example;
    * ``flagged`` -- the verdict. A fabricated visualization must do two things a natural
      input does not: outdo every natural input by far (``ratio >= ratio_threshold``, default
      2) *and* get there another way -- mechanism similarity below ``mechanism_floor -
      margin`` or representation similarity below ``representation_floor - margin``.
      Either alone is common in honest models (an optimised input often beats natural text a
      little; natural top examples disagree with each other), both together is what a
      planted slingshot input looks like. ``reason`` says which.
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
    margin: float = 0.05
    ratio_threshold: float = 2.0

    @property
    def natural_max(self) -> float:
        return float(self.natural.distribution.max())

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
    def differences(self) -> list[str]:
        """How the FV is processed unlike every natural top example (empty: it is not)."""
        out = []
        if self.mechanism_similarity < self.mechanism_floor - self.margin:
            out.append(
                f"reached through other components (attribution cosine "
                f"{self.mechanism_similarity:.2f}; every natural top example >= "
                f"{self.mechanism_floor:.2f})"
            )
        if self.representation_similarity < self.representation_floor - self.margin:
            out.append(
                f"represented unlike natural inputs (residual cosine "
                f"{self.representation_similarity:.2f}; every natural top example >= "
                f"{self.representation_floor:.2f})"
            )
        return out

    @property
    def reasons(self) -> list[str]:
        """Why the FV is flagged (empty when it is not)."""
        if self.ratio < self.ratio_threshold or not self.differences:
            return []
        return [
            f"{self.ratio:.2f}x the natural maximum (threshold {self.ratio_threshold:g}x)",
            *self.differences,
        ]

    @property
    def flagged(self) -> bool:
        return bool(self.reasons)

    @property
    def verdict(self) -> str:
        if self.flagged:
            return "suspicious: the visualization is " + "; ".join(self.reasons)
        how = (
            "; ".join(self.differences)
            if self.differences
            else "processed like the natural top examples"
        )
        return (
            f"consistent: {self.ratio:.2f}x the natural maximum (below the "
            f"{self.ratio_threshold:g}x threshold)"
            if self.ratio < self.ratio_threshold
            else "consistent"
        ) + f"; {how}"

    def attribution_frame(self) -> pd.DataFrame:
        """Per upstream component: the FV's share of attribution and the natural mean share."""

        def share(x: Tensor) -> Tensor:
            s = x.abs().sum(-1, keepdim=True)
            return x / s.clamp_min(1e-30)

        nat = share(self.natural_attribution).mean(0)
        fv = share(self.fv_attribution[None])[0]
        return pd.DataFrame(dict(component=self.components, fv=fv.tolist(), natural=nat.tolist()))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                dict(
                    feature=self.feature.label,
                    fv_activation=self.fv_activation,
                    natural_max=self.natural_max,
                    ratio=self.ratio,
                    percentile=self.percentile,
                    token_similarity=self.token_similarity,
                    representation_similarity=self.representation_similarity,
                    representation_floor=self.representation_floor,
                    mechanism_similarity=self.mechanism_similarity,
                    mechanism_floor=self.mechanism_floor,
                    flagged=self.flagged,
                    reason="; ".join(self.reasons),
                )
            ]
        )

    def summary(self) -> pd.DataFrame:
        return self.to_frame()

    def __repr__(self) -> str:
        return f"FVCheck({self.feature.label}: {self.verdict})"
