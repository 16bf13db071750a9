"""The edge-attribution engine: one score per edge and example, by a method from
:data:`METHODS`.

:data:`METHODS` is the one registry the API (:func:`apexlens.attribute_edges`), the command
line (``--method``) and validation all read: a new method is one class (the
:class:`~apexlens.engines.attribution.base.Method` protocol, in a file of its own) and one
line here.
"""

from apexlens.engines.attribution.base import Job, Method
from apexlens.engines.attribution.methods import EAP, EAPIG, Exact

METHODS: dict[str, Method] = {"eap-ig": EAPIG(), "eap": EAP(), "exact": Exact()}
"""Attribution methods by name (the first is the default)."""

__all__ = ["METHODS", "Job", "Method"]
