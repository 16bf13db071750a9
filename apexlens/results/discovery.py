"""Answers of circuit discovery: edge scores and their audit, faithfulness curves, circuits
found by pruning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.results.circuits import CircuitResult
from apexlens.results.io import Saveable
from apexlens.results.stats import ranks, spearman, top_indices, trapezoid
from apexlens.vocab import as_receivers, parse_node
from apexlens.vocab.specs import Circuit


@dataclass(repr=False)
class EdgeScores(Saveable):
    """One signed score per edge: the change of the mean metric when that edge alone is
    ablated (``exact``), or a gradient estimate of it (``eap``, ``eap-ig``).

    ``edges`` are spelled as :func:`apexlens.evaluate_circuit` takes them
    (``("0.1", "1.3.k")``, position-aware ``("0.1@3", "1.3.k@3")``). ``per_example`` holds
    ``[edge, batch]`` values behind each mean.

    ``to_frame()`` columns: ``sender``, ``receiver``, ``score``, ``abs_score``, ``rank``
    (1 = largest ``|score|``).
    """

    edges: list[tuple[str, str]]
    scores: Float[Tensor, " edge"]
    method: str
    per_example: Float[Tensor, "edge batch"] | None = None
    metric_name: str = "metric"
    ablation: str = "resample"
    split_embed: bool = False

    def __len__(self) -> int:
        return len(self.edges)

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.scores):
            raise ApexlensError(f"{len(self.edges)} edges but {len(self.scores)} scores")
        self._pos = {e: i for i, e in enumerate(self.edges)}

    def score(self, sender: str, receiver: str) -> float:
        """The score of one edge."""
        key = (sender, receiver)
        if key not in self._pos:
            raise ApexlensError(f"edge {sender} -> {receiver} has no score here")
        return float(self.scores[self._pos[key]])

    def ranks(self) -> Tensor:
        """1-based rank of each edge by ``|score|`` (1 = largest; ties in edge order)."""
        r = torch.empty(len(self), dtype=torch.long)
        r[top_indices(self.scores, len(self))] = torch.arange(1, len(self) + 1)
        return r

    def top(self, k: int) -> list[tuple[str, str]]:
        """The ``k`` edges with the largest ``|score|``, largest first."""
        _count(k, "top(k)")
        return [self.edges[i] for i in top_indices(self.scores, k).tolist()]

    def to_frame(self) -> pd.DataFrame:
        s = self.scores.double().cpu()
        return pd.DataFrame(
            {
                "sender": [e[0] for e in self.edges],
                "receiver": [e[1] for e in self.edges],
                "score": s.tolist(),
                "abs_score": s.abs().tolist(),
                "rank": self.ranks().tolist(),
            }
        )

    def summary(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` top edges."""
        _count(k, "summary(k)")
        return self.to_frame().sort_values("rank").head(k).reset_index(drop=True)

    def aligned(self, other: EdgeScores) -> Tensor:
        """``other``'s scores in this object's edge order (both must score the same edges)."""
        if set(self.edges) != set(other.edges):
            raise ApexlensError(
                f"the two score sets cover different edges ({len(self)} vs {len(other)}); score "
                "the same edges (same split_embed, positions and edges=...) to compare them"
            )
        return other.scores[[other._pos[e] for e in self.edges]]

    def compare(self, other: EdgeScores, k: int = 20) -> EdgeAudit:
        """Audit an approximation against a reference: the one of the two with
        ``method="exact"`` is the reference (else ``self``). See :class:`EdgeAudit`."""
        ref, approx = (
            (other, self) if other.method == "exact" and self.method != "exact" else (self, other)
        )
        a = ref.aligned(approx).double().cpu()
        r = ref.scores.double().cpu()
        n = len(ref)
        ks = sorted({kk for kk in (10, 100, max(1, n // 100), k) if 0 < kk <= n})
        overlap = {}
        for kk in ks:
            top_r = set(top_indices(r, kk).tolist())
            top_a = set(top_indices(a, kk).tolist())
            overlap[kk] = len(top_r & top_a) / kk
        rank_a = torch.empty(n, dtype=torch.long)
        rank_a[top_indices(a, n)] = torch.arange(1, n + 1)
        top_ref = top_indices(r, min(k, n)).tolist()
        missed = [
            {
                "sender": ref.edges[i][0],
                "receiver": ref.edges[i][1],
                f"{ref.method}_score": float(r[i]),
                f"{approx.method}_score": float(a[i]),
                f"{ref.method}_rank": j + 1,
                f"{approx.method}_rank": int(rank_a[i]),
            }
            for j, i in enumerate(top_ref)
            if int(rank_a[i]) > k
        ]
        return EdgeAudit(
            reference=ref.method,
            approximation=approx.method,
            spearman=spearman(r, a),
            spearman_abs=spearman(r.abs(), a.abs()),
            overlap=overlap,
            missed=pd.DataFrame(missed),
            k=k,
        )

    def __repr__(self) -> str:
        top = ", ".join(f"{s}->{r}" for s, r in self.top(3))
        return f"EdgeScores({self.method}, {len(self)} edges; top: {top})"


@dataclass(repr=False)
class EdgeAudit(Saveable):
    """How well an approximate edge scoring (``approximation``) ranks edges like a
    reference (``reference``, usually ``exact``).

    * ``spearman`` -- rank correlation of the signed scores; ``spearman_abs`` of ``|score|``;
    * ``overlap`` -- ``{k: |top_k(reference) & top_k(approximation)| / k}`` by ``|score|``;
    * ``missed`` -- the reference's top-``k`` edges that the approximation ranks below ``k``
      (a large true effect with a small attributed score), with both scores and ranks.
    """

    reference: str
    approximation: str
    spearman: float
    spearman_abs: float
    overlap: dict[int, float]
    missed: pd.DataFrame
    k: int

    def to_frame(self) -> pd.DataFrame:
        row: dict[str, object] = {
            "reference": self.reference,
            "approximation": self.approximation,
            "spearman": self.spearman,
            "spearman_abs": self.spearman_abs,
            "n_missed": len(self.missed),
        }
        row.update({f"overlap@{k}": v for k, v in self.overlap.items()})
        return pd.DataFrame([row])

    def __repr__(self) -> str:
        ov = ", ".join(f"@{k}: {v:.2f}" for k, v in self.overlap.items())
        return (
            f"EdgeAudit({self.approximation} vs {self.reference}: spearman {self.spearman:.3f} "
            f"(|score| {self.spearman_abs:.3f}); top-k overlap {ov}; {len(self.missed)} of the "
            f"top {self.k} missed)"
        )


MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The MIB circuit sizes: the top 0.1%, 0.2%, ..., 50%, 100% of edges."""


@dataclass(repr=False)
class FaithfulnessResult(Saveable):
    """A MIB faithfulness curve (Mueller et al. 2025): circuits of the top ``fractions`` of
    edges by ``|score|``, each evaluated exactly.

    * ``f[i] = (m(circuit_i) - m(empty)) / (m(full) - m(empty))``;
    * ``cpr`` -- area under ``f`` (trapezoids, linear in the fraction, from the first
      fraction to the last, as MIB computes it): higher is better;
    * ``cmd`` -- area under ``|1 - f|``: lower is better.

    ``to_frame()`` columns: ``fraction``, ``n_edges``, ``metric``, ``faithfulness``.
    """

    fractions: list[float]
    n_edges: list[int]
    values: Float[Tensor, "fraction batch"]
    full: float
    empty: float
    method: str = ""
    ablation: str = "resample"

    @property
    def metric(self) -> Tensor:
        return self.values.mean(-1)

    @property
    def f(self) -> Tensor:
        gap = self.full - self.empty
        if gap == 0:
            raise ApexlensError("m(full) == m(empty): faithfulness is undefined")
        return (self.metric.double() - self.empty) / gap

    @property
    def cpr(self) -> float:
        return trapezoid(self.fractions, self.f.tolist())

    @property
    def cmd(self) -> float:
        return trapezoid(self.fractions, (1 - self.f).abs().tolist())

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "fraction": self.fractions,
                "n_edges": self.n_edges,
                "metric": self.metric.double().tolist(),
                "faithfulness": self.f.tolist(),
            }
        )

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([{"method": self.method, "cpr": self.cpr, "cmd": self.cmd}])

    def __repr__(self) -> str:
        return f"FaithfulnessResult({self.method}: CPR {self.cpr:.3f}, CMD {self.cmd:.3f})"



def _count(k: object, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ApexlensError(f"{what} needs an int k >= 0, got {k!r}")
    return k


def edge_auc(scores: EdgeScores, true_edges: Sequence[tuple[str, str]] | Circuit) -> float:
    """ROC AUC of ``|score|`` as a detector of the edges in ``true_edges`` (the ACDC /
    auto-circuit convention: every threshold on ``|score|`` is a circuit; ties count half).

    Edges of ``true_edges`` are matched by spelling after parsing (``"0.1" -> "1.3"`` means
    its q, k and v edges). 1.0: every true edge scores above every other edge.
    """
    if not isinstance(scores, EdgeScores):
        raise ApexlensError(
            f"edge_auc scores must be EdgeScores (from attribute_edges), got {type(scores).__name__}"
        )
    if not bool(torch.isfinite(scores.scores).all()):
        raise ApexlensError(
            "edge_auc: scores hold NaN or inf; an AUC needs a finite score for every edge"
        )
    pairs = list(true_edges) if isinstance(true_edges, (list, tuple, Circuit)) else None
    if pairs is None or not all(isinstance(e, (list, tuple)) and len(e) == 2 for e in pairs):
        raise ApexlensError(
            "edge_auc: true_edges must be a list of (sender, receiver) pairs of node names, "
            f"e.g. [('0.1', '1.3.k')], got {true_edges!r}"[:300]
        )
    wanted: set[tuple[str, str]] = set()
    for s, r in pairs:
        sn = parse_node(s)
        for rn in as_receivers([parse_node(r)]):
            wanted.add((str(sn), str(rn)))
    labels = torch.tensor([e in wanted for e in scores.edges])
    unknown = wanted - set(scores.edges)
    if unknown:
        raise ApexlensError(f"true edges without a score: {sorted(unknown)[:5]}")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ApexlensError("edge_auc needs at least one true and one other edge")
    rank = ranks(scores.scores.abs()) + 1
    u = float(rank[labels].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


@dataclass(repr=False)
class DiscoveryResult(Saveable):
    """A circuit found by greedy exact pruning (:func:`apexlens.discover`).

    * ``edges`` -- the edges kept; ``circuit`` -- them as an :class:`apexlens.Circuit`;
    * ``evaluation`` -- the :class:`CircuitResult` of the kept edges (``recovery``,
      ``proportion_explained``);
    * ``steps`` -- one row per edge tried: ``sender``, ``receiver``, ``before`` / ``after``
      (mean metric of the current circuit without / with the removal), ``removed``.
    """

    edges: list[tuple[str, str]]
    evaluation: CircuitResult
    threshold: float
    n_total: int
    steps: pd.DataFrame
    n_forward_rows: int = 0

    @property
    def circuit(self) -> Circuit:
        return Circuit(self.edges, ablation=self.evaluation.ablation)  # type: ignore[arg-type]

    @property
    def recovery(self) -> float:
        return self.evaluation.recovery

    @property
    def proportion_explained(self) -> float:
        return self.evaluation.proportion_explained

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.edges, columns=["sender", "receiver"])

    def summary(self) -> pd.DataFrame:
        """``n_edges`` kept ``of`` the starting graph, ``threshold``, and the kept circuit's
        recovery and proportion explained with their intervals and ablation
        (:meth:`CircuitResult.summary`)."""
        head = pd.DataFrame(
            [{"n_edges": len(self.edges), "of": self.n_total, "threshold": self.threshold}]
        )
        tail = self.evaluation.summary().drop(columns=["n_edges"])
        return pd.concat([head, tail], axis=1)

    def __repr__(self) -> str:
        lo, hi = self.evaluation.recovery_ci()
        return (
            f"DiscoveryResult({len(self.edges)} of {self.n_total} edges at threshold "
            f"{self.threshold:g}, {self.evaluation.ablation} ablation: recovery "
            f"{self.recovery:.3f} [95% CI {lo:.3f}, {hi:.3f}])"
        )
