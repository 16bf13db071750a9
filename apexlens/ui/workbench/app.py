"""The Dash app over a :class:`~apexlens.ui.workbench.session.Session`, and its server.

Dash (Plotly's framework) serves the page: it runs inline in Jupyter, VS Code and
JupyterLab, reuses apexlens' plotly figures as they are, and needs no JavaScript build. The
page's layout is :mod:`.page`, its callbacks :mod:`.callbacks` (one registering function per
panel), its look :mod:`.style`.

The server is werkzeug's, started by :func:`serve` (bound to 127.0.0.1 unless told
otherwise), never Flask's debugger or reloader (the debugger executes code).
"""

from __future__ import annotations

import logging
import threading
import webbrowser
from typing import Any

from apexlens import ApexlensError
from apexlens.ui.workbench.session import Session


def require_dash() -> Any:
    """Dash, or one error naming the extra to install."""
    try:
        import dash
    except ImportError:
        raise ApexlensError('the workbench needs Dash: pip install "apexlens[workbench]"') from None
    return dash


def make_app(session: Session) -> Any:
    """The Dash app over ``session`` (not started: see :func:`serve`)."""
    dash = require_dash()
    from apexlens.ui.workbench import callbacks
    from apexlens.ui.workbench.page import page
    from apexlens.ui.workbench.style import INDEX

    app = dash.Dash(
        __name__,
        title=f"apexlens workbench: {session.title}",
        update_title=None,
        serve_locally=True,
        suppress_callback_exceptions=True,
        assets_ignore=".*",
    )
    app.index_string = INDEX
    app.layout = lambda: page(session)  # re-rendered on every page load
    for register in (
        callbacks.register_changes,
        callbacks.register_circuit,
        callbacks.register_history,
        callbacks.register_paths,
        callbacks.register_export,
    ):
        register(app, session)
    return app


class Server:
    """A running workbench: ``.url``, ``.stop()``."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        from werkzeug.serving import make_server

        self.app = app
        self._srv = make_server(host, port, app.server, threaded=True)
        self.host, self.port = host, int(self._srv.server_port)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/"
        self._thread = threading.Thread(
            target=self._srv.serve_forever, name="apexlens-workbench", daemon=True
        )

    def start(self) -> Server:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._srv.serve_forever()

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()


def serve(
    session: Session,
    *,
    host: str = "127.0.0.1",
    port: int = 8050,
    open_browser: bool = False,
    background: bool = True,
    quiet: bool = True,
) -> Server:
    """Serve the workbench with werkzeug (no debugger, no reloader). ``port=0`` picks a
    free port. ``background``: in a daemon thread (returns at once); else blocks.
    ``quiet``: no line per request (errors are still logged)."""
    if quiet:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = make_app(session)
    try:
        server = Server(app, host, port)
    except OSError as e:
        raise ApexlensError(
            f"cannot serve on {host}:{port} ({e.strerror or e}); pick another --port (0: any free one)"
        ) from None
    session.server = server  # type: ignore[attr-defined]
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(server.url,)).start()
    if background:
        return server.start()
    server.serve_forever()
    return server
