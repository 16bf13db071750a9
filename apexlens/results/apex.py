"""The answer of an APEX noise sweep: what the model predicted at every noise level."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.results.io import Saveable
from apexlens.results.labels import TokenLabels, labels_of
from apexlens.results.stats import entropy


@dataclass
class ApexResult(Saveable):
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
        return labels_of(torch.tensor([int(token)]), self.token_labels)[0]

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
        ent = [
            entropy(row) if float(t) > 0 else float("nan")
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
                "entropy": ent,
                "effective_n": [math.exp(h) for h in ent],
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
