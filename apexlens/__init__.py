"""apexlens: exact, fast path patching and APEX activation-noise probing for TransformerLens.

Public API (one screen):

* where      -- node vocabulary ``"embed"``, ``"9.9"``, ``"9.9.q"``, ``"m3"``, ``"r5"``,
                ``"logits"`` (:mod:`apexlens.graph`), also the APEX noise sites
* questions  -- :func:`path_patch`, :func:`act_patch`, :func:`evaluate_circuit`,
                :class:`Experiment` (many questions on one cached clean/corrupted pair),
                :func:`patched` (any forward pass under :class:`Paths` or a :class:`Circuit`),
                :func:`apex` (APEX noise sweeps), :func:`noise_hooks`
* answers    -- :class:`PathPatchResult`, :class:`ActPatchResult`, :class:`CircuitResult`,
                :class:`ApexResult`: ``to_frame()`` / ``summary()`` DataFrames
* scoring    -- :class:`LogitDiff`, :class:`LogitDiffRecovery`, :class:`KLDivergence`,
                :class:`AnswerProb`, :class:`AnswerLogProb`, :class:`Scores`
* models     -- :func:`load_model` (shipped toy models offline, or any TL pretrained name),
                :func:`random_gpt2_small`, :func:`to_bridge`; tasks: :func:`get_task`
* plotting   -- plotly figures for every result (:mod:`apexlens.plotting`)
* self-check -- :func:`check` (does apexlens compute this model exactly? ``.ok``)
* discovery  -- :func:`attribute_edges` (exact / EAP / EAP-IG edge scores, :class:`EdgeScores`),
                :func:`faithfulness` (MIB curve, CPR, CMD), :func:`edge_auc`, :func:`discover`
                (greedy exact pruning, :class:`DiscoveryResult`)
* features   -- :func:`visualize` (feature visualization of a neuron, head, direction, logit),
                :func:`top_examples` (natural top-activating inputs), :func:`fv_check` (is the
                visualization manipulated? :class:`FVCheck`), :func:`feature_values`
* errors     -- one type, :class:`ApexlensError`, whose message names the fix
* workbench  -- :func:`workbench`: test circuit hypotheses interactively (browser / notebook)
"""

from apexlens import graph, scoring
from apexlens.bridge import to_bridge
from apexlens.check import CheckResult, check
from apexlens.discovery import attribute_edges, discover, faithfulness
from apexlens.errors import ApexlensError
from apexlens.experiment import (
    Circuit,
    Experiment,
    Paths,
    act_patch,
    evaluate_circuit,
    patched,
    path_patch,
)
from apexlens.features import feature_values, parse_feature
from apexlens.graph import Node, all_heads, all_mlps, full_graph, heads_of_layer, parse_node
from apexlens.models import list_models, load_model, model_info, random_gpt2_small
from apexlens.noise import apex, noise_hooks
from apexlens.results import (
    MIB_FRACTIONS,
    ActPatchResult,
    ApexResult,
    CircuitResult,
    DiscoveryResult,
    EdgeAudit,
    EdgeScores,
    FaithfulnessResult,
    FeatureVisualization,
    FVCheck,
    NaturalExamples,
    PathPatchResult,
    compare,
    edge_auc,
)
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
from apexlens.ui.workbench import workbench
from apexlens.visualize import fv_check, top_examples, visualize

__all__ = [
    "list_models",
    "load_model",
    "model_info",
    "random_gpt2_small",
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
    "ActPatchResult",
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
    "check",
    "CheckResult",
    "attribute_edges",
    "discover",
    "faithfulness",
    "edge_auc",
    "EdgeScores",
    "EdgeAudit",
    "FaithfulnessResult",
    "DiscoveryResult",
    "MIB_FRACTIONS",
    "visualize",
    "top_examples",
    "fv_check",
    "feature_values",
    "parse_feature",
    "FeatureVisualization",
    "NaturalExamples",
    "FVCheck",
    "workbench",
]
__version__ = "0.1.0"
