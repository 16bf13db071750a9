"""Sharding: one question's rows split across the processes of a ``torch.distributed`` group.

Opt-in, never automatic: inside ``with apexlens.sharded(): ...`` (every process of the group
enters it, e.g. under ``torchrun --nproc_per_node N``), every apexlens question splits its
rows -- senders, nodes, edges, hypotheses, (sigma, draw) pairs, restarts, or examples where a
question has one row -- across the ranks and gathers the per-row results back, so every rank
holds the answer one process would have computed. Outside such a block, a process group that
happens to exist changes nothing.

The mechanism is one class, :class:`Share`, used where rows are produced (the engines'
``row_chunks`` loops)::

    with Share("path patching", len(rows)) as share:
        for chunk in row_chunks(share.mine(rows), size, ...):
            share.put(chunk, compute(chunk))
    share.fill(out)                      # every rank's rows, in row order

Which rows a rank computes depends on the number of rows and the world size alone
(:meth:`Share.mine`: every ``world``-th row, so rows sorted by cost are dealt out evenly;
:meth:`Share.block`: a contiguous block, for examples). Each rank's rows run exactly as they
would in one process, in chunks of its own.

**Faults.** The exchange at the end of the block carries each rank's outcome: when any rank
raised (bad input on its rows, a metric error, out of memory), *every* rank raises one
:class:`~apexlens.errors.ApexlensError` naming the failing rank(s) and their message; hooks
are removed on every rank (the engines attach them with ``attached``). The exchange runs over
a gloo group created with the ``timeout`` of :func:`sharded`, so a rank that never arrives
(it died, or failed outside apexlens) makes the others raise after ``timeout`` seconds
instead of hanging. Results travel as CPU tensors over that group (they are small: per-row
metric values, scores, predictions); activations never travel.
"""

from __future__ import annotations

import contextvars
import functools
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch import Tensor

from apexlens.errors import ApexlensError

T = TypeVar("T")

DEFAULT_TIMEOUT = 1800.0
"""Seconds an exchange waits for the slowest rank (torch.distributed's own default)."""


@dataclass
class ShardPlan:
    """Where this process stands in a sharded block: its rank, the world size, the group
    and the gloo group apexlens exchanges results over (with the timeout)."""

    rank: int
    world: int
    group: Any
    control: Any
    timeout: float
    traffic: list[tuple[str, int]] = field(default_factory=list)
    """``(question, bytes this rank received)`` of every exchange so far (for benchmarks)."""


_PLAN: contextvars.ContextVar[ShardPlan | None] = contextvars.ContextVar(
    "apexlens_shard", default=None
)
_BUSY: contextvars.ContextVar[bool] = contextvars.ContextVar("apexlens_shard_busy", default=False)
_CONTROL: dict[tuple[Any, float], Any] = {}


def current() -> ShardPlan | None:
    """The shard this process works in (``None``: one process does everything, also inside
    a :class:`Share`'s block, where questions asked by the rows themselves run locally)."""
    return None if _BUSY.get() else _PLAN.get()


def plan() -> ShardPlan | None:
    """The innermost :func:`sharded` block's plan, whether or not a share is running."""
    return _PLAN.get()


def is_writer() -> bool:
    """Whether this process writes files and prints: always outside a shard, else rank 0."""
    p = _PLAN.get()
    return p is None or p.rank == 0


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_available():
        raise ApexlensError("this torch build has no torch.distributed: apexlens.sharded needs it")
    return dist


def _check_timeout(timeout: Any) -> float:
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ApexlensError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


