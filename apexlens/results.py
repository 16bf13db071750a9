"""What the engines return: one result type per kind of question, one convention.

Every result has

* ``to_frame()`` -- a pandas DataFrame with one row per unit of the result (a sender or
  node of a patching sweep, a circuit, a noise level), every column defined in the class
  docstring;
* ``summary()`` -- the headline columns of the same rows, also a DataFrame;
* the per-example values behind every mean (``per_example``, ``scores``), so any other
  statistic can be computed.

=======================  ==================================================================
:class:`PathPatchResult` path patching, one row per sender: 0 = no effect, -1 = the whole
                         clean-corrupted difference flows along the paths
:class:`ActPatchResult`  activation patching (clean into corrupted), one row per node:
                         0 = nothing restored, 1 = the clean behaviour fully restored
:class:`CircuitResult`   a circuit hypothesis: metric, recovery, proportion explained
:class:`ApexResult`      an APEX noise sweep, one row per noise level
=======================  ==================================================================
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.features import Feature
from apexlens.graph import parse_node
from apexlens.scoring import Scores
from apexlens.specs import Circuit

TokenLabels = Callable[[Tensor], Sequence[str]] | Sequence[str]


def _node_fields(name: str) -> tuple[int | None, int | None]:
    try:
        node = parse_node(name)
    except ApexlensError:
        return None, None
    layer = node.layer if node.kind in ("head", "mlp", "resid") else None
    return layer, node.head


# ============================================================================ patching
@dataclass
class PathPatchResult:
    """Per-sender metric values of a path-patching sweep.

    ``to_frame()`` columns: ``sender``, ``layer``, ``head`` (None where not a head/MLP),
    ``value`` (mean metric with the sender patched), ``normalized`` (:meth:`normalized`),
    ``sem`` (standard error of ``value`` over examples), ``ci_low`` / ``ci_high`` (95%
    seeded bootstrap interval of ``value``).
    """

    senders: list[str]
    receivers: list[str]
    per_example: Float[Tensor, "sender batch"]
    clean: Scores
    corrupted: Scores
    grid: tuple[int, ...] | None = None
    metric_name: str = "metric"
    via: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "path_patch"
    normalized_meaning: ClassVar[str] = "0 = no effect, -1 = the whole clean-corrupted difference"

    @property
    def values(self) -> Tensor:
        """Mean metric per sender; ``[n_layers, n_heads]`` when the senders are all heads."""
        v = self.per_example.mean(-1)
        return v.reshape(self.grid) if self.grid else v

    def _gap(self) -> float:
        gap = self.clean.mean - self.corrupted.mean
        if gap == 0:
            raise ApexlensError("clean and corrupted metrics are equal; normalisation is undefined")
        return gap

    def normalized(self) -> Tensor:
        """``(patched - clean) / (clean - corrupted)``: 0 = no effect, -1 = the whole effect."""
        return (self.values - self.clean.mean) / self._gap()

    def scores(self, sender: str | int) -> Scores:
        i = self.senders.index(sender) if isinstance(sender, str) else sender
        return Scores(self.per_example[i])

    def to_frame(self) -> pd.DataFrame:
        rows = []
        norm = self.normalized().flatten()
        for i, s in enumerate(self.senders):
            sc = self.scores(i)
            lo, hi = sc.ci()
            layer, head = _node_fields(s)
            rows.append(
                {
                    "sender": s,
                    "layer": layer,
                    "head": head,
                    "value": float(sc.mean),
                    "normalized": float(norm[i]),
                    "sem": float(sc.sem),
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                }
            )
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """``sender``, ``value``, ``normalized``, ``sem`` of :meth:`to_frame`."""
        return self.to_frame()[["sender", "value", "normalized", "sem"]]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.senders)} senders -> {self.receivers or 'outputs'}, "
            f"metric {self.metric_name}: clean {self.clean.mean:.4g}, corrupted "
            f"{self.corrupted.mean:.4g}; n={len(self.clean)})"
        )


@dataclass(repr=False)
class ActPatchResult(PathPatchResult):
    """Per-node metric values of activation patching: the corrupted run with one node's
    clean activation put back (TransformerLens' ``get_act_patch_*`` convention).

    ``normalized`` is ``(patched - corrupted) / (clean - corrupted)``: 0 = nothing
    restored, 1 = the clean behaviour fully restored. ``to_frame()`` has the columns of
    :class:`PathPatchResult` (``sender`` names the patched node).
    """

    kind: ClassVar[str] = "act_patch"
    normalized_meaning: ClassVar[str] = "0 = nothing restored, 1 = clean behaviour restored"

    def normalized(self) -> Tensor:
        """``(patched - corrupted) / (clean - corrupted)``: 0 = nothing restored, 1 = all."""
        return (self.values - self.corrupted.mean) / self._gap()


# ============================================================================ circuits
@dataclass(repr=False)
class CircuitResult:
    """The metric under a circuit hypothesis, with its recovery and proportion explained.

    Columns of ``to_frame()`` / ``summary()`` (one row):

    * ``n_edges`` -- edges in the hypothesis;
    * ``metric`` -- mean metric with every edge outside the hypothesis ablated;
    * ``clean`` / ``ablated`` -- mean metric of the clean run / with every edge ablated
      (for resample ablation: the corrupted run);
    * ``recovery`` -- ``(metric - ablated) / (clean - ablated)``: 1 = the hypothesis keeps
      all of the behaviour, 0 = none;
    * ``proportion_explained`` -- ``1 - aue / ate`` (Goldowsky-Dill et al. 2023), NaN where
      ``ate`` is 0 (a single-logit output has no distribution to compare: use recovery);
    * ``aue`` -- mean KL divergence from the clean next-token distribution to the
      hypothesis' (at the positions the metric reads);
    * ``ate`` -- the same to the fully ablated model's.

    ``aue``, ``ate`` and ``proportion_explained`` are computed when first read.
    """

    edges: list[tuple[str, str]]
    scores: Scores
    clean: Scores
    corrupted: Scores
    """The metric with every edge ablated (for resample ablation: the corrupted run)."""
    recovery: float
    ablation: str = "resample"
    _kl: Callable[[], tuple[float, float]] | None = field(default=None, compare=False)
    _kl_values: tuple[float, float] | None = field(default=None, compare=False)

    def _kls(self) -> tuple[float, float]:
        if self._kl_values is None:
            if self._kl is None:
                raise ApexlensError("this CircuitResult has no KL information")
            self._kl_values = self._kl()
            self._kl = None
        return self._kl_values

    @property
    def aue(self) -> float:
        return self._kls()[0]

    @property
    def ate(self) -> float:
        return self._kls()[1]

    @property
    def proportion_explained(self) -> float:
        aue, ate = self._kls()
        if ate > 0:
            return 1.0 - aue / ate
        warnings.warn(
            "proportion explained is undefined (NaN): ATE, the mean KL divergence from the clean "
            "outputs to the fully ablated ones, is 0 -- a single output (d_vocab_out = 1) has no "
            "next-token distribution, or ablation leaves the distribution unchanged. Use recovery "
            "with a metric that reads the output, e.g. apexlens.scoring.OutputSquaredError",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan")

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "n_edges": len(self.edges),
                    "metric": float(self.scores.mean),
                    "clean": float(self.clean.mean),
                    "ablated": float(self.corrupted.mean),
                    "recovery": self.recovery,
                    "proportion_explained": self.proportion_explained,
                    "aue": self.aue,
                    "ate": self.ate,
                    "ablation": self.ablation,
                }
            ]
        )

    def summary(self) -> pd.DataFrame:
        """``n_edges``, ``metric``, ``recovery``, ``proportion_explained``."""
        return self.to_frame()[["n_edges", "metric", "recovery", "proportion_explained"]]

    def __repr__(self) -> str:
        return (
            f"CircuitResult({len(self.edges)} edges, {self.ablation} ablation: metric "
            f"{self.scores.mean:.4g} (clean {self.clean.mean:.4g}, ablated "
            f"{self.corrupted.mean:.4g}), recovery {self.recovery:.3f}; n={len(self.scores)})"
        )


# ============================================================================ APEX
def _entropy(p: Tensor) -> float:
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


@dataclass
class ApexResult:
    """An APEX sweep: what the model predicted at every noise level, draw and sample.

    A *sample* is one scored (example, position) pair; ``sample_example`` and
    ``sample_position`` map samples back to the input. Probabilities and the histogram
    statistics are over the ``n_draws * n_samples`` predictions per ``sigma`` whose logits
    were finite; a noisy pass with NaN/inf logits predicts nothing (``-1`` in
    ``predictions``) and is counted in ``nonfinite``. ``to_frame()`` / ``summary()``: one
    row per sigma, columns defined in :meth:`to_frame`.

    Longer than most classes on purpose: it is the one home of the APEX statistics (per
    sample, per sigma, histograms, escape noise), each a short property or method.
    """

    sigmas: Float[Tensor, "n_sigma"]
    predictions: Int[Tensor, "n_sigma n_draws n_samples"]
    """Predicted (argmax) token of every noisy forward pass."""
    clean_predictions: Int[Tensor, "n_samples"]
    clean_margin: Float[Tensor, "n_samples"]
    """Clean logit of the top-1 token minus that of the top-2 token."""
    mean_probs: Float[Tensor, "n_sigma d_vocab"]
    """Softmax of the noisy logits, averaged over draws and samples."""
    clean_mean_probs: Float[Tensor, "d_vocab"]
    """Softmax of the clean logits, averaged over samples."""
    sample_example: Int[Tensor, "n_samples"]
    sample_position: Int[Tensor, "n_samples"]
    sites: tuple[str, ...]
    relative: bool
    seed: int | None = None
    token_labels: TokenLabels | None = field(default=None, repr=False)
    nonfinite: Int[Tensor, "n_sigma"] | None = None
    """Per sigma: noisy passes (draw x sample) whose logits were NaN or inf."""

    def __post_init__(self) -> None:
        if self.nonfinite is None:
            self.nonfinite = (self.predictions < 0).reshape(self.predictions.shape[0], -1).sum(-1)

    # ------------------------------------------------------------------ shapes
    @property
    def n_sigma(self) -> int:
        return int(self.predictions.shape[0])

    @property
    def n_draws(self) -> int:
        return int(self.predictions.shape[1])

    @property
    def n_samples(self) -> int:
        return int(self.predictions.shape[2])

    @property
    def d_vocab(self) -> int:
        return int(self.mean_probs.shape[-1])

    def sigma_index(self, sigma: float) -> int:
        """Index of ``sigma`` on the grid (it must be a grid value, up to rounding)."""
        diffs = (self.sigmas - float(sigma)).abs()
        i = int(diffs.argmin())
        if float(diffs[i]) > 1e-9 * max(1.0, abs(float(sigma))):
            raise ApexlensError(f"sigma {sigma} is not on the grid {self.sigmas.tolist()}")
        return i

    def label(self, token: int) -> str:
        """The token's label if ``token_labels`` was given, else its id as a string."""
        return _labels(torch.tensor([int(token)]), self.token_labels)[0]

    # ------------------------------------------------------------------ per sample
    @property
    def valid(self) -> Tensor:
        """``[n_sigma, n_draws, n_samples]``: whether the noisy pass had finite logits."""
        return self.predictions >= 0

    @property
    def clean_share(self) -> Float[Tensor, "n_sigma n_samples"]:
        """Fraction of (finite) draws that still predict the clean token (NaN: none finite)."""
        same = (self.predictions == self.clean_predictions).double().sum(dim=1)
        return same / self.valid.double().sum(dim=1)

    @property
    def sample_flip_rate(self) -> Float[Tensor, "n_sigma n_samples"]:
        """Fraction of (finite) draws whose prediction differs from the clean one."""
        return 1.0 - self.clean_share

    @property
    def escaped(self) -> Tensor:
        """Whether the sample's clean prediction loses its majority somewhere on the grid."""
        return (self.clean_share <= 0.5).any(dim=0)

    @property
    def escape_noise(self) -> Float[Tensor, "n_samples"]:
        """Per sample: the smallest ``sigma`` where the clean token loses its majority.

        The clean token has the majority while more than half of the draws predict it
        (``clean_share > 0.5``). The escape noise is where ``clean_share`` first reaches
        0.5, linearly interpolated between the two grid points around the crossing; the
        point ``(sigma=0, clean_share=1)`` is implied below the grid. A sample that never
        escapes on the grid gets the grid's largest ``sigma`` (right-censored; never inf
        or NaN) -- check :attr:`escaped` to tell them apart.
        """
        share = self.clean_share
        sig = self.sigmas
        if float(sig[0]) > 0:
            sig = torch.cat([sig.new_zeros(1), sig])
            share = torch.cat([share.new_ones(1, share.shape[1]), share])
        below = share <= 0.5
        first = below.double().argmax(dim=0)
        out = torch.full((self.n_samples,), float(self.sigmas[-1]), dtype=torch.float64)
        for j in torch.nonzero(below.any(dim=0)).flatten().tolist():
            i = int(first[j])
            if i == 0:
                out[j] = sig[0]
                continue
            p0, p1 = float(share[i - 1, j]), float(share[i, j])
            s0, s1 = float(sig[i - 1]), float(sig[i])
            out[j] = s0 + (p0 - 0.5) / (p0 - p1) * (s1 - s0)
        return out

    # ------------------------------------------------------------------ per dataset
    def counts(self, sigma: float | None = None, sample: int | None = None) -> Tensor:
        """Predicted-token counts over the vocabulary: ``[n_sigma, d_vocab]``, or one row
        for ``sigma``; restricted to one sample's draws with ``sample``."""
        preds = self.predictions if sample is None else self.predictions[:, :, sample : sample + 1]
        flat = preds.reshape(self.n_sigma, -1)
        out = torch.zeros(self.n_sigma, self.d_vocab, dtype=torch.long)
        out.scatter_add_(1, flat.clamp_min(0), (flat >= 0).long())
        return out if sigma is None else out[self.sigma_index(sigma)]

    def histogram(
        self, sigma: float, sample: int | None = None
    ) -> tuple[Int[Tensor, "n_tok"], Int[Tensor, "n_tok"]]:  # noqa: F821
        """Token ids predicted at ``sigma`` and how often, most frequent first (ties: lower
        id first). Over all samples, or over one sample's draws with ``sample``."""
        c = self.counts(sigma, sample)
        ids = torch.nonzero(c).flatten()
        order = sorted(ids.tolist(), key=lambda t: (-int(c[t]), t))
        ids = torch.tensor(order, dtype=torch.long)
        return ids, c[ids]

    def histogram_frame(
        self, sigma: float, sample: int | None = None, top: int | None = None
    ) -> pd.DataFrame:
        """:meth:`histogram` as a DataFrame: ``token``, ``label``, ``count``, ``share``."""
        ids, c = self.histogram(sigma, sample)
        if top is not None:
            ids, c = ids[:top], c[:top]
        total = self.n_draws * (self.n_samples if sample is None else 1)
        return pd.DataFrame(
            {
                "token": ids.tolist(),
                "label": [self.label(t) for t in ids.tolist()],
                "count": c.tolist(),
                "share": (c.double() / total).tolist(),
            }
        )

    def kl(self) -> Float[Tensor, "n_sigma"]:
        """``KL(P_sigma || P_clean)`` in nats, where ``P_sigma`` is the noisy next-token
        distribution averaged over draws and samples and ``P_clean`` the clean one averaged
        over samples."""
        p = self.mean_probs
        q = self.clean_mean_probs.clamp_min(torch.finfo(torch.float64).tiny)
        terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), p.new_zeros(()))
        return terms.sum(dim=-1).clamp_min(0.0)

    def to_frame(self) -> pd.DataFrame:
        """One row per ``sigma``: how concentrated the predictions are.

        * ``entropy`` -- of the predicted-token histogram (nats),
        * ``effective_n`` -- ``exp(entropy)``, the effective number of predicted tokens,
        * ``top1_share`` / ``dominant_token`` (+ ``dominant_label``) -- the most predicted
          token and its share of all predictions (ties: lower id),
        * ``flip_rate`` -- share of predictions differing from the sample's clean one,
        * ``kl`` -- :meth:`kl`, how far the mean predicted distribution moved,
        * ``escaped`` -- share of samples whose clean prediction has lost its majority
          (at most half of the draws still predict it),
        * ``nonfinite`` -- share of noisy passes whose logits were NaN/inf (left out of
          every other column; a sigma where all were has NaN and dominant token -1).
        """
        counts = self.counts().double()
        total = counts.sum(dim=1, keepdim=True)
        probs = counts / total
        entropy = [
            _entropy(row) if float(t) > 0 else float("nan")
            for row, t in zip(probs, total, strict=True)
        ]
        dominant = [
            int(torch.argmax(row)) if float(t) > 0 else -1
            for row, t in zip(counts, total, strict=True)
        ]
        escaped = (self.clean_share <= 0.5).double()
        escaped[torch.isnan(self.clean_share)] = float("nan")
        assert self.nonfinite is not None
        frame = pd.DataFrame(
            {
                "sigma": self.sigmas.tolist(),
                "entropy": entropy,
                "effective_n": [math.exp(h) for h in entropy],
                "top1_share": probs.max(dim=1).values.tolist(),
                "dominant_token": dominant,
                "dominant_label": [self.label(t) if t >= 0 else "" for t in dominant],
                "flip_rate": self.sample_flip_rate.mean(dim=1).tolist(),
                "kl": [
                    float("nan") if float(t) == 0 else float(k)
                    for k, t in zip(self.kl(), total, strict=True)
                ],
                "escaped": escaped.mean(dim=1).tolist(),
                "nonfinite": (self.nonfinite.double() / (self.n_draws * self.n_samples)).tolist(),
            }
        )
        return frame

    def summary(self) -> pd.DataFrame:
        """The per-sigma table of :meth:`to_frame` (every column is a headline here)."""
        return self.to_frame()


