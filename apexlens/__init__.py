"""apexlens: exact, fast path patching, circuits and APEX activation-noise probing for
TransformerLens.

The public API, one screen (layers, lowest first: ``errors`` -> ``model/`` -> ``vocab/`` ->
``scoring`` -> ``runs/`` -> ``engines/`` -> ``results/`` -> ``api/`` -> ``ui/``, ``toys/``):

* where      -- nodes ``"embed"``, ``"9.9"``, ``"9.9.q"``, ``"m3"``, ``"r5"``, ``"logits"``,
                positions ``"@-1"``, ``"@end"``, edges, noise sites, features
                (:mod:`apexlens.vocab`): :class:`Node`, :func:`parse_node`, :func:`full_graph`
* questions  -- :class:`Experiment` (one cached clean/corrupted pair, every question a method)
                and one-shot :func:`path_patch`, :func:`act_patch`, :func:`evaluate_circuit`,
                :func:`attribute_edges`, :func:`faithfulness`, :func:`discover`;
                :func:`patched` (any forward pass under :class:`Paths` or a :class:`Circuit`)
* probes     -- :func:`apex`, :func:`apex_bias`, :func:`escape_noise`, :func:`noise_hooks`
                (APEX noise); :func:`visualize`,
                :func:`top_examples`, :func:`fv_check`, :func:`feature_values` (features)
* answers    -- results with ``to_frame()`` / ``summary()`` / ``save()``; :func:`load_result`
* scoring    -- :class:`LogitDiff`, :class:`KLDivergence`, :class:`AnswerProb`, ... :class:`Scores`
* models     -- :func:`load_model` (shipped toy models offline, or any TL pretrained name),
                :func:`random_gpt2_small`, :func:`to_bridge`, :func:`get_task`, :func:`check`
* workbench  -- :func:`workbench`: test circuit hypotheses interactively (browser / notebook)
* figures    -- :mod:`apexlens.plotting`, :mod:`apexlens.plotting_discovery`,
                :mod:`apexlens.plotting_fv` (plotly), the HTML report, the command line
* scale      -- :func:`sharded` (every question split across ``torch.distributed`` ranks),
                :func:`estimate_memory` (a question's peak memory, before running it)
* errors     -- one type, :class:`ApexlensError`, whose message names the fix

``import apexlens`` is cheap: it imports neither torch nor TransformerLens. Each public
name is imported from its module the first time it is used (:data:`_PUBLIC`, PEP 562),
so ``apexlens --help`` answers at once; type checkers and editors read the imports
under ``TYPE_CHECKING`` below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from apexlens import _compat

if TYPE_CHECKING:
    from apexlens.api.apex import apex, apex_bias, escape_noise, noise_hooks
    from apexlens.api.check import CheckResult, check
    from apexlens.api.experiment import Experiment
    from apexlens.api.features import feature_values, fv_check, top_examples, visualize
    from apexlens.api.functions import (
        act_patch,
        attribute_edges,
        discover,
        evaluate_circuit,
        faithfulness,
        path_patch,
    )
    from apexlens.api.memory import estimate_memory
    from apexlens.api.patched import patched
    from apexlens.errors import ApexlensError
    from apexlens.model.convert import to_bridge
    from apexlens.results import (
        MIB_FRACTIONS,
        ActPatchResult,
        ApexBias,
        ApexResult,
        CircuitResult,
        DiscoveryResult,
        EdgeAudit,
        EdgeScores,
        EscapeComparison,
        EscapeNoise,
        FaithfulnessResult,
        FeatureVisualization,
        FVCheck,
        NaturalExamples,
        PathPatchResult,
        compare,
        edge_auc,
        load_result,
    )
    from apexlens.runs.shard import sharded
    from apexlens.scoring import (
        AnswerLogProb,
        AnswerProb,
        KLDivergence,
        LogitDiff,
        LogitDiffRecovery,
        Metric,
        Scores,
        scores_frame,
    )
    from apexlens.toys.models import list_models, load_model, model_info, random_gpt2_small
    from apexlens.toys.tasks import Task, TaskBatch, get_task
    from apexlens.ui.workbench import workbench
    from apexlens.vocab import (
        Circuit,
        Node,
        Paths,
        all_heads,
        all_mlps,
        full_graph,
        heads_of_layer,
        parse_feature,
        parse_node,
    )

_PUBLIC: dict[str, tuple[str, ...]] = {
    "apexlens.api.apex": ("apex", "apex_bias", "escape_noise", "noise_hooks"),
    "apexlens.api.check": ("CheckResult", "check"),
    "apexlens.api.experiment": ("Experiment",),
    "apexlens.api.features": ("feature_values", "fv_check", "top_examples", "visualize"),
    "apexlens.api.functions": (
        "act_patch", "attribute_edges", "discover", "evaluate_circuit", "faithfulness",
        "path_patch",
    ),
    "apexlens.api.memory": ("estimate_memory",),
    "apexlens.api.patched": ("patched",),
    "apexlens.errors": ("ApexlensError",),
    "apexlens.model.convert": ("to_bridge",),
    "apexlens.results": (
        "MIB_FRACTIONS", "ActPatchResult", "ApexBias", "ApexResult", "CircuitResult",
        "DiscoveryResult", "EdgeAudit", "EdgeScores", "EscapeComparison", "EscapeNoise",
        "FaithfulnessResult", "FeatureVisualization", "FVCheck",
        "NaturalExamples", "PathPatchResult", "compare", "edge_auc", "load_result",
    ),
    "apexlens.runs.shard": ("sharded",),
    "apexlens.scoring": (
        "AnswerLogProb", "AnswerProb", "KLDivergence", "LogitDiff", "LogitDiffRecovery",
        "Metric", "Scores", "scores_frame",
    ),
    "apexlens.toys.models": ("list_models", "load_model", "model_info", "random_gpt2_small"),
    "apexlens.toys.tasks": ("Task", "TaskBatch", "get_task"),
    "apexlens.ui.workbench": ("workbench",),
    "apexlens.vocab": (
        "Circuit", "Node", "Paths", "all_heads", "all_mlps", "full_graph", "heads_of_layer",
        "parse_feature", "parse_node",
    ),
}
"""Module -> the public names it holds (imported on first use)."""

_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

_compat.install()

__all__ = [
    "MIB_FRACTIONS",
    "ActPatchResult",
    "AnswerLogProb",
    "AnswerProb",
    "ApexBias",
    "ApexResult",
    "ApexlensError",
    "CheckResult",
    "Circuit",
    "CircuitResult",
    "DiscoveryResult",
    "EdgeAudit",
    "EdgeScores",
    "EscapeComparison",
    "EscapeNoise",
    "Experiment",
    "FVCheck",
    "FaithfulnessResult",
    "FeatureVisualization",
    "KLDivergence",
    "LogitDiff",
    "LogitDiffRecovery",
    "Metric",
    "NaturalExamples",
    "Node",
    "PathPatchResult",
    "Paths",
    "Scores",
    "Task",
    "TaskBatch",
    "act_patch",
    "all_heads",
    "all_mlps",
    "apex",
    "apex_bias",
    "attribute_edges",
    "check",
    "compare",
    "discover",
    "edge_auc",
    "escape_noise",
    "estimate_memory",
    "evaluate_circuit",
    "faithfulness",
    "feature_values",
    "full_graph",
    "fv_check",
    "get_task",
    "heads_of_layer",
    "list_models",
    "load_model",
    "load_result",
    "model_info",
    "noise_hooks",
    "parse_feature",
    "parse_node",
    "patched",
    "path_patch",
    "random_gpt2_small",
    "scores_frame",
    "sharded",
    "to_bridge",
    "top_examples",
    "visualize",
    "workbench",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (then cached here), or a
    submodule by its public name: ``apexlens.plotting``, ``apexlens.plotting_discovery``,
    ``apexlens.plotting_fv``, ``apexlens.graph`` (the vocabulary), ``apexlens.scoring``,
    ``apexlens.reference``, ``apexlens.tasks``..."""
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    if name in _compat.ALIASES or name in ("scoring", "reference"):
        return importlib.import_module(f"apexlens.{name}")
    raise AttributeError(f"module 'apexlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
