"""The edge-attribution methods, one class each.

* ``"exact"`` -- the true change, ``m(full graph minus the edge) - m(clean)``
  (:mod:`~apexlens.engines.attribution.exact`);
* ``"eap"`` (Syed et al. 2023) -- ``Delta_s . dm/d input_r`` at the clean input: one forward
  and one backward pass give the gradient at every receiver's input;
* ``"eap-ig"`` (Hanna et al. 2024, integrated gradients on the inputs) -- the same with the
  gradient averaged over ``ig_steps`` inputs on the straight line from the corrupted to the
  clean embeddings, ``x_k = x_corr + (k / ig_steps) (x_clean - x_corr)``, ``k = 0 ..
  ig_steps - 1`` (their convention); all steps run as rows of one forward/backward pass.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor

from apexlens.engines.attribution.base import Job
from apexlens.engines.attribution.exact import exact_scores
from apexlens.engines.attribution.gradients import gradient_scores
from apexlens.engines.attribution.registry import METHOD_INFO
from apexlens.errors import ApexlensError


def _no_options(name: str, options: dict[str, Any], known: tuple[str, ...] = ()) -> None:
    extra = sorted(set(options) - set(known))
    if extra:
        raise ApexlensError(f"method {name!r} takes no option {extra[0]!r}")


class Exact:
    """The true effect of removing each edge alone from the full graph."""

    name = "exact"
    exact = METHOD_INFO["exact"].exact

    def check(self, options: dict[str, Any]) -> dict[str, Any]:
        _no_options(self.name, {k: v for k, v in options.items() if k != "ig_steps"})
        return {}

    def scores(self, job: Job) -> Float[Tensor, "edge batch"]:
        return exact_scores(job)


class EAP:
    """Edge attribution patching: the gradient at the clean input."""

    name = "eap"
    exact = METHOD_INFO["eap"].exact

    def check(self, options: dict[str, Any]) -> dict[str, Any]:
        _no_options(self.name, {k: v for k, v in options.items() if k != "ig_steps"})
        return {}

    def scores(self, job: Job) -> Float[Tensor, "edge batch"]:
        return gradient_scores(job, [1.0])


class EAPIG:
    """EAP with integrated gradients on the inputs (``ig_steps`` points, default 5)."""

    name = "eap-ig"
    exact = METHOD_INFO["eap-ig"].exact

    def check(self, options: dict[str, Any]) -> dict[str, Any]:
        _no_options(self.name, options, ("ig_steps",))
        steps = options.get("ig_steps", 5)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ApexlensError(f"ig_steps must be a positive integer, got {steps!r}")
        return {"ig_steps": steps}

    def scores(self, job: Job) -> Float[Tensor, "edge batch"]:
        steps = int(job.options["ig_steps"])
        return gradient_scores(job, [k / steps for k in range(steps)])