def compare(results: Mapping[str, ApexResult]) -> pd.DataFrame:
    """Summaries of several sweeps on the same ``sigma`` grid in one long DataFrame.

    One row per (model, sigma) with a ``model`` column (the dict key) followed by the
    :meth:`ApexResult.summary` columns -- e.g. a trained model against its random-init twin.
    """
    if not results:
        raise ApexlensError("compare needs at least one ApexResult")
    items = list(results.items())
    ref_name, ref = items[0]
    frames = []
    for name, res in items:
        if not isinstance(res, ApexResult):
            raise ApexlensError(f"compare: {name!r} is a {type(res).__name__}, not an ApexResult")
        if res.sigmas.shape != ref.sigmas.shape or not torch.allclose(res.sigmas, ref.sigmas):
            raise ApexlensError(
                f"compare: {name!r} has sigmas {res.sigmas.tolist()} but {ref_name!r} has "
                f"{ref.sigmas.tolist()}; sweep both on the same grid"
            )
        frame = res.summary()
        frame.insert(0, "model", str(name))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# ============================================================================ discovery
def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), 0-based, float64."""
    x = x.double().cpu()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    i, n = 0, len(x)
    # walk runs of equal values
    boundaries = torch.nonzero(sorted_x[1:] != sorted_x[:-1]).flatten().tolist() + [n - 1]
    for j in boundaries:
        ranks[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either is
    constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def _top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest ``|scores|``; ties broken by edge order (stable)."""
    order = torch.argsort(-scores.abs().double().cpu(), stable=True)
    return order[:k]


