"""The workbench's edge names: every edge of a model spelled ``"SENDER->RECEIVER"`` in
apexlens' node names (``"0.1->1.3.k"``, ``"embed->logits"``, ``"0.1@end->1.3.k@end"``), and
the checks that turn what a user clicks, types or loads into such names.

:class:`EdgeNames` is built once per session from ``apexlens.full_graph`` (the *universe*,
in graph order) and the Experiment's named positions. It knows which edges can exist and
says why one cannot (it goes backwards, heads of one layer, no such head or MLP, positions
that differ between examples); everything else in the workbench takes its names from here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

import apexlens
from apexlens import ApexlensError

SEP = "->"


def edge_name(sender: str, receiver: str) -> str:
    return f"{sender}{SEP}{receiver}"


def split_edge(name: str) -> tuple[str, str]:
    s, _, r = name.partition(SEP)
    return s, r


def base(spelling: str) -> str:
    """A node's spelling without its positions: ``"0.1@end"`` -> ``"0.1"``."""
    return spelling.split("@", 1)[0]


def at(spelling: str) -> str | None:
    """A node's positions as spelled: ``"0.1@end"`` -> ``"end"`` (``None``: all)."""
    return spelling.split("@", 1)[1] if "@" in spelling else None


def owner(receiver: str) -> str:
    """The component a receiver belongs to: ``"1.3.k"`` -> ``"1.3"``."""
    parts = receiver.split(".")
    return ".".join(parts[:2]) if len(parts) == 3 else receiver


def at_scope(edge: str, scope: str) -> str:
    """An edge at named positions: ``"0.1->1.3.k"`` at ``"end"`` -> ``"0.1@end->1.3.k@end"``."""
    s, r = split_edge(edge)
    return edge_name(f"{s}@{scope}", f"{r}@{scope}")


def _spell(pos: Any) -> str:
    return pos if isinstance(pos, str) else ",".join(str(p) for p in pos)


