"""APEX: probing a network by adding Gaussian noise to its hidden activations.

APEX (Ren, Luo & Li 2026, "Probing Neural Networks via Activation Perturbation",
arXiv 2602.03586) keeps the input and the weights fixed and adds noise ``sigma * xi``,
``xi ~ N(0, I)``, to hidden activations at inference. For every input and every noise
level ``sigma``, ``K`` Monte-Carlo forward passes give an empirical distribution over the
predicted token. Two regimes show up:

* **small sigma -- sample regularity.** How much noise a sample's prediction withstands:
  its *escape noise* is the smallest ``sigma`` at which the clean prediction is no longer
  predicted by a majority of the draws. Confident, "regular" samples escape late.
* **large sigma -- model bias.** The behaviour stops depending on the sample: predictions
  concentrate on the tokens the model itself is biased toward. In a backdoored model they
  concentrate sharply on the backdoor target, from clean inputs alone.

Input perturbation is the special case of noise on the embeddings only (preset ``"embed"``).

Where the noise goes (``sites``)
--------------------------------
Any TransformerLens hook points, given by name (``"blocks.3.attn.hook_z"``) or by preset:

=================  ======================================================================
``"resid_post"``   every block's output ``blocks.{l}.hook_resid_post`` (the paper; default)
``"embed"``        the input to block 0, ``blocks.0.hook_resid_pre`` (input perturbation)
``"resid_pre"``    every block's input ``blocks.{l}.hook_resid_pre``
``"resid_mid"``    ``blocks.{l}.hook_resid_mid``
``"attn_out"``     ``blocks.{l}.hook_attn_out``
``"mlp_out"``      ``blocks.{l}.hook_mlp_out``
``"z"``            head outputs ``blocks.{l}.attn.hook_z`` (every head of the layer)
=================  ======================================================================

A preset may be restricted to layers: ``"resid_pre:6"``, ``"z:0,1"``, ``"mlp_out:-1"``.
Raw ``hook_embed`` / ``hook_pos_embed`` also work (then every draw runs the whole model).
On a ``TransformerBridge``, ``blocks.{l}.hook_resid_mid`` is the MLP's input hook, so noise
there reaches the MLP only, not the residual stream that skips past it.

How big the noise is (``relative``)
-----------------------------------
* ``relative=False``: ``sigma`` is the absolute standard deviation, as in the paper.
* ``relative=True``: residual norms grow with depth, so the same ``sigma`` means very
  different things at different sites. Here the standard deviation at a site is
  ``sigma * RMS(a)``, where ``a`` is the activation at that site *of the clean run*, and
  the RMS is taken over the **last axis only**, separately for every example and position
  (and head, for ``hook_z``): ``RMS(a)[b, p] = sqrt(mean_i a[b, p, i]**2)``.
  ``sigma = 1`` thus adds noise as large as the activation itself.
  (:func:`noise_hooks` has no clean run to look at: there ``RMS`` is taken of the
  activation as it reaches the hook, which equals the clean one at the first noised site.)

Common random numbers
---------------------
Draw ``d`` uses the *same* standard-normal ``xi_d`` at every ``sigma`` (scaled by that
``sigma``). Every row of the sweep has exactly the right marginal distribution, and the
differences between rows are not Monte-Carlo noise, so curves over ``sigma`` are smooth and
each draw has its own escape point. The generator is consumed in a fixed order -- draw by
draw, and within a draw site by site in the order the hooks fire, one
``randn(batch, *activation.shape[1:])`` each -- so :func:`apex` gives the same numbers as
a plain loop of forward passes under :func:`noise_hooks` with the same generator, whatever
its batch size.

Speed
-----
Every (sigma, draw) pair is a copy of the batch; the copies are stacked along the batch
dimension and run together, chunked to a memory budget. Nothing before the first noised
site changes, so the run starts from the cached clean residual stream entering the first
noised block (:meth:`Backend.run_layers`), and logits are computed only at the scored
positions (:meth:`Backend.unembed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.backend import ApexlensError, Backend, backend_for
from apexlens.hooks import HookFn, attached, inference_mode

__all__ = [
    "ApexResult",
    "apex",
    "compare",
    "noise_fwd_hooks",
    "noise_hooks",
    "resolve_sites",
    "SITE_PRESETS",
]

SITE_PRESETS: dict[str, Callable[[int], str]] = {
    "resid_post": Backend.resid_post,
    "resid_pre": Backend.resid_pre,
    "resid_mid": Backend.resid_mid,
    "attn_out": Backend.attn_out,
    "mlp_out": Backend.mlp_out,
    "z": Backend.z,
}
"""Preset name -> hook name of layer ``l``. ``"embed"`` is ``blocks.0.hook_resid_pre``."""

Sites = str | Sequence[str]
TokenLabels = Callable[[Tensor], Sequence[str]] | Sequence[str]

_RESID_POST_SUFFIX = ".hook_resid_post"


# ---------------------------------------------------------------------------- sites
def _parse_layers(spec: str, n_layers: int, item: str) -> list[int]:
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            layer = int(part)
        except ValueError:
            raise ApexlensError(
                f"site {item!r}: expected comma-separated layer numbers after ':', got {part!r}"
            ) from None
        if not -n_layers <= layer < n_layers:
            raise ApexlensError(
                f"site {item!r}: layer {layer} out of range for a {n_layers}-layer model"
            )
        layers.append(layer % n_layers)
    return layers


def resolve_sites(model: Any, sites: Sites) -> list[str]:
    """Hook names for a site spec (hook names and/or presets, see the module docstring).

    Unknown hook names, empty specs and bad layer numbers raise :class:`ApexlensError`.
    """
    backend = backend_for(model)
    items = [sites] if isinstance(sites, str) else list(sites)
    if not items:
        raise ApexlensError("sites is empty: name at least one hook point or preset")
    n_layers = backend.dims.n_layers
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ApexlensError(f"sites must be strings (hook names or presets), got {item!r}")
        kind, colon, spec = item.partition(":")
        if kind == "embed" and not colon:
            names.append(Backend.resid_pre(0))
        elif kind in SITE_PRESETS:
            layers = _parse_layers(spec, n_layers, item) if colon else list(range(n_layers))
            names.extend(SITE_PRESETS[kind](layer) for layer in layers)
        else:
            names.append(item)
    names = list(dict.fromkeys(names))
    hook_dict = getattr(backend.model, "hook_dict", None)
    if hook_dict is not None:
        for name in names:
            if name not in hook_dict:
                raise ApexlensError(
                    f"unknown hook point {name!r}: sites are hook names such as "
                    f"'blocks.0.hook_resid_post' or presets {['embed', *SITE_PRESETS]} "
                    "(optionally restricted to layers, e.g. 'resid_pre:6')"
                )
    return names


def _block_of(name: str) -> int | None:
    """Layer of a ``blocks.{l}.*`` hook name, ``None`` for hooks outside the blocks."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def _entry_layer(name: str) -> int | None:
    """The first block that must be run for noise at ``name`` to matter.

    ``blocks.{l}.hook_resid_post`` is the residual entering block ``l + 1``, so it can be
    added to that block's input directly; any other hook in block ``l`` fires inside it.
    """
    layer = _block_of(name)
    if layer is None:
        return None
    return layer + 1 if name.endswith(_RESID_POST_SUFFIX) else layer


