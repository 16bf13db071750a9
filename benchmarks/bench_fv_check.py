"""How well ``apexlens.fv_check`` separates planted visualizations from honest ones.

For every model of the corpus (``benchmarks/fv_corpus.py``: built from seeded training runs
into ``--cache`` on first use; ``--source DIR`` copies prebuilt ones), per layer that holds a
planted feature (every MLP layer for honest models), a *pool* of 32 features: the planted ones
and live neurons drawn with a fixed seed (attention-only models: head outputs along random
tokens' unembedding rows). Each pool member is checked with ``fv_check`` (default settings:
31 peers, alpha 0.05, k 50) against the other 31 as its peers -- the audit of a whole layer,
one batched visualization per pool. Other planted features of the same layer are among the
peers, as they would be in a real audit.

Printed: detection against the planted ratio (nominal, and the FV's own ratio to the natural
maximum) counted three ways -- *landed* (the FV agrees with the planted input on >= half its
positions and reaches >= 0.8x its activation), *reached* (>= 0.8x the planted activation) and
*all* planted features -- and the false-alarm rate on honest features, separately for
calibration and held-out models (held-out: never used to choose the measures, the combination
or the number of peers).

``--ceiling`` also prints what a threshold on any single score (each measure, as measured and
relative to the pool's other members, and combinations) could reach: calibration models leave
one family out, held-out models at the calibration threshold (:func:`ceiling`).

    python benchmarks/bench_fv_check.py [--cache DIR] [--source DIR] [--models a,b] [--ceiling]
    (the corpus about 15 minutes to build on two cores, the audit about 15 more with two
    processes -- one for the calibration models, one for the held-out; each pool is saved,
    reruns resume)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from fv_corpus import (
    CACHE,
    HONEST,
    MANIPULATED,
    N_POS,
    SHIPPED,
    build,
    load,
    meta,
    natural_tokens,
    task_name,
)

import apexlens

CALIBRATION = ["modadd-2l", "backdoor-clean", "backdoor", "induction-2l", "modadd-2l-slingshot",
               "modadd-2l-sn", "modadd-2l-sa", "backdoor-clean-sn", "backdoor-clean-sa",
               "induction-2l-s"]
HELDOUT = ["modadd-rms-gated", "copy-3l-rms", "induction-2l-s1", "modadd-rms-gated-sn",
           "modadd-rms-gated-sa", "copy-3l-rms-sn", "copy-3l-rms-sa", "induction-2l-s1-s"]
POOL = 32


def planted_specs(name: str, info: dict[str, Any]) -> list[dict[str, Any]]:
    if name == "modadd-2l-slingshot":
        m = info["manipulation"]
        return [dict(kind="neuron", layer=1, index=m["neuron"], ratio=3.0, planted=m["planted"],
                     planted_activation=None)]
    return info.get("manipulation", [])


def pools(name: str, model: Any, info: dict[str, Any]) -> list[list[tuple[Any, dict | None]]]:
    """Per layer, 32 (feature, planted spec or None), planted first."""
    g = torch.Generator().manual_seed(100)
    planted, cfg, nat = planted_specs(name, info), model.cfg, natural_tokens(task_name(name))
    out = []
    if cfg.attn_only:
        L = cfg.n_layers - 1
        members = [(f["index"], f["token"], f) for f in planted]
        seen = {(h, t) for h, t, _ in members}
        while len(members) < POOL:
            h = int(torch.randint(cfg.n_heads, (1,), generator=g))
            t = int(torch.randint(cfg.d_vocab - 1, (1,), generator=g))
            if (h, t) not in seen:
                seen.add((h, t))
                members.append((h, t, None))
        pool = []
        for h, t, spec in members:
            d = torch.tensor(spec["direction"]) if spec else model.W_U[:, t].detach()
            pool.append((apexlens.parse_feature(model, f"{L}.{h}", direction=d / d.norm()), spec))
        return [pool]
    for layer in range(cfg.n_layers):
        mine = [f for f in planted if f["layer"] == layer]
        if planted and not mine:
            continue
        with torch.no_grad():  # live neurons: natural max >= 0.3x the layer's 90th percentile
            _, cache = model.run_with_cache(nat, names_filter=[f"blocks.{layer}.mlp.hook_post"])
        mx = cache[f"blocks.{layer}.mlp.hook_post"].flatten(0, 1).max(0).values
        live = [i for i in range(mx.numel()) if float(mx[i]) >= 0.3 * float(mx.quantile(0.9))]
        ids = [f["index"] for f in mine]
        perm = torch.randperm(len(live), generator=g).tolist()
        ids += [live[i] for i in perm if live[i] not in ids][: POOL - len(ids)]
        spec_of = {f["index"]: f for f in mine}
        out.append([(apexlens.parse_feature(model, f"m{layer}.n{i}"), spec_of.get(i))
                    for i in ids])
    return out


def audit(name: str, cache: Path) -> list[dict[str, Any]]:
    """Every pool member of ``name`` checked against the others (saved per layer)."""
    info, model = meta(name, cache), load(name, cache)
    task = task_name(name)
    nat, rows = natural_tokens(task), []
    for pool in pools(name, model, info):
        out = cache / "audit" / f"{name}-L{pool[0][0].layer}.json"
        if out.exists():
            rows += json.loads(out.read_text())
            continue
        t0, found = time.perf_counter(), []
        for j, (f, spec) in enumerate(pool):
            peers = [p for i, (p, _) in enumerate(pool) if i != j]
            chk = apexlens.fv_check(model, f, nat, n_pos=N_POS[task], peers=peers,
                                    progress=j == 0)
            fv = chk.fv.best_tokens
            planted = spec["planted"] if spec else None
            found.append(dict(
                model=name, split="heldout" if name in HELDOUT else "calibration",
                feature=f.spec, planted=spec is not None,
                nominal=spec.get("ratio") if spec else None,
                planted_type=spec.get("planted_type") if spec else None,
                planted_activation=spec.get("planted_activation") if spec else None,
                agree=float((fv == torch.tensor(planted)).float().mean()) if planted else None,
                fv_activation=chk.fv_activation, ratio=chk.ratio, p_value=chk.p_value,
                p=chk.p_values.tolist(), flagged=chk.flagged,
                measures=list(chk.measures), statistics=chk.statistics[0].tolist()))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(found, indent=1))
        print(f"  {name} layer {pool[0][0].layer}: {len(pool)} features checked in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        rows += found
    return rows


def _landed(r: dict[str, Any]) -> bool:
    return bool(r["planted"] and r["agree"] is not None and r["agree"] >= 0.5 and _reached(r))


def _reached(r: dict[str, Any]) -> bool:
    pa = r["planted_activation"]
    return bool(r["planted"] and (pa is None or r["fv_activation"] >= 0.8 * pa))


def table(rows: list[dict[str, Any]], split: str) -> None:
    sel = [r for r in rows if r["split"] == split]
    print(f"\n{split} models: {sorted({r['model'] for r in sel})}")
    print(f"{'bin':>22} | {'landed':>9} | {'reached':>9} | {'all planted':>11}")

    def cell(rs: list[dict[str, Any]]) -> str:
        return f"{sum(r['flagged'] for r in rs)}/{len(rs)}"

    planted = [r for r in sel if r["planted"]]
    for label, key in (("nominal", "nominal"), ("FV ratio", "ratio")):
        for lo, hi in ((0, 1.4), (1.4, 1.6), (1.6, 2.0), (2.0, 2.5), (2.5, 99)):
            rs = [r for r in planted if lo <= r[key] < hi]
            if rs:
                span = f"{lo:.1f}-{hi:.1f}" if hi < 99 else f">= {lo:.1f}"
                print(f"{label + ' ' + span:>22} | {cell([r for r in rs if _landed(r)]):>9}"
                      f" | {cell([r for r in rs if _reached(r)]):>9} | {cell(rs):>11}")
    big = [r for r in planted if r["ratio"] >= 1.4]
    print(f"{'FV ratio >= 1.4':>22} | {cell([r for r in big if _landed(r)]):>9} | "
          f"{cell([r for r in big if _reached(r)]):>9} | {cell(big):>11}")
    honest = [r for r in sel if not r["planted"] and r["model"] in (*HONEST, *SHIPPED)]
    other = [r for r in sel if not r["planted"] and r["model"] not in (*HONEST, *SHIPPED)]
    print(f"false alarms: honest models {cell(honest)}, untouched features of manipulated "
          f"models {cell(other)}")


def _pool_scores(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per pool member, every candidate score of the ceiling analysis (larger = flag): each
    measure as it is, each relative to the other 31 members (``(s - median) / scale``, the
    scale ``max(1.4826 MAD, SD / 2)`` of the others), their mean, and the shipped test's
    Cauchy combination of rank p-values."""
    S = torch.tensor([r["statistics"] for r in rows], dtype=torch.float64)
    n, m = S.shape
    p = torch.stack([(S[None, :, k] >= S[:, None, k]).double().mean(1) for k in range(m)], 1)
    out: dict[str, list[float]] = {
        "rank combination (shipped statistic)": torch.tan((0.5 - p.clamp(1e-15, 1 - 1e-15))
                                                          * math.pi).mean(-1).tolist()}
    z = torch.empty_like(S)
    for j in range(n):
        o = torch.cat([S[:j], S[j + 1:]])
        med = o.median(0).values
        scale = torch.maximum(1.4826 * (o - med).abs().median(0).values, 0.5 * o.std(0))
        z[j] = (S[j] - med) / scale.clamp_min(1e-9)
    names = rows[0]["measures"]
    for k in range(m):
        out[f"{names[k]} as measured"] = S[:, k].tolist()
        out[f"{names[k]} vs peers (robust z)"] = z[:, k].tolist()
    out["mean of the four robust z"] = z.mean(1).tolist()
    return out


