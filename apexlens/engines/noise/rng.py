"""Batch-invariant noise: every value a pure function of its coordinates.

A noise value is keyed by ``(seed, example id, draw, site, position, feature, stream)``:

1. ``h = mix(seed * G + C)``, then ``h = mix(h + (x + 1) * G)`` for ``x`` = the example id,
   the draw, the site's key (CRC32 of its stream name) and the position, in that order;
2. ``bits = mix(h + (2 * feature + stream + 1) * G)``; a uniform in ``(0, 1)`` is
   ``(bits >> 11 + 1/2) * 2**-53``.

``mix`` is SplitMix64's finaliser (Steele, Lea & Flood 2014), ``G = 0x9E3779B97F4A7C15``,
``C = 0x1234567``, all arithmetic modulo ``2**64`` (int64 tensors with wrap-around; logical
shifts emulated). A distribution turns uniforms into values: :class:`Gaussian` draws two
(streams 0 and 1) and applies Box-Muller in float64.

So an example's noise depends only on the seed, its own id and the draw -- not on which
other examples share its batch, how the rows are chunked, the sequence length (a position's
noise is keyed by the position), which other sites get noise, or the device (the integer
hash is exact everywhere; the float64 transform may differ across devices by rounding).
``torch.Generator`` streams cannot give that: a value depends on how much was drawn before
it. :func:`apexlens.reference.reference_normal` computes the same numbers with NumPy's
``uint64`` arithmetic, independently of this code.

A new noise distribution is one class with a ``name`` and a ``draw`` (:class:`Noise`),
built on :func:`uniforms`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

_M64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A uint64 as the int64 with the same bits."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN = 0x9E3779B97F4A7C15
SEED_OFFSET = 0x1234567
_G = _signed(GOLDEN)
_C1 = _signed(0xBF58476D1CE4E5B9)
_C2 = _signed(0x94D049BB133111EB)


def _srl(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits read as uint64."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix(z: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (wrap-around multiplication)."""
    z = (z ^ _srl(z, 30)) * _C1
    z = (z ^ _srl(z, 27)) * _C2
    return z ^ _srl(z, 31)


def site_key(stream: str) -> int:
    """A stable integer per noise stream name (CRC32)."""
    return zlib.crc32(stream.encode())


@dataclass(frozen=True)
class NoiseKey:
    """Whose noise: one row per ``(example_ids[r], draws[r])`` at the site ``site``."""

    seed: int
    example_ids: Int[Tensor, " rows"]
    draws: Int[Tensor, " rows"]
    site: str


def _chain(h: Tensor, x: Tensor | int) -> Tensor:
    step = _signed((x + 1) * GOLDEN) if isinstance(x, int) else (x + 1) * _G
    return mix(h + step)


def uniforms(
    key: NoiseKey,
    positions: Int[Tensor, " pos"],
    n_features: int,
    stream: int,
    device: torch.device,
) -> Float[Tensor, "rows pos features"]:
    """Uniforms in ``(0, 1)``, float64, for every row, position and feature (module
    docstring); ``stream`` tells independent uniforms of one coordinate apart."""
    h = mix(torch.tensor([_signed(key.seed * GOLDEN + SEED_OFFSET)], device=device))
    h = _chain(h, key.example_ids.to(device=device, dtype=torch.long))
    h = _chain(h, key.draws.to(device=device, dtype=torch.long))
    h = _chain(h, site_key(key.site))[:, None]  # [rows, 1]
    h = _chain(h, positions.to(device=device, dtype=torch.long)[None, :])[..., None]
    feature = torch.arange(n_features, device=device, dtype=torch.long)
    bits = mix(h + (2 * feature + stream + 1) * _G)  # [rows, pos, features]
    return (_srl(bits, 11).double() + 0.5) * 2.0**-53


class Noise(Protocol):
    """A noise distribution: standard draws (then scaled by ``sigma``), a pure function of
    their :class:`NoiseKey` and coordinates."""

    name: str

    def draw(
        self, key: NoiseKey, positions: Int[Tensor, " pos"], shape: Sequence[int], like: Tensor
    ) -> Tensor:
        """``[rows, len(positions), *shape]`` standard draws in ``like``'s dtype and device;
        ``shape``: the activation's axes after the position axis."""
        ...


class Gaussian:
    """``xi ~ N(0, I)``: APEX's noise (Ren, Luo & Li 2026), by Box-Muller from two
    :func:`uniforms` (streams 0 and 1), in float64, then cast to the activation's dtype."""

    name = "gaussian"

    def draw(
        self, key: NoiseKey, positions: Int[Tensor, " pos"], shape: Sequence[int], like: Tensor
    ) -> Tensor:
        n = math.prod(int(s) for s in shape)
        u1 = uniforms(key, positions, n, 0, like.device)
        u2 = uniforms(key, positions, n, 1, like.device)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return z.to(like.dtype).reshape(len(key.draws), len(positions), *shape)
