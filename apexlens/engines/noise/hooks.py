"""Noise as plain hooks, for any forward pass a user runs (:func:`apexlens.noise_hooks`).

The hooks add exactly the noise a sweep adds to the same example, draw and sigma
(:func:`~apexlens.engines.noise.sweep.site_noise`): ``sigma * xi`` keyed by
``(seed, example id, draw, site, position, feature)``, times the *clean* activation's RMS
with ``relative``. A hook has no clean run to look at, so with ``relative`` a clean pass of
the same input runs first, before every noisy pass (:meth:`NoiseState.before_forward`, run by
:func:`apexlens.model.hooks.before_each_forward`) with every other hook silenced: it records
each site's RMS, then the noisy pass uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from apexlens.engines.noise.rng import Gaussian, Noise, NoiseKey
from apexlens.engines.noise.sweep import clean_rms
from apexlens.errors import ApexlensError
from apexlens.model import edits
from apexlens.model.hooks import HookFn, attached, silenced
from apexlens.vocab.positions import shared_positions
from apexlens.vocab.sites import Site


@dataclass
class NoiseState:
    """What the hooks of one :func:`noise_fwd_hooks` call share: the draw of the current pass
    and, with ``relative``, the clean RMS of each site in it."""

    sites: Sequence[Site]
    sigma: float
    relative: bool
    seed: int
    draw: int | None
    example_ids: Tensor | None
    positions: Any
    noise: Noise = field(default_factory=Gaussian)
    passes: int = 0
    rms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def current_draw(self) -> int:
        """``draw``, or (``None``) the number of noisy passes run before this one."""
        return self.draw if self.draw is not None else max(self.passes - 1, 0)

    def before_forward(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count the pass; with ``relative``, run it once clean -- with every other hook of
        the model silenced, the user's included -- to record each site's RMS."""
        self.passes += 1
        if not self.relative:
            return
        self.rms.clear()
        record = [(site.hook, self._recorder(site)) for site in self.sites]
        with torch.no_grad(), silenced(model), attached(model, record):
            model(*args, **kwargs)

    def _positions(self, act: Tensor) -> Tensor | None:
        if self.positions is None:
            return None
        return shared_positions(self.positions, act.shape[1], "positions").to(act.device)

    def _recorder(self, site: Site) -> HookFn:
        def record(act: Tensor, hook: Any) -> None:
            self.rms[site.hook] = clean_rms(act.detach(), site, self._positions(act))

        return record

    def hook(self, site: Site) -> HookFn:
        def add_noise(act: Tensor, hook: Any) -> Tensor:
            pos = self._positions(act)
            return edits.add(self.delta(site, act, pos), pos)(act, hook)

        return add_noise

    def delta(self, site: Site, act: Tensor, pos: Tensor | None) -> Tensor:
        batch = act.shape[0]
        ids = torch.arange(batch) if self.example_ids is None else self.example_ids
        if len(ids) != batch:
            raise ApexlensError(
                f"example_ids has {len(ids)} ids but the forward pass has {batch} examples"
            )
        positions = torch.arange(act.shape[1]) if pos is None else pos.cpu()
        rest = [1 if i + 1 in site.shared_axes else s for i, s in enumerate(act.shape[2:])]
        draws = torch.full((batch,), self.current_draw, dtype=torch.long)
        xi = self.noise.draw(NoiseKey(self.seed, ids, draws, site.stream), positions, rest, act)
        scale = torch.tensor(self.sigma, dtype=torch.float64).to(act.device, act.dtype)
        if self.relative:
            if site.hook not in self.rms:
                raise ApexlensError(
                    f"relative noise at {site.hook!r}: no clean pass recorded its RMS; use the "
                    "noise_hooks context manager, which runs one before every noisy pass"
                )
            return (scale * self.rms[site.hook]) * xi
        return scale * xi


def noise_fwd_hooks(state: NoiseState) -> list[tuple[str, HookFn]]:
    """``(hook_name, fn)`` pairs that add ``state``'s noise at its sites."""
    return [(site.hook, state.hook(site)) for site in state.sites]