@contextmanager
def sharded(group: Any = None, timeout: float | timedelta = DEFAULT_TIMEOUT) -> Iterator[ShardPlan]:
    """Split every apexlens question asked inside the block across the ranks of ``group``
    (default: the whole world) and gather the answers, so every rank holds the same result as
    one process would.

    Call it on every process, after ``torch.distributed.init_process_group`` (``torchrun``
    sets up the environment: ``init_process_group("gloo")`` on CPUs, ``"nccl"`` on GPUs).
    ``timeout``: seconds any exchange waits for the slowest rank before every rank raises an
    :class:`~apexlens.errors.ApexlensError` (no hang). Results are exchanged over a gloo
    group made here with that timeout (a collective: every process of the default group must
    enter the block).
    """
    dist = _dist()
    if not dist.is_initialized():
        raise ApexlensError(
            "apexlens.sharded() needs an initialised torch.distributed process group: launch "
            "with torchrun (e.g. `torchrun --nproc_per_node 2 script.py`) and call "
            "torch.distributed.init_process_group('gloo' or 'nccl') first"
        )
    seconds = _check_timeout(timeout)
    try:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    except (RuntimeError, ValueError) as err:
        raise ApexlensError(f"group is not a usable process group: {err}") from None
    if rank < 0:
        raise ApexlensError("this process is not a member of the group given to sharded()")
    key = (group, seconds)
    if key not in _CONTROL:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        _CONTROL[key] = dist.new_group(ranks, timeout=timedelta(seconds=seconds), backend="gloo")
    p = ShardPlan(rank, world, group, _CONTROL[key], seconds)
    token = _PLAN.set(p)
    try:
        yield p
    finally:
        _PLAN.reset(token)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE > 1``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def block_of(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous block of ``n`` items (sizes differ by at most one, the
    larger ones first: with fewer items than ranks, rank 0 -- the one showing progress --
    has one)."""
    return range(-(-n * rank // world), -(-n * (rank + 1) // world))


class Share:
    """One question's rows shared out among the ranks of the current shard, and the exchange
    that puts them back together (module docstring). Without a shard (or inside another
    share's block) this process does every row, exceptions pass through untouched, and
    :meth:`fill` / :meth:`sum` give the same tensors as writing them directly."""

    def __init__(self, desc: str, n_rows: int) -> None:
        self.desc, self.n_rows = desc, int(n_rows)
        self.plan = current()
        self._puts: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._adds: dict[str, list[Tensor]] = {}
        self._parts: list[dict[str, Any]] | None = None
        self._token: contextvars.Token[bool] | None = None

    # ------------------------------------------------------------------ this rank's rows
    @property
    def rank(self) -> int:
        return 0 if self.plan is None else self.plan.rank

    @property
    def world(self) -> int:
        return 1 if self.plan is None else self.plan.world

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th one, starting at its rank (all of them
        without a shard). Items sorted by cost are dealt out evenly."""
        return list(items[self.rank :: self.world])

    def block(self, n: int) -> range:
        """This rank's contiguous block of ``range(n)`` (all of it without a shard)."""
        return block_of(n, self.rank, self.world)

    def put(self, index: Sequence[int] | Tensor | range, values: Tensor, key: str = "") -> None:
        """Rows ``index`` (along the first axis) of the result ``key`` are ``values``."""
        idx = torch.as_tensor(list(index) if isinstance(index, range) else index, dtype=torch.long)
        self._puts.setdefault(key, []).append((idx.cpu(), values.detach()))

    def add(self, value: Tensor, key: str = "") -> None:
        """Add ``value`` to the result ``key``, a sum over every rank's contributions."""
        self._adds.setdefault(key, []).append(value.detach())

    # ------------------------------------------------------------------ the exchange
    def __enter__(self) -> Share:
        if self.plan is not None:
            self._token = _BUSY.set(True)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.plan is None:
            return  # one process: exceptions pass through as they are
        assert self._token is not None
        _BUSY.reset(self._token)
        mine: dict[str, Any] = {"n": self.n_rows}
        if err is None:
            mine["puts"] = {k: _packed(p) for k, p in self._puts.items()}
            mine["adds"] = {k: [v.cpu() for v in p] for k, p in self._adds.items()}
        self._parts = exchange(self.plan, self.desc, mine, err)

    # ------------------------------------------------------------------ results
    def _all_puts(self, key: str) -> list[tuple[Tensor, Tensor]]:
        if self._parts is None:
            return self._puts.get(key, [])
        return [pair for part in self._parts for pair in part["puts"].get(key, [])]

    def fill(self, out: Tensor, key: str = "") -> Tensor:
        """``out`` with every rank's rows of ``key`` written in (``out[index] = values``)."""
        for index, values in self._all_puts(key):
            out[index.to(out.device)] = values.to(device=out.device, dtype=out.dtype)
        return out

    def parts(self, key: str = "") -> list[tuple[Tensor, Tensor]]:
        """Every rank's ``(index, values)`` of ``key``, in rank order (values of any shape)."""
        return self._all_puts(key)

    def sum(self, key: str = "", device: torch.device | None = None) -> Tensor:
        """The sum of every :meth:`add` of ``key`` on every rank, in rank order."""
        if self._parts is None:
            values = self._adds.get(key, [])
        else:
            values = [v for part in self._parts for v in part["adds"].get(key, [])]
        if not values:
            raise ApexlensError(f"{self.desc}: no rank computed any row")
        total = values[0].to(device or values[0].device)
        for v in values[1:]:
            total = total + v.to(total.device)
        return total


# ============================================================================ the exchange
def _packed(puts: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """``puts`` as CPU tensors, consecutive ones of one row shape and dtype joined into one
    ``(index, values)``: the same rows, written in the same order, in a few tensors (pickling
    costs about 0.4 ms a tensor: 36 one-row puts took 30 ms to exchange, 3 ms joined)."""
    out: list[tuple[list[Tensor], list[Tensor]]] = []
    for index, values in puts:
        values = values.cpu()
        last = out[-1][1][-1] if out and out[-1][0][-1].dim() == 1 else None
        joins = index.dim() == 1 and values.dim() >= 1 and len(index) == len(values)
        if joins and last is not None and last.shape[1:] == values.shape[1:] and last.dtype == values.dtype:
            out[-1][0].append(index)
            out[-1][1].append(values)
        else:
            out.append(([index], [values]))
    return [(i[0], v[0]) if len(i) == 1 else (torch.cat(i), torch.cat(v)) for i, v in out]


def raised_on_every_rank(err: BaseException | None) -> bool:
    """Whether ``err`` came out of an exchange: every rank raised it alike (so one rank's
    report of it is enough)."""
    return bool(getattr(err, "apexlens_exchanged", False))


def _failure(message: str, cause: BaseException | None) -> ApexlensError:
    """An error every rank raises alike (marked so that no enclosing guard exchanges again)."""
    out = ApexlensError(message)
    out.apexlens_exchanged = True  # type: ignore[attr-defined]
    out.__cause__ = cause
    return out


def exchange(
    p: ShardPlan, desc: str, mine: dict[str, Any], err: BaseException | None
) -> list[dict[str, Any]]:
    """Every rank's payload ``mine`` (this rank's outcome: ``err``), over the shard's gloo
    group with its timeout. When any rank failed, every rank raises one ApexlensError naming
    the failing rank(s); an error that already went through an exchange passes through."""
    if raised_on_every_rank(err):
        assert err is not None
        raise err
    mine = dict(mine, desc=desc)
    if err is not None:
        mine = {"desc": desc, "n": mine.get("n"), "error": f"{type(err).__name__}: {err}"}
    dist = _dist()
    parts: list[Any] = [None] * p.world
    try:
        dist.all_gather_object(parts, mine, group=p.control)
    except RuntimeError as lost:  # torch.distributed's errors (timeouts, lost peers)
        first = (str(lost).strip().splitlines() or [""])[0]
        raise _failure(
            f"{desc}: rank {p.rank} of {p.world} got no answer from every other rank within "
            f"{p.timeout:g} s ({type(lost).__name__}: {first}). Another rank died, failed "
            "outside apexlens, or made different calls; its own output names the cause. "
            "(Raise the limit with apexlens.sharded(timeout=...).)",
            err or lost,
        ) from None
    p.traffic.append((desc, sum(len(pickle.dumps(x)) for r, x in enumerate(parts) if r != p.rank)))
    failed = [(r, x["error"]) for r, x in enumerate(parts) if "error" in x]
    where = parts[failed[0][0]]["desc"] if failed else desc  # the same message on every rank
    if failed:
        if err is not None and not isinstance(err, Exception):
            raise err  # KeyboardInterrupt and the like: the others know; re-raise it here
        names = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        which = ", ".join(str(r) for r, _ in failed)
        raise _failure(
            f"{where} failed on rank{'s' if len(failed) > 1 else ''} "
            f"{which} of {p.world} ({names})",
            err,
        )
    asked = sorted({(str(x["desc"]), str(x.get("n"))) for x in parts})
    if len(asked) > 1:
        raise _failure(
            f"the ranks made different calls at the same time: {asked}; inside "
            "apexlens.sharded() every rank must ask the same questions in the same order",
            None,
        )
    return parts


_GUARD: contextvars.ContextVar[bool] = contextvars.ContextVar("apexlens_guard", default=False)


class Guard:
    """One question on every rank: when one rank fails anywhere inside it (not only in a
    :class:`Share`), every rank raises the same ApexlensError at the end instead of waiting
    for it, and the ranks leave the question together. A no-op outside a shard, inside a
    share's rows and inside another guard."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.plan: ShardPlan | None = None
        self._token: contextvars.Token[bool] | None = None

    def __enter__(self) -> Guard:
        if current() is not None and not _GUARD.get():
            self.plan = current()
            self._token = _GUARD.set(True)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.plan is None:
            return
        assert self._token is not None
        _GUARD.reset(self._token)
        exchange(self.plan, self.desc, {"n": "done"}, err)


F = TypeVar("F", bound=Callable[..., Any])


def guarded(fn: F) -> F:
    """``fn`` run as one :class:`Guard`-ed question (see there)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with Guard(fn.__qualname__):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
