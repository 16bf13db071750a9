"""``apexlens workbench MODEL``: serve the workbench page and print its URL."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

from apexlens.errors import ApexlensError
from apexlens.ui.cli.common import model_and_task


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "workbench",
        help="test circuit hypotheses interactively in the browser (exact live re-evaluation)",
        description="Serve the workbench on 127.0.0.1 and print its URL. The data is "
        "get_task(TASK).batch(N, seed=SEED), the metric its logit difference -- the batch a "
        "script gets. Reads no file but the --circuit you name.",
    )
    p.add_argument(
        "model",
        help="a shipped toy model (see `apexlens models`) or a TransformerLens name, e.g. gpt2",
    )
    p.add_argument("--task", help="task name (default: the toy model's own task)")
    p.add_argument("--n", type=int, default=32, help="number of prompts (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (default 0)")
    p.add_argument(
        "--backend",
        choices=["hooked", "bridge"],
        default=None,
        help="model class (default: HookedTransformer where TransformerLens has it)",
    )
    p.add_argument(
        "--ablation",
        choices=["resample", "mean", "zero"],
        default="resample",
        help="what an edge outside the hypothesis carries (default resample: the corrupted "
        "run's value)",
    )
    p.add_argument(
        "--circuit",
        help="start from this circuit JSON (apexlens or EAP-IG/MIB; default: the full graph)",
    )
    p.add_argument("--port", type=int, default=8050, help="port (default 8050; 0: any free one)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; another address prints a warning: the page "
        "has no authentication)",
    )
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab (default: open one)")


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("dash") is None:
        raise ApexlensError('the workbench needs Dash: pip install "apexlens[workbench]"')
    from apexlens.ui.workbench import loopback_warning
    from apexlens.ui.workbench.app import serve
    from apexlens.ui.workbench.session import Session

    if args.n < 1:
        raise ApexlensError("--n must be at least 1")
    if not 0 <= args.port < 65536:
        raise ApexlensError(f"--port must be in 0..65535, got {args.port}")
    circuit_text = None
    if args.circuit:
        try:
            circuit_text = Path(args.circuit).read_bytes()
        except OSError as e:
            raise ApexlensError(f"--circuit {args.circuit}: {e.strerror or e}") from None
    warning = loopback_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    model, task = model_and_task(args)
    session = Session.for_model(
        model,
        task,
        n=args.n,
        seed=args.seed,
        ablation=args.ablation,
        title=f"{args.model} · {task.name} task (n={args.n}, seed={args.seed})",
    )
    if circuit_text is not None:
        session.load_json(circuit_text, Path(args.circuit).name)
    server = serve(session, host=args.host, port=args.port, open_browser=not args.no_browser)
    print(f"apexlens workbench: {server.url}", flush=True)
    print("press Ctrl+C to stop", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
