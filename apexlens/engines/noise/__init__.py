"""The noise engine: Gaussian noise in hidden activations, every noisy pass a row.

*Where* noise goes is a list of sites (:mod:`apexlens.vocab.sites`); *what* it is, a noise
distribution (:class:`Noise`; :class:`Gaussian` by default, the only one APEX uses) whose
every value is a pure function of (seed, example id, draw, site, position, feature)
(:mod:`~apexlens.engines.noise.rng`), so results do not depend on how rows are batched.

* :mod:`~apexlens.engines.noise.sweep` -- :class:`SweepPlan`, the clean pass, noisy rows,
  :func:`sweep` (every (sigma, draw, example));
* :mod:`~apexlens.engines.noise.escape` -- :func:`first_escapes`, the adaptive search for
  each ray's first escape;
* :mod:`~apexlens.engines.noise.hooks` -- the same noise as plain hooks;
* :mod:`~apexlens.engines.noise.degenerate` -- passes that are numerical artefacts.
"""

from apexlens.engines.noise.degenerate import CODES, classify, overflowed
from apexlens.engines.noise.escape import EscapePlan, Rays, first_escapes
from apexlens.engines.noise.hooks import NoiseState, noise_fwd_hooks
from apexlens.engines.noise.rng import Gaussian, Noise, NoiseKey, site_key, uniforms
from apexlens.engines.noise.sweep import (
    CleanPass,
    NoisePlan,
    SweepOut,
    SweepPlan,
    clean_pass,
    entry_layer,
    noisy_logits,
    sweep,
)

__all__ = [
    "CODES",
    "CleanPass",
    "EscapePlan",
    "Gaussian",
    "Noise",
    "NoiseKey",
    "NoisePlan",
    "NoiseState",
    "Rays",
    "SweepOut",
    "SweepPlan",
    "classify",
    "clean_pass",
    "entry_layer",
    "first_escapes",
    "noise_fwd_hooks",
    "noisy_logits",
    "overflowed",
    "site_key",
    "sweep",
    "uniforms",
]