class EdgeNames:
    """The edge universe of an Experiment's model and the checks of edge names (module
    docstring). ``position_names``: the named positions every example shares (an edge can
    be restricted to those); ``varying_positions``: the names that differ between examples."""

    def __init__(self, exp: apexlens.Experiment) -> None:
        self.n_pos = exp.n_pos
        pairs = [(str(s), str(r)) for s, r in apexlens.full_graph(exp.model)]
        self.universe: list[str] = [edge_name(s, r) for s, r in pairs]
        self.rank = {e: i for i, e in enumerate(self.universe)}
        self.senders: list[str] = list(dict.fromkeys(s for s, _ in pairs))
        heads = [apexlens.parse_node(s) for s in self.senders if s[0].isdigit()]
        self.n_layers = 1 + max((n.layer for n in heads), default=-1)
        self.n_heads = 1 + max((int(n.head or 0) for n in heads), default=-1)
        self.has_mlps = any(s.startswith("m") for s in self.senders)
        self.position_names: list[str] = []
        self.varying_positions: list[str] = []
        for name, value in exp.named_positions.items():
            v = torch.as_tensor(value)
            shared = v.ndim == 0 or (v.ndim == 1 and bool((v == v.flatten()[0]).all()))
            (self.position_names if shared else self.varying_positions).append(name)

    def sorted(self, edges: Iterable[str]) -> list[str]:
        """Edge names in graph order (an edge at positions next to the same edge at all)."""

        def key(e: str) -> tuple[int, str]:
            s, r = split_edge(e)
            return self.rank.get(edge_name(base(s), base(r)), len(self.rank)), e

        return sorted(edges, key=key)

    # ------------------------------------------------------------------ parsing
    def parse(self, text: str) -> list[str]:
        """Edge names from text: ``"0.1->1.3.k, embed->1.3.q"`` (commas, semicolons or new
        lines between edges). A receiver ``"1.3"`` means its q, k and v."""
        parts = [p.strip() for p in re.split(r"[,;\n]+", text) if p.strip()]
        if not parts:
            raise ApexlensError("no edge given: write SENDER->RECEIVER, e.g. 0.1->1.3.k")
        out: list[str] = []
        for p in parts:
            if SEP not in p:
                raise ApexlensError(
                    f"{p!r} is not an edge: write SENDER->RECEIVER, e.g. 0.1->1.3.k"
                )
            s, r = (x.strip() for x in p.split(SEP, 1))
            out += self.normalize(s, r)
        return out

    def normalize_all(self, edges: Iterable[Any]) -> list[str]:
        """Names of edges given as ``"S->R"`` text or ``(sender, receiver)`` pairs, checked."""
        out: list[str] = []
        for e in edges:
            if isinstance(e, str):
                out += self.parse(e)
                continue
            try:
                s, r = e
            except (TypeError, ValueError):
                raise ApexlensError(
                    f"an edge is a (sender, receiver) pair or 'S->R', got {e!r}"
                ) from None
            out += self.normalize(s, r)
        return out

    def normalize(self, sender: Any, receiver: Any) -> list[str]:
        """Check one ``(sender, receiver)`` pair against this model and spell it the way the
        workbench does (one name per receiver channel)."""
        text = f"{sender} -> {receiver}"
        try:
            s, r = apexlens.parse_node(sender), apexlens.parse_node(receiver)
        except ApexlensError as e:
            raise ApexlensError(f"edge {text}: {e}") from None
        self._check_roles(s, r, text)
        ps, pr = s.positions, r.positions
        if ps is not None and pr is not None and ps != pr:
            raise ApexlensError(
                f"edge {text} joins different positions: a sender's output at a position reaches "
                "a receiver only at the same position (write the edge at one position, e.g. "
                f"{s.name}@{_spell(pr)}->{r.name}@{_spell(pr)})"
            )
        pos = ps if ps is not None else pr
        where = "" if pos is None else "@" + self.check_positions(pos, text)
        channels = (
            [f"{r.name}.{c}" for c in "qkv"] if r.kind == "head" and r.channel is None else [r.name]
        )
        out = []
        for rn in channels:
            if edge_name(s.name, rn) not in self.rank:
                raise ApexlensError(f"edge {s.name} -> {rn} cannot exist: {self._why(s, rn)}")
            out.append(edge_name(s.name + where, rn + where))
        return out

    @staticmethod
    def _check_roles(s: Any, r: Any, text: str) -> None:
        if s.kind in ("tok_embed", "pos_embed") or r.kind in ("tok_embed", "pos_embed"):
            raise ApexlensError(
                f"edge {text}: the workbench uses 'embed' (tok_embed / pos_embed split edges are "
                "not supported here)"
            )
        if s.kind in ("logits", "resid") or (s.kind == "head" and s.channel is not None):
            raise ApexlensError(
                f"edge {text} cannot exist: {s.name} does not send (senders: embed, heads 'L.H', "
                "MLPs 'mL')"
            )
        if r.kind in ("embed", "resid"):
            raise ApexlensError(
                f"edge {text} cannot exist: {r.name} does not receive (receivers: 'L.H.q/k/v', "
                "'mL', 'logits')"
            )

    def check_positions(self, pos: Any, text: str) -> str:
        """Positions an edge can be restricted to, spelled (``"end"``, ``"3,4"``)."""
        if isinstance(pos, str):
            if pos in self.varying_positions:
                raise ApexlensError(
                    f"edge {text}: position {pos!r} differs between examples; an edge can only be "
                    "restricted to positions every example shares "
                    f"({', '.join(self.position_names) or 'none named'}, or numbers)"
                )
            if pos not in self.position_names:
                known = ", ".join(self.position_names) or "none were given"
                raise ApexlensError(f"edge {text}: unknown position name {pos!r} (known: {known})")
            return pos
        for p in pos:
            if not -self.n_pos <= int(p) < self.n_pos:
                raise ApexlensError(
                    f"edge {text}: position {p} is out of range for {self.n_pos} tokens"
                )
        return _spell(pos)

    def _why(self, s: Any, rn: str) -> str:
        r = apexlens.parse_node(rn)
        for node in (s, r):
            if node.kind == "head" and (
                node.layer >= self.n_layers or int(node.head or 0) >= self.n_heads
            ):
                return f"this model has {self.n_layers} layers of {self.n_heads} heads (no {node.name})"
            if node.kind == "mlp" and not self.has_mlps:
                return "this model has no MLPs"
            if node.kind == "mlp" and node.layer >= self.n_layers:
                return f"this model has {self.n_layers} layers (no {node.name})"
        if s.kind == "head" and r.kind == "head" and s.layer == r.layer:
            return "heads of the same layer do not read each other's outputs"
        return f"it goes backwards: {rn} reads the residual stream before {s.name} writes to it"

    # ------------------------------------------------------------------ nodes
    @staticmethod
    def touches(edge: str, node: str) -> bool:
        """Whether ``edge`` has ``node`` (a sender, a receiver port or a head through its
        q/k/v) at one end, positions ignored."""
        s, r = split_edge(edge)
        bs, br = base(s), base(r)
        return node in (bs, br, owner(br))

    def node_edges(self, node: str, where: str | None = None) -> list[str]:
        """Every edge of the universe touching ``node`` (a sender ``"0.1"``, a head as
        receiver through its q/k/v, a port ``"1.3.k"``, ``"m0"``, ``"embed"``, ``"logits"``),
        at positions ``where`` (``None``: all positions)."""
        name = apexlens.parse_node(node).name
        out = [e for e in self.universe if self.touches(e, name)]
        if not out:
            raise ApexlensError(f"node {node} has no edges in this model")
        return out if where is None else [at_scope(e, where) for e in out]
