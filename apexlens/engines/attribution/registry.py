"""The attribution methods by name, with what the command line and reports say about them:
a table that imports nothing heavy (no torch), so ``apexlens discover --help`` lists the
methods without loading the engine. :data:`apexlens.engines.attribution.METHODS` is built
from it: one method, one row here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    """A method's name, whether its scores are the true effects, and where its class is."""

    name: str
    exact: bool
    """Whether the scores are the true effects (else an approximation: reports say so)."""
    summary: str
    cls: str
    """The class implementing it, in :mod:`apexlens.engines.attribution.methods`."""

    @property
    def kind(self) -> str:
        return "exact" if self.exact else "an approximation"


METHOD_INFO: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("eap-ig", False, "EAP with integrated gradients (Hanna et al. 2024)", "EAPIG"),
        MethodInfo("eap", False, "edge attribution patching (Syed et al. 2023)", "EAP"),
        MethodInfo("exact", True, "the true effect of ablating each edge alone", "Exact"),
    )
}
"""Attribution methods by name (the first is the default)."""