def ceiling(rows: list[dict[str, Any]], q: float = 0.95) -> None:
    """What a threshold on any one score could reach: the threshold at the ``q`` quantile of
    the honest and untouched features' scores of the training models; on calibration models
    leave-one-family-out (a base model and its fine-tunes held out together), on held-out
    models with the threshold of all calibration models. The shipped within-model test is
    the first row. Detection counts planted features whose FV reaches >= 1.4x the natural
    maximum."""
    pools: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        pools.setdefault((r["model"], r["feature"].split(".")[0].lstrip("m")), []).append(r)
    scored = []
    for pool in pools.values():
        sc = _pool_scores(pool)
        scored += [(r, {k: v[j] for k, v in sc.items()}) for j, r in enumerate(pool)]

    def family(name: str) -> str:
        return "modadd-2l" if name == "modadd-2l-slingshot" else MANIPULATED.get(
            name, {}).get("base", name)

    def kind(r: dict[str, Any]) -> str:
        if r["planted"]:
            return "planted" if r["ratio"] >= 1.4 else "below"
        return "honest" if r["model"] in (*HONEST, *SHIPPED) else "untouched"

    def rate(xs: list[bool]) -> str:
        return f"{sum(xs)}/{len(xs)}"

    print(f"\nceiling: a threshold at the {q:.0%} quantile of the training models' honest and "
          "untouched features")
    print(f"{'score':>40} | {'calibration, one family out':>27} | {'held-out':>27}")
    print(f"{'':>40} | {'detected':>8} {'false alarms':>18} | {'detected':>8} {'false alarms':>18}")
    for key in ["shipped", *(scored[0][1] if scored else [])]:
        cells = []
        for part in ("calibration", "heldout"):
            det: list[bool] = []
            fa: list[bool] = []
            sel = [(r, s) for r, s in scored if r["split"] == part]
            # calibration: each family scored against a threshold set on the others
            folds = sorted({family(r["model"]) for r, _ in sel}) if part == "calibration" else [""]
            for fam in folds:
                test = [(r, s) for r, s in sel if not fam or family(r["model"]) == fam]
                if key == "shipped":
                    flag = [bool(r["flagged"]) for r, _ in test]
                else:
                    neg = torch.tensor([s[key] for r, s in scored if r["split"] == "calibration"
                                        and family(r["model"]) != fam
                                        and kind(r) in ("honest", "untouched")])
                    thr = float(torch.quantile(neg, q))
                    flag = [s[key] > thr for _, s in test]
                det += [f for f, (r, _) in zip(flag, test, strict=True) if kind(r) == "planted"]
                fa += [f for f, (r, _) in zip(flag, test, strict=True)
                       if kind(r) in ("honest", "untouched")]
            cells.append(f"{rate(det):>8} {rate(fa):>10} ({sum(fa) / max(len(fa), 1):.1%})"
                         if det or fa else f"{'-':>8} {'-':>18}")
        label = "shipped test (rank p <= 0.05)" if key == "shipped" else key
        print(f"{label:>40} | {cells[0]:>27} | {cells[1]:>27}")


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--source", type=Path, default=None,
                    help="copy corpus models found here instead of training them")
    ap.add_argument("--models", default=",".join(HELDOUT + CALIBRATION))
    ap.add_argument("--ceiling", action="store_true",
                    help="also print what a threshold on any one score could reach")
    a = ap.parse_args()
    names = a.models.split(",")
    unknown = set(names) - set(CALIBRATION) - set(HELDOUT)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}")
    build([n for n in names if n in HONEST or n in MANIPULATED], a.cache, a.source)
    rows = []
    for name in names:
        print(f"auditing {name}", flush=True)
        rows += audit(name, a.cache)
    for split in ("calibration", "heldout"):
        if any(r["split"] == split for r in rows):
            table(rows, split)
    if a.ceiling:
        ceiling(rows)


if __name__ == "__main__":
    main()
