"""The feature engine: features read exactly (:mod:`~apexlens.engines.features.run`), their
upstream attribution (:mod:`~apexlens.engines.features.attribution`), feature
visualization's optimisation (:mod:`~apexlens.engines.features.optimise`), and the
manipulation check's evidence (:mod:`~apexlens.engines.features.evidence`) and statistics
(:mod:`~apexlens.engines.features.measures`)."""

from apexlens.engines.features.attribution import (
    Attribution,
    attribution,
    attribution_rows,
    components,
    resid_hook,
)
from apexlens.engines.features.evidence import Evidence, collect, top_contexts
from apexlens.engines.features.measures import MEASURES, peer_test, statistics
from apexlens.engines.features.optimise import Found, Plan, climb, optimise
from apexlens.engines.features.run import feature_grid, feature_rows, hook_shape, run_feature

__all__ = [
    "MEASURES",
    "Attribution",
    "Evidence",
    "attribution_rows",
    "climb",
    "collect",
    "feature_grid",
    "hook_shape",
    "peer_test",
    "statistics",
    "top_contexts",
    "Found",
    "Plan",
    "attribution",
    "components",
    "feature_rows",
    "optimise",
    "resid_hook",
    "run_feature",
]
