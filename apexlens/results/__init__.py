"""What the questions answer: one result type per kind of question, one convention.

Every result has

* ``to_frame()`` -- a pandas DataFrame with one row per unit of the result (a sender or
  node of a patching sweep, a circuit, a noise level), every column defined in the class
  docstring;
* ``summary()`` -- the headline columns of the same rows, also a DataFrame;
* the per-example values behind every mean (``per_example``, ``scores``), so any other
  statistic can be computed;
* ``save(path)`` / ``Type.load(path)`` (:mod:`~apexlens.results.io`: JSON + safetensors).

=======================  ==================================================================
:class:`PathPatchResult` path patching, one row per sender: 0 = no effect, -1 = the whole
                         clean-corrupted difference flows along the paths
:class:`ActPatchResult`  activation patching (clean into corrupted), one row per node:
                         0 = nothing restored, 1 = the clean behaviour fully restored
:class:`CircuitResult`   a circuit hypothesis: metric, recovery, proportion explained
:class:`ApexResult`      an APEX noise sweep, one row per noise level
:class:`ApexBias`        the bias decision drawn from a sweep: flagged, token, p-value
:class:`EscapeNoise`     per-sample escape noise with intervals; :class:`EscapeComparison`
:class:`EdgeScores`      one score per edge (exact, EAP, EAP-IG); :class:`EdgeAudit`
:class:`FaithfulnessResult`, :class:`DiscoveryResult`  MIB curves, circuits found
:class:`FeatureVisualization`, :class:`NaturalExamples`, :class:`FVCheck`  features
=======================  ==================================================================
"""

from apexlens.results.apex import ApexBias, ApexResult, compare
from apexlens.results.circuits import CircuitResult
from apexlens.results.discovery import (
    MIB_FRACTIONS,
    DiscoveryResult,
    EdgeAudit,
    EdgeScores,
    FaithfulnessResult,
    edge_auc,
)
from apexlens.results.escape import EscapeComparison, EscapeNoise
from apexlens.results.features import FeatureVisualization, FVCheck, NaturalExamples
from apexlens.results.io import load_result, provenance, result_types
from apexlens.results.labels import TokenLabels, labels_of
from apexlens.results.patching import ActPatchResult, PathPatchResult
from apexlens.results.stats import spearman

__all__ = [
    "MIB_FRACTIONS",
    "ActPatchResult",
    "ApexBias",
    "ApexResult",
    "CircuitResult",
    "DiscoveryResult",
    "EdgeAudit",
    "EdgeScores",
    "EscapeComparison",
    "EscapeNoise",
    "FVCheck",
    "FaithfulnessResult",
    "FeatureVisualization",
    "NaturalExamples",
    "PathPatchResult",
    "TokenLabels",
    "compare",
    "edge_auc",
    "labels_of",
    "load_result",
    "provenance",
    "result_types",
    "spearman",
]