# ---------------------------------------------------------------------------- checks
def _check_sigma(sigma: float) -> float:
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ApexlensError(f"sigma must be a number, got {sigma!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ApexlensError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return value


def _check_sigmas(sigmas: Sequence[float] | Tensor) -> Tensor:
    values = [_check_sigma(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if not values:
        raise ApexlensError("sigmas is empty: give at least one noise level")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ApexlensError(f"sigmas must be strictly increasing, got {values}")
    return torch.tensor(values, dtype=torch.float64)


def _position_list(positions: int | Sequence[int], what: str) -> list[int]:
    raw = [positions] if isinstance(positions, int) else list(positions)
    if not raw:
        raise ApexlensError(f"{what} is empty: give positions, or None for all positions")
    out: list[int] = []
    for p in raw:
        if isinstance(p, Tensor) and p.numel() == 1 and not p.is_floating_point():
            p = int(p)
        if isinstance(p, bool) or not isinstance(p, int):
            raise ApexlensError(f"{what} must be integers, got {p!r}")
        out.append(p)
    return out


def _normalise_positions(
    positions: int | Sequence[int] | None, seq_len: int, what: str
) -> Tensor | None:
    """Sorted, de-duplicated, non-negative positions (``None``: all positions)."""
    if positions is None:
        return None
    out: set[int] = set()
    for p in _position_list(positions, what):
        if not -seq_len <= p < seq_len:
            raise ApexlensError(
                f"{what}: position {p} out of range for sequences of length {seq_len}"
            )
        out.add(p % seq_len)
    return torch.tensor(sorted(out), dtype=torch.long)


def _scored_positions(
    positions: int | Sequence[int] | Tensor, n: int, seq_len: int
) -> tuple[Tensor, Tensor]:
    """(example, position) of every scored sample, example-major."""
    if isinstance(positions, Tensor):
        if positions.is_floating_point() or positions.dim() not in (1, 2):
            raise ApexlensError(
                "positions as a tensor must hold integers, shape (batch,) or (batch, k); got "
                f"{positions.dtype} {tuple(positions.shape)}"
            )
        pos = positions.detach().to("cpu", torch.long)
        if pos.shape[0] != n:
            raise ApexlensError(f"positions has {pos.shape[0]} rows but tokens has {n} examples")
        pos = pos.reshape(n, -1)
    else:
        raw = [positions] if isinstance(positions, int) else list(positions)
        if not raw or not all(isinstance(p, int) and not isinstance(p, bool) for p in raw):
            raise ApexlensError(
                f"positions must be an int, a list of ints or an integer tensor, got {positions!r}"
            )
        pos = torch.tensor(raw, dtype=torch.long).expand(n, -1)
    if pos.numel() == 0:
        raise ApexlensError("positions is empty: score at least one position")
    bad = (pos < -seq_len) | (pos >= seq_len)
    if bool(bad.any()):
        raise ApexlensError(
            f"positions: {pos[bad][0].item()} out of range for sequences of length {seq_len}"
        )
    pos = pos % seq_len
    examples = torch.arange(n).unsqueeze(1).expand_as(pos)
    return examples.reshape(-1).clone(), pos.reshape(-1).clone()


# ---------------------------------------------------------------------------- noise
def _sample(generator: torch.Generator | None, shape: Sequence[int], like: Tensor) -> Tensor:
    """``randn(shape)`` drawn on the generator's device in ``like``'s dtype, moved to ``like``."""
    device = generator.device if generator is not None else like.device
    xi = torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype)
    return xi.to(like.device)


def _rms(act: Tensor) -> Tensor:
    """Root mean square over the last axis, kept as a length-1 axis."""
    return act.pow(2).mean(dim=-1, keepdim=True).sqrt()


def _add(act: Tensor, noise: Tensor, pos_idx: Tensor | None) -> Tensor:
    if pos_idx is None:
        return act + noise
    out = act.clone()
    out[:, pos_idx] = out[:, pos_idx] + noise
    return out


def noise_fwd_hooks(
    model: Any,
    sigma: float,
    *,
    sites: Sites = "resid_post",
    relative: bool = False,
    positions: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[str, HookFn]]:
    """``(hook_name, fn)`` pairs that add ``sigma``-scaled Gaussian noise at ``sites``.

    For ``model.run_with_hooks(tokens, fwd_hooks=...)`` or :func:`apexlens.hooks.attached`.
    Each time a hook fires it draws ``xi ~ N(0, I)`` from ``generator`` (the global RNG if
    ``None``) -- shaped like the activation, or like its ``positions`` slice -- and adds
    ``sigma * xi`` (``sigma * RMS(act) * xi`` with ``relative=True``, the RMS over the last
    axis of the activation reaching the hook). ``positions`` (ints, negative allowed) picks
    the sequence positions (axis 1) that get noise; ``None`` means all.
    """
    scale = _check_sigma(sigma)
    names = resolve_sites(model, sites)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ApexlensError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if positions is not None:
        _position_list(positions, "positions")  # wrong types fail here, ranges at run time

    def hook(act: Tensor, hook: Any) -> Tensor:
        pos_idx = _normalise_positions(positions, act.shape[1], "positions")
        shape = act.shape if pos_idx is None else (act.shape[0], len(pos_idx), *act.shape[2:])
        xi = _sample(generator, shape, act)
        if pos_idx is not None:
            pos_idx = pos_idx.to(act.device)
        if relative:
            ref = act.detach() if pos_idx is None else act.detach()[:, pos_idx]
            noise = (scale * _rms(ref)) * xi
        else:
            noise = scale * xi
        return _add(act, noise, pos_idx)

    return [(name, hook) for name in names]


@contextmanager
def noise_hooks(
    model: Any,
    sigma: float,
    *,
    sites: Sites = "resid_post",
    relative: bool = False,
    positions: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Any]:
    """Context manager: every forward pass inside the block runs with activation noise.

    >>> with noise_hooks(model, 0.5, sites="resid_pre:3", generator=g):
    ...     noisy_logits = model(tokens)

    Arguments as in :func:`noise_fwd_hooks`. The hooks are removed when the block ends,
    also after an exception; the user's own hooks are left alone.
    """
    hooks = noise_fwd_hooks(
        model, sigma, sites=sites, relative=relative, positions=positions, generator=generator
    )
    with attached(backend_for(model).model, hooks):
        yield model


# ---------------------------------------------------------------------------- result
def _entropy(p: Tensor) -> float:
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


@dataclass
class ApexResult:
    """An APEX sweep: what the model predicted at every noise level, draw and sample.

    A *sample* is one scored (example, position) pair; ``sample_example`` and
    ``sample_position`` map samples back to the input. Probabilities and the histogram
    statistics are over ``n_draws * n_samples`` predictions per ``sigma``.
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
        if self.token_labels is None:
            return str(int(token))
        if callable(self.token_labels):
            return str(self.token_labels(torch.tensor([int(token)]))[0])
        return str(self.token_labels[int(token)])

    # ------------------------------------------------------------------ per sample
    @property
    def clean_share(self) -> Float[Tensor, "n_sigma n_samples"]:
        """Fraction of draws that still predict the clean token."""
        same = self.predictions == self.clean_predictions
        return same.double().mean(dim=1)

    @property
    def sample_flip_rate(self) -> Float[Tensor, "n_sigma n_samples"]:
        """Fraction of draws whose prediction differs from the clean one."""
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
        out.scatter_add_(1, flat, torch.ones_like(flat))
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

    def summary(self) -> pd.DataFrame:
        """One row per ``sigma``: how concentrated the predictions are.

        * ``entropy`` -- of the predicted-token histogram (nats),
        * ``effective_n`` -- ``exp(entropy)``, the effective number of predicted tokens,
        * ``top1_share`` / ``dominant_token`` (+ ``dominant_label``) -- the most predicted
          token and its share of all predictions (ties: lower id),
        * ``flip_rate`` -- share of predictions differing from the sample's clean one,
        * ``kl`` -- :meth:`kl`, how far the mean predicted distribution moved,
        * ``escaped`` -- share of samples whose clean prediction has lost its majority.
        """
        counts = self.counts().double()
        probs = counts / counts.sum(dim=1, keepdim=True)
        entropy = [_entropy(row) for row in probs]
        dominant = [int(torch.argmax(row)) for row in counts]  # first max: lowest id
        frame = pd.DataFrame(
            {
                "sigma": self.sigmas.tolist(),
                "entropy": entropy,
                "effective_n": [math.exp(h) for h in entropy],
                "top1_share": probs.max(dim=1).values.tolist(),
                "dominant_token": dominant,
                "dominant_label": [self.label(t) for t in dominant],
                "flip_rate": self.sample_flip_rate.mean(dim=1).tolist(),
                "kl": self.kl().tolist(),
                "escaped": (self.clean_share <= 0.5).double().mean(dim=1).tolist(),
            }
        )
        return frame


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


# ---------------------------------------------------------------------------- sweep
def _row_bytes(backend: Backend, seq_len: int, k: int, site_numel: int) -> int:
    """Rough peak memory of one (example, draw, sigma) row of a batched forward pass."""
    d = backend.dims
    d_mlp = int(getattr(backend.model.cfg, "d_mlp", None) or 4 * d.d_model)
    per_pos = 8 * d.d_model + 2 * d_mlp + 3 * d.n_heads * seq_len + 4 * d.n_heads * d.d_head
    item = torch.finfo(backend.dtype).bits // 8 if backend.dtype.is_floating_point else 4
    return item * (seq_len * per_pos + 3 * site_numel) + 8 * 3 * k * d.d_vocab


def apex(
    model: Any,
    tokens: Int[Tensor, "batch pos"] | Any,
    *,
    sigmas: Sequence[float] | Tensor,
    n_draws: int = 32,
    sites: Sites = "resid_post",
    relative: bool = False,
    positions: int | Sequence[int] | Tensor | None = None,
    noise_positions: int | Sequence[int] | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    max_batch: int | None = None,
    memory_budget: int = 1 << 30,
    token_labels: TokenLabels | None = None,
) -> ApexResult:
    """Sweep activation noise over a ``sigma`` grid and record the predicted tokens.

    Args:
        model: a model :func:`apexlens.backend.backend_for` accepts.
        tokens: ``[batch, pos]`` token ids, or a :class:`~apexlens.tasks.TaskBatch` (its
            clean tokens; its ``positions`` unless ``positions`` is given).
        sigmas: strictly increasing noise levels ``>= 0``.
        n_draws: Monte-Carlo forward passes per sigma (``K`` in the paper).
        sites: hook names and/or presets (module docstring); default every block's output.
        relative: scale the noise at each site by the clean activation's RMS (module
            docstring); default absolute ``sigma``.
        positions: the scored positions, whose next-token prediction is recorded: an int
            or a list of ints for every example, or an integer tensor ``(batch,)`` /
            ``(batch, k)`` of per-example positions. Default: the last position.
        noise_positions: positions that get noise (ints for every example); default all.
        seed: seeds a fresh ``torch.Generator`` on the model's device.
        generator: use this generator instead of ``seed`` (it is advanced).
        max_batch: rows per forward pass (one row = one example at one (sigma, draw));
            default from ``memory_budget`` (bytes, a rough estimate).
        token_labels: token id -> label (a callable on a tensor of ids such as
            ``task.token_labels``, or a sequence indexed by id), for tables and plots.

    Returns:
        an :class:`ApexResult`.
    """
    backend = backend_for(model)
    positions_given = positions
    if hasattr(tokens, "clean_tokens") and hasattr(tokens, "positions"):
        if positions_given is None:
            positions_given = tokens.positions
        tokens = tokens.clean_tokens
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.dim() not in (1, 2):
        raise ApexlensError(
            "tokens must be an integer tensor [batch, pos] (or [pos]) or a TaskBatch, got "
            + (
                f"{tokens.dtype} {tuple(tokens.shape)}"
                if isinstance(tokens, Tensor)
                else type(tokens).__name__
            )
        )
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    n, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
    if n == 0 or seq_len == 0:
        raise ApexlensError(f"tokens is empty: shape {tuple(tokens.shape)}")
    d_vocab_in = int(getattr(backend.model.cfg, "d_vocab", backend.dims.d_vocab))
    if int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab_in:
        raise ApexlensError(
            f"token ids must lie in [0, {d_vocab_in}), got {int(tokens.min())}..{int(tokens.max())}"
        )
    if seq_len > backend.dims.n_ctx:
        raise ApexlensError(
            f"sequences of length {seq_len} exceed the model's n_ctx {backend.dims.n_ctx}"
        )
    sig = _check_sigmas(sigmas)
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
        raise ApexlensError(f"n_draws must be a positive integer, got {n_draws!r}")
    names = resolve_sites(backend, sites)
    ex_idx, pos_idx = _scored_positions(
        -1 if positions_given is None else positions_given, n, seq_len
    )
    noise_pos = _normalise_positions(noise_positions, seq_len, "noise_positions")
    if generator is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ApexlensError(f"seed must be an integer, got {seed!r}")
        generator = torch.Generator(device=backend.device).manual_seed(seed)
        used_seed: int | None = seed
    else:
        if not isinstance(generator, torch.Generator):
            raise ApexlensError(
                f"generator must be a torch.Generator, got {type(generator).__name__}"
            )
        used_seed = None
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ApexlensError(f"max_batch must be a positive integer, got {max_batch!r}")

    tokens = tokens.to(backend.device)
    entries = [_entry_layer(name) for name in names]
    n_layers = backend.dims.n_layers
    # the first block to run; None: a site outside the blocks, so every draw runs everything
    start = None if None in entries else min(e for e in entries if e is not None)

    with inference_mode(backend.model):
        # ---- clean run: predictions, the residual entering `start`, site shapes and order
        order: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}
        like: dict[str, Tensor] = {}  # an empty tensor with the site's dtype and device

        def recorder(name: str) -> HookFn:  # by closure: a bridge's hook.name is an alias
            def record(act: Tensor, hook: Any) -> None:
                if name not in shapes:
                    order.append(name)
                    shapes[name] = tuple(act.shape)
                    like[name] = act.new_empty(0)

            return record

        cache_names: list[str] = []
        entry_name = None
        if start is not None:
            entry_name = (
                Backend.resid_pre(start) if start < n_layers else Backend.resid_post(n_layers - 1)
            )
            cache_names.append(entry_name)
        if relative:
            cache_names.extend(names)
        try:
            clean_logits, cache = backend.run_with_cache(
                tokens, cache_names, fwd_hooks=[(name, recorder(name)) for name in names]
            )
        except (ValueError, NotImplementedError) as err:  # e.g. a bridge's disabled hook point
            if isinstance(err, ApexlensError):
                raise
            raise ApexlensError(f"cannot put noise at sites {names}: {err}") from err
        missing = [name for name in names if name not in shapes]
        if missing:
            raise ApexlensError(
                f"sites {missing} never fire in a forward pass of this model "
                "(is the TransformerLens flag that enables them off?)"
            )
        if noise_pos is not None:
            for name in names:
                if len(shapes[name]) < 2 or shapes[name][1] != seq_len:
                    raise ApexlensError(
                        f"noise_positions needs positions on axis 1, but {name!r} has shape "
                        f"{shapes[name]}"
                    )
        clean_at = clean_logits[ex_idx.to(clean_logits.device), pos_idx.to(clean_logits.device)]
        clean_at = clean_at.double()
        clean_pred = clean_at.argmax(dim=-1)
        top2 = clean_at.topk(min(2, clean_at.shape[-1]), dim=-1).values
        margin = top2[:, 0] - top2[:, -1]
        clean_mean_probs = clean_at.softmax(dim=-1).mean(dim=0)
        d_vocab = int(clean_at.shape[-1])
        del clean_logits

        # ---- the noise scale of every site: sigma (absolute) or sigma * clean RMS
        rms: dict[str, Tensor] = {}
        if relative:
            for name in names:
                act = cache[name]
                ref = act if noise_pos is None else act[:, noise_pos.to(act.device)]
                rms[name] = _rms(ref)
        noise_shape = {
            name: (n, *shapes[name][1:])
            if noise_pos is None
            else (n, len(noise_pos), *shapes[name][2:])
            for name in order
        }

        # ---- chunking: rows are (draw, sigma, example), draw-major
        n_combo = n_draws * len(sig)
        if max_batch is None:
            site_numel = sum(math.prod(noise_shape[name][1:]) for name in order)
            row_bytes = _row_bytes(backend, seq_len, len(ex_idx) // n + 1, site_numel)
            rows = max(1, memory_budget // row_bytes)
        else:
            rows = max_batch
        per_chunk = max(1, min(n_combo, rows // n))

        preds = torch.empty(len(sig), n_draws, len(ex_idx), dtype=torch.long)
        prob_sum = torch.zeros(len(sig), d_vocab, dtype=torch.float64, device=backend.device)
        xi: dict[int, dict[str, Tensor]] = {}
        next_draw = 0
        sig_dev = sig.to(backend.device)
        dev_ex, dev_pos = ex_idx.to(backend.device), pos_idx.to(backend.device)
        noise_pos_dev = None if noise_pos is None else noise_pos.to(backend.device)
        direct = (
            [Backend.resid_post(start - 1)]
            if start is not None and start >= 1 and Backend.resid_post(start - 1) in names
            else []
        )

        noise: dict[str, Tensor] = {}  # this chunk's noise per site, [chunk * n, ...]

        def injector(name: str) -> HookFn:
            def inject(act: Tensor, hook: Any) -> Tensor:
                return _add(act, noise[name], noise_pos_dev)

            return inject

        for c0 in range(0, n_combo, per_chunk):
            combos = torch.arange(c0, min(c0 + per_chunk, n_combo))
            draws, sidx = combos // len(sig), combos % len(sig)
            n_chunk = len(combos)
            while next_draw <= int(draws[-1]):  # fixed order: draw by draw, site by site
                xi[next_draw] = {
                    name: _sample(generator, noise_shape[name], like[name]) for name in order
                }
                next_draw += 1
            for d in [d for d in xi if d < int(draws[0])]:
                del xi[d]

            noise.clear()
            for name in order:
                stack = torch.stack([xi[int(d)][name] for d in draws])  # [chunk, n, ...]
                s = sig_dev[sidx].to(stack.dtype).view(-1, *([1] * (stack.dim() - 1)))
                scale = s * rms[name].unsqueeze(0) if relative else s
                noise[name] = (scale * stack).reshape(n_chunk * n, *stack.shape[2:])

            hooks = [(name, injector(name)) for name in order if name not in direct]
            if start is not None and entry_name is not None:
                resid = cache[entry_name].repeat(n_chunk, *([1] * (cache[entry_name].dim() - 1)))
                for name in direct:
                    resid = _add(resid, noise[name], noise_pos_dev)
                final = backend.run_layers(resid, start, n_layers, hooks)
                final = final.view(n_chunk, n, *final.shape[1:])[:, dev_ex, dev_pos]
                logits = backend.unembed(final)
            else:
                full, _ = backend.run_with_cache(tokens.repeat(n_chunk, 1), [], fwd_hooks=hooks)
                logits = full.view(n_chunk, n, *full.shape[1:])[:, dev_ex, dev_pos]
            logits = logits.double()
            preds[sidx, draws] = logits.argmax(dim=-1).cpu()
            prob_sum.index_add_(0, sidx.to(backend.device), logits.softmax(dim=-1).sum(dim=1))

    return ApexResult(
        sigmas=sig,
        predictions=preds,
        clean_predictions=clean_pred.cpu(),
        clean_margin=margin.cpu(),
        mean_probs=(prob_sum / (n_draws * len(ex_idx))).cpu(),
        clean_mean_probs=clean_mean_probs.cpu(),
        sample_example=ex_idx,
        sample_position=pos_idx,
        sites=tuple(order),
        relative=bool(relative),
        seed=used_seed,
        token_labels=token_labels,
    )
