"""The feature engine: features read exactly (:mod:`~apexlens.engines.features.run`), their
upstream attribution (:mod:`~apexlens.engines.features.attribution`), and feature
visualization's optimisation (:mod:`~apexlens.engines.features.optimise`)."""

from apexlens.engines.features.attribution import Attribution, attribution, components, resid_hook
from apexlens.engines.features.optimise import Found, Plan, optimise
from apexlens.engines.features.run import feature_rows, run_feature

__all__ = [
    "Attribution",
    "Found",
    "Plan",
    "attribution",
    "components",
    "feature_rows",
    "optimise",
    "resid_hook",
    "run_feature",
]
