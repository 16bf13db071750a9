"""apexlens: exact, fast path patching and APEX activation-noise probing for TransformerLens.

Public API (one screen):

* graph      -- node vocabulary ``"embed"``, ``"9.9"``, ``"9.9.q"``, ``"m3"``, ``"logits"``
* patching   -- :func:`path_patch`, :func:`evaluate_circuit`, :func:`act_patch`, :func:`patched`
* noise      -- :func:`apex` (APEX sweeps), :func:`noise_hooks`
* scoring    -- :class:`LogitDiff`, :class:`LogitDiffRecovery`, :class:`KLDivergence`,
                :class:`AnswerProb`, :class:`Scores`
* models     -- :func:`load_model` (shipped toy models offline, or any TL pretrained name),
                :func:`to_bridge` (a HookedTransformer-format model as a TransformerBridge)
* tasks      -- :func:`get_task`, :class:`TaskBatch`
* plotting   -- plotly figures for every result
"""

from apexlens import graph, scoring
from apexlens.backend import ApexlensError
from apexlens.bridge import to_bridge
from apexlens.circuits import Circuit, CircuitResult, Paths, evaluate_circuit, patched
from apexlens.graph import Node, all_heads, all_mlps, full_graph, heads_of_layer, parse_node
from apexlens.models import list_models, load_model, model_info
from apexlens.noise import ApexResult, apex, compare, noise_hooks
from apexlens.patching import Experiment, PathPatchResult, act_patch, path_patch
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
from apexlens.tasks import get_task
from apexlens.tasks.base import Task, TaskBatch

__all__ = [
    "list_models",
    "load_model",
    "model_info",
    "get_task",
    "graph",
    "scoring",
    "Circuit",
    "CircuitResult",
    "Paths",
    "evaluate_circuit",
    "patched",
    "Node",
    "all_heads",
    "all_mlps",
    "full_graph",
    "heads_of_layer",
    "parse_node",
    "Experiment",
    "PathPatchResult",
    "act_patch",
    "path_patch",
    "AnswerLogProb",
    "AnswerProb",
    "KLDivergence",
    "LogitDiff",
    "LogitDiffRecovery",
    "Metric",
    "Scores",
    "scores_frame",
    "ApexlensError",
    "Task",
    "TaskBatch",
    "ApexResult",
    "apex",
    "compare",
    "noise_hooks",
    "to_bridge",
]
__version__ = "0.1.0"