@dataclass(repr=False)
class EdgeScores:
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
        r[_top_indices(self.scores, len(self))] = torch.arange(1, len(self) + 1)
        return r

    def top(self, k: int) -> list[tuple[str, str]]:
        """The ``k`` edges with the largest ``|score|``, largest first."""
        if k < 0:
            raise ApexlensError(f"top(k) needs k >= 0, got {k}")
        return [self.edges[i] for i in _top_indices(self.scores, k).tolist()]

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
            top_r = set(_top_indices(r, kk).tolist())
            top_a = set(_top_indices(a, kk).tolist())
            overlap[kk] = len(top_r & top_a) / kk
        rank_a = torch.empty(n, dtype=torch.long)
        rank_a[_top_indices(a, n)] = torch.arange(1, n + 1)
        top_ref = _top_indices(r, min(k, n)).tolist()
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
class EdgeAudit:
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
class FaithfulnessResult:
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
        return _trapezoid(self.fractions, self.f.tolist())

    @property
    def cmd(self) -> float:
        return _trapezoid(self.fractions, (1 - self.f).abs().tolist())

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


def _trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)))


def edge_auc(scores: EdgeScores, true_edges: Sequence[tuple[str, str]]) -> float:
    """ROC AUC of ``|score|`` as a detector of the edges in ``true_edges`` (the ACDC /
    auto-circuit convention: every threshold on ``|score|`` is a circuit; ties count half).

    Edges of ``true_edges`` are matched by spelling after parsing (``"0.1" -> "1.3"`` means
    its q, k and v edges). 1.0: every true edge scores above every other edge.
    """
    from apexlens.graph import as_receivers

    wanted: set[tuple[str, str]] = set()
    for s, r in true_edges:
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
    ranks = _ranks(scores.scores.abs()) + 1
    u = float(ranks[labels].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


@dataclass(repr=False)
class DiscoveryResult:
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
        return pd.DataFrame(
            [
                {
                    "n_edges": len(self.edges),
                    "of": self.n_total,
                    "threshold": self.threshold,
                    "recovery": self.recovery,
                    "proportion_explained": self.proportion_explained,
                }
            ]
        )

    def __repr__(self) -> str:
        return (
            f"DiscoveryResult({len(self.edges)} of {self.n_total} edges at threshold "
            f"{self.threshold:g}: recovery {self.recovery:.3f})"
        )


# ============================================================================ feature visualization
@dataclass
class FeatureVisualization:
    """What :func:`apexlens.visualize` found, one row per restart, best first.

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
            text = " ".join(_labels(toks, token_labels)) if token_labels is not None else None
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


def _labels(tokens: Tensor, token_labels: TokenLabels | None) -> list[str]:
    if token_labels is None:
        return [str(int(t)) for t in tokens]
    if callable(token_labels):
        return [str(t) for t in token_labels(tokens)]
    return [str(token_labels[int(t)]) for t in tokens]


@dataclass
class NaturalExamples:
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
                    context=" ".join(_labels(ctx, token_labels)),
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


@dataclass
class FVCheck:
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
