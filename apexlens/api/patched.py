"""``with apexlens.patched(model, spec, corrupted):`` -- any forward pass under a path patch
(:class:`~apexlens.vocab.specs.Paths`) or a circuit hypothesis
(:class:`~apexlens.vocab.specs.Circuit`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from jaxtyping import Int
from torch import Tensor

from apexlens.engines import paths
from apexlens.engines.circuits import CircuitPlan
from apexlens.errors import ApexlensError
from apexlens.model import backend_for
from apexlens.model.hooks import attached, inference_mode
from apexlens.runs import Runs, ablation_for, cache_names, cached_run, check_tokens, run_from
from apexlens.vocab import Circuit, EdgeIndex, Paths, as_senders, parse_nodes, position_mask
from apexlens.vocab.edges import uses_split_embed


@contextmanager
def patched(
    model: Any,
    spec: Paths | Circuit,
    corrupted_tokens: Int[Tensor, "batch pos"],
    *,
    positions: Mapping[str, Any] | None = None,
    reference_tokens: Tensor | None = None,
) -> Iterator[Any]:
    """Attach a path patch or a circuit hypothesis to the model's hook points.

    Inside the block any run of the model -- your own metric, ``run_with_cache``,
    generation -- happens under the patch::

        with apexlens.patched(model, apexlens.Paths("0.1", "1.2.k"), corrupted):
            logits = model(clean_tokens)

    For :class:`Paths`, each forward pass's clean activations are those of its own input
    (computed by a nested clean run when the pass enters block 0); the input must have the
    corrupted tokens' shape. The hooks are removed when the block ends, also after an
    exception; the block holds the model's lock (other threads' apexlens calls on this
    model wait for it).
    """
    bk = backend_for(model)
    if not isinstance(spec, (Paths, Circuit)):
        raise ApexlensError(
            f"patched() takes apexlens.Paths or apexlens.Circuit, got {type(spec).__name__}"
        )
    corrupted_tokens = check_tokens(bk, corrupted_tokens, "corrupted_tokens")
    with inference_mode(model):
        corrupted = cached_run(bk, corrupted_tokens)
        if isinstance(spec, Circuit):
            index = EdgeIndex(bk, uses_split_embed(spec.edges))
            keep = index.keep(spec.edges, corrupted_tokens.shape[1], dict(positions or {}))
            abl = ablation_for(
                bk, spec.ablation, corrupted, reference_tokens, corrupted_tokens.shape[1]
            )
            hooks = CircuitPlan(bk, index, keep).hooks(abl)
        else:
            senders = as_senders(parse_nodes(spec.senders, bk.dims))
            receivers = parse_nodes(spec.receivers, bk.dims)
            if spec.mlps not in ("live", "frozen"):
                raise ApexlensError(f"mlps must be 'live' or 'frozen', got {spec.mlps!r}")
            shape = tuple(corrupted_tokens.shape)

            def runs_for(resid0: Tensor) -> Runs:
                if tuple(resid0.shape[:2]) != shape:
                    raise ApexlensError(
                        f"inside apexlens.patched the input must have the corrupted tokens' shape "
                        f"{shape}, got {tuple(resid0.shape[:2])}"
                    )
                clean = run_from(bk, resid0, cache_names(bk))
                return Runs(bk, clean, corrupted, shape[0], shape[1], dict(positions or {}))

            named = dict(positions or {})
            hooks = paths.live_path_hooks(
                bk,
                runs_for,
                senders,
                receivers,
                spec.mlps,
                lambda n: position_mask(n, shape[0], shape[1], named, bk.device),
                (int(shape[0]), int(shape[1])),
            )
    with attached(model, hooks):
        yield model
