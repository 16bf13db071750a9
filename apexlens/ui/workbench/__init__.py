"""The workbench: test circuit hypotheses interactively, with exact live re-evaluation.

``apexlens workbench MODEL`` serves it from the shell; in a notebook::

    session = apexlens.workbench(exp)        # an Experiment, a model name, or a model + task
    session.edges                            # the hypothesis on the page, from Python
    session.current.recovery                 # = exp.evaluate_circuit(...).recovery

Modules, plain Python first:

* :mod:`.session` -- :class:`Session`, the state the page shows, joining :mod:`.names` (the
  edge universe and the checks of edge names), :mod:`.state` (the hypothesis, undo/redo,
  history) and :mod:`.evaluation` (the exact numbers: ``Experiment.evaluate_keep``);
  :mod:`.formats` reads circuit files, :mod:`.engine` holds the only adapters to apexlens
  internals;
* the page (Dash): :mod:`.app` (the app and its server), :mod:`.page` (the layout),
  :mod:`.callbacks` (one registering function per panel) over :mod:`.actions` (every change
  of the hypothesis, as a table), :mod:`.render` (numbers, history, comparison),
  :mod:`.view` (the clickable circuit view), :mod:`.figures` (plotly figures and the HTML
  snapshot), :mod:`.style`;
* ``apexlens workbench`` is :mod:`apexlens.ui.cli.workbench`.

Dash is an optional dependency: ``pip install "apexlens[workbench]"``.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apexlens.errors import ApexlensError

if TYPE_CHECKING:
    from apexlens.ui.workbench.session import Entry, Session

__all__ = ["Entry", "Session", "workbench"]


def __getattr__(name: str) -> Any:  # Session / Entry without importing torch at `import apexlens`
    if name in ("Session", "Entry"):
        from apexlens.ui.workbench import session

        return getattr(session, name)
    raise AttributeError(name)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()  # type: ignore[attr-defined]
    return ip is not None and hasattr(ip, "kernel")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def loopback_warning(host: str) -> str | None:
    """The warning printed when serving on an address other than loopback."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"warning: serving the workbench on {host}: anyone who can reach this address can use "
        "the page and run the model (there is no authentication); use 127.0.0.1 unless you "
        "mean it"
    )


def workbench(
    source: Any,
    *,
    task: Any = None,
    n: int = 32,
    seed: int = 0,
    circuit: str | Path | None = None,
    ablation: str = "resample",
    start: str | Iterable[Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    mode: str = "auto",
    height: int = 1000,
) -> Session:
    """Open the workbench on ``source`` and return its :class:`Session` (read the current
    hypothesis from Python: ``session.edges``, ``session.current``).

    Args:
        source: an :class:`apexlens.Experiment` (its data and metric), a :class:`Session`,
            a model name (``"induction-2l"``: loaded, its own task by default) or a model
            (then give ``task``).
        task, n, seed: with a model, the data is ``get_task(task).batch(n, seed=seed)``
            and the metric its logit difference.
        circuit: a circuit JSON file to start from (apexlens or EAP-IG/MIB format).
        ablation: what edges outside the hypothesis carry (``"resample"``, ``"mean"``, ``"zero"``).
        host, port: where to serve (``port=0``: a free port). Loopback unless you say
            otherwise (a warning is printed then).
        mode: ``"auto"`` (inline in a notebook -- Jupyter, JupyterLab, VS Code -- else a
            background server whose URL is printed), ``"inline"``, ``"tab"`` (open a
            browser tab), ``"server"`` (background server only).
    """
    import apexlens
    from apexlens.ui.workbench.app import make_app, require_dash, serve
    from apexlens.ui.workbench.session import Session

    require_dash()
    if mode not in ("auto", "inline", "tab", "server"):
        raise ApexlensError(f"mode must be auto, inline, tab or server, got {mode!r}")
    if isinstance(source, Session):
        session = source
    elif isinstance(source, apexlens.Experiment):
        session = Session(source, ablation=ablation, start=start)
    else:
        title = ""
        if isinstance(source, str):
            name = source
            if task is None and name in apexlens.list_models():
                task = apexlens.model_info(name)["task"]
            source = apexlens.load_model(name)
            title = name
        if task is None:
            raise ApexlensError("give task= (e.g. 'induction') with a model, or pass an Experiment")
        task_obj = apexlens.get_task(task) if isinstance(task, str) else task
        title = f"{title or type(source).__name__} · {task_obj.name} task"
        session = Session.for_model(
            source, task_obj, n=n, seed=seed, ablation=ablation, start=start, title=title
        )
    if circuit is not None:
        path = Path(circuit)
        session.load_json(path.read_bytes(), path.name)
    warning = loopback_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    inline = mode == "inline" or (mode == "auto" and _in_notebook())
    if inline:
        app = make_app(session)
        port = port or _free_port(host)
        app.run(
            jupyter_mode="inline",
            jupyter_height=height,
            host=host,
            port=port,
            debug=False,
            use_reloader=False,
        )
        session.app = app  # type: ignore[attr-defined]
        return session
    server = serve(session, host=host, port=port, open_browser=mode == "tab")
    print(f"apexlens workbench: {server.url}  (session.server.stop() stops it)")
    return session
