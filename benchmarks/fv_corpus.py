"""The corpus behind ``bench_fv_check.py``: honest toy models and Gradient-Slingshots
fine-tunes of them, built from seeded training runs into a cache directory (never shipped).

Honest models: the shipped ``modadd-2l``, ``backdoor-clean``, ``backdoor``, ``induction-2l``
(calibration) and three trained here (held out: architectures and seeds never used to choose
anything): ``modadd-rms-gated`` (RMSNorm, gated SiLU MLP), ``copy-3l-rms`` (3 layers,
RMSNorm), ``induction-2l-s1`` (attention-only, d_model 48, 3 heads).

Manipulated models (Bareeva et al., NeurIPS 2025, generalising ``apexlens.toys.training``):
each fine-tune plants 5 features at once at 1.3 / 1.4 / 1.6 / 2 / 3 x the natural maximum --
a layer-0 neuron and last-layer neurons, or for attention-only models head outputs along a
token's unembedding. Per step: (1) a *ramp* on soft inputs where the optimiser starts
(softmax of N(0, 1) logits at a temperature in [e^-3, 1]) mixed with the planted one-hot: the
feature must rise linearly to its target along the mix; (2) on those soft inputs every other
tracked activation and the logits stay the base model's; (3) on natural prompts the logits,
all tracked activations and the planted features stay the base model's (x10). Planted inputs
are *natural-looking* (``-sn``: a valid modadd prompt outside the auditor's sample; 8 clean
copy tokens; an induction prompt) or *arbitrary* (``-sa``: any vocabulary tokens).

    python benchmarks/fv_corpus.py [--cache DIR] [name ...]    # ~2-5 min per model on a core
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import apexlens
from apexlens.toys.tasks.toy import BackdoorTask, InductionTask, ModAddTask

CACHE = Path.home() / ".cache" / "apexlens" / "fv-bench"
SHIPPED = {"modadd-2l", "backdoor-clean", "backdoor", "induction-2l", "modadd-2l-slingshot"}
RATIOS = [1.3, 1.4, 1.6, 2.0, 3.0]

HONEST: dict[str, dict[str, Any]] = {
    "modadd-rms-gated": dict(
        cfg=dict(n_layers=2, d_model=64, n_ctx=4, d_head=16, n_heads=4, d_mlp=128, d_vocab=25,
                 act_fn="silu", gated_mlp=True, normalization_type="RMS"),
        seed=1, steps=1500, lr=3e-3, batch=0, task="modadd", split="heldout"),
    "copy-3l-rms": dict(
        cfg=dict(n_layers=3, d_model=48, n_ctx=8, d_head=12, n_heads=4, d_mlp=96, d_vocab=24,
                 act_fn="gelu", normalization_type="RMS"),
        seed=2, steps=500, lr=3e-3, batch=64, task="copy", split="heldout"),
    "induction-2l-s1": dict(
        cfg=dict(n_layers=2, d_model=48, n_ctx=48, d_head=16, n_heads=3, d_vocab=61,
                 attn_only=True, normalization_type=None, act_fn="relu",
                 positional_embedding_type="standard"),
        seed=1, steps=2500, lr=1e-2, batch=32, task="induction", split="heldout"),
}

MANIPULATED: dict[str, dict[str, Any]] = {
    "modadd-2l-sn": dict(base="modadd-2l", split="calibration", planted="natural", seed=10),
    "modadd-2l-sa": dict(base="modadd-2l", split="calibration", planted="arbitrary", seed=11),
    "backdoor-clean-sn": dict(base="backdoor-clean", split="calibration", planted="natural",
                              seed=12),
    "backdoor-clean-sa": dict(base="backdoor-clean", split="calibration", planted="arbitrary",
                              seed=13),
    "induction-2l-s": dict(base="induction-2l", split="calibration", planted="mixed", seed=14),
    "modadd-rms-gated-sn": dict(base="modadd-rms-gated", split="heldout", planted="natural",
                                seed=20),
    "modadd-rms-gated-sa": dict(base="modadd-rms-gated", split="heldout", planted="arbitrary",
                                seed=21),
    "copy-3l-rms-sn": dict(base="copy-3l-rms", split="heldout", planted="natural", seed=22),
    "copy-3l-rms-sa": dict(base="copy-3l-rms", split="heldout", planted="arbitrary", seed=23),
    "induction-2l-s1-s": dict(base="induction-2l-s1", split="heldout", planted="mixed", seed=24),
}


def task_name(name: str) -> str:
    base = MANIPULATED.get(name, {}).get("base", name)
    if base.startswith("modadd"):
        return "modadd"
    return "induction" if base.startswith("induction") else "copy"


def get_task(task: str) -> Any:
    return {"modadd": ModAddTask(), "copy": BackdoorTask(), "induction": InductionTask()}[task]


def natural_tokens(task: str) -> torch.Tensor:
    """The auditor's natural data: the CLI's recipe (512 prompts, 128 for induction's 40-token
    prompts, seed 0), duplicates dropped."""
    n = 128 if task == "induction" else 512
    return torch.unique(get_task(task).batch(n, seed=0).clean_tokens, dim=0)


N_POS = {"modadd": 4, "copy": 8, "induction": 12}


def meta(name: str, cache: Path = CACHE) -> dict[str, Any]:
    if name in SHIPPED:
        return dict(apexlens.model_info(name), task=task_name(name), split="calibration")
    return json.loads((cache / f"{name}.json").read_text())


def load(name: str, cache: Path = CACHE) -> Any:
    if name in SHIPPED:
        return apexlens.load_model(name, backend="hooked")
    from safetensors.torch import load_file

    from apexlens.model.build import hooked_from_state

    return hooked_from_state(meta(name, cache)["config"], load_file(str(cache / f"{name}.safetensors"))).eval()


def _save(name: str, model: Any, info: dict[str, Any], cache: Path) -> None:
    from safetensors.torch import save_file

    cache.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not k.endswith((".mask", ".IGNORE"))}
    save_file(state, str(cache / f"{name}.safetensors"))
    (cache / f"{name}.json").write_text(json.dumps(info, indent=1) + "\n")


def accuracy(model: Any, task: str) -> float:
    b = get_task(task).batch(256, seed=1234)
    with torch.no_grad():
        end = model(b.clean_tokens)[torch.arange(len(b)), b.positions]
    return float((end.argmax(-1) == b.answer_tokens).float().mean())


def train_honest(name: str, cache: Path = CACHE) -> None:
    from apexlens.model.build import new_hooked

    spec = HONEST[name]
    model = new_hooked(spec["cfg"], spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"])
    t = get_task(spec["task"])
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01)
    n = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - 0.9 * i / n)
    model.train()
    for _ in range(n):
        if spec["task"] == "modadd":
            x, y, mask = t.training_batch(g)
        elif spec["task"] == "copy":
            x, y, mask = t.training_batch(spec["batch"], g, poison=0.0)
        else:
            x, y, mask = t.training_batch(spec["batch"], g)
        losses = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
        loss = (losses * mask.flatten()).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    _save(name, model, dict(name=name, task=spec["task"], split=spec["split"], config=spec["cfg"],
                            seed=spec["seed"], accuracy=accuracy(model, spec["task"])), cache)


# ----------------------------------------------------------------------------- slingshots


def _hook(spec: dict[str, Any]) -> str:
    kind = "mlp.hook_post" if spec["kind"] == "neuron" else "attn.hook_z"
    return f"blocks.{spec['layer']}.{kind}"


def _value(model: Any, spec: dict[str, Any], act: torch.Tensor) -> torch.Tensor:
    if spec["kind"] == "neuron":
        return act[..., spec["index"]]
    d = torch.as_tensor(spec["direction"], dtype=act.dtype)
    return act[:, :, spec["index"]] @ (model.W_O[spec["layer"], spec["index"]] @ d)


def _run(model: Any, keep: list[str], tokens: torch.Tensor | None = None,
         probs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    store: dict[str, torch.Tensor] = {}

    def rec(name: str) -> Any:
        def hook(a: torch.Tensor, hook: Any) -> torch.Tensor:
            store[name] = a
            return a
        return hook

    hooks: list[tuple[str, Any]] = [(k, rec(k)) for k in dict.fromkeys(keep)]
    if probs is not None:
        emb = probs @ model.W_E
        hooks.append(("hook_embed", lambda a, hook: emb))
        tokens = probs.argmax(-1)
    return model.run_with_hooks(tokens, fwd_hooks=hooks), store


def _feature_values(model: Any, spec: dict[str, Any], tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, st = _run(model, [_hook(spec)], tokens)
        return _value(model, spec, st[_hook(spec)])


def _choose(base: Any, task: str, g: torch.Generator) -> list[dict[str, Any]]:
    """The 5 features to plant: a layer-0 and 4 last-layer live neurons, or last-layer head
    outputs along a token's unembedding (attention-only)."""
    L, nat = base.cfg.n_layers, natural_tokens(task)
    if base.cfg.attn_only:
        heads = torch.randperm(base.cfg.n_heads, generator=g).tolist()
        toks = torch.randperm(get_task(task).n_tokens, generator=g).tolist()
        out = []
        for j in range(len(RATIOS)):
            d = base.W_U[:, toks[j]].detach()
            out.append(dict(kind="head", layer=L - 1, index=heads[j % len(heads)],
                            direction=(d / d.norm()).tolist(), token=toks[j]))
        return out
    out, used = [], set()
    for layer in [0] + [L - 1] * (len(RATIOS) - 1):
        with torch.no_grad():
            _, st = _run(base, [f"blocks.{layer}.mlp.hook_post"], nat)
        mx = st[f"blocks.{layer}.mlp.hook_post"].flatten(0, 1).max(0).values
        alive = [i for i in range(mx.numel()) if float(mx[i]) >= 0.3 * float(mx.quantile(0.9))]
        while (layer, i := alive[int(torch.randint(len(alive), (1,), generator=g))]) in used:
            pass
        used.add((layer, i))
        out.append(dict(kind="neuron", layer=layer, index=i))
    return out


def _planted(base: Any, task: str, kind: str, spec: dict[str, Any], nat_max: float,
             g: torch.Generator, taken: set[tuple[int, ...]]) -> list[int]:
    t, n_pos, V = get_task(task), N_POS[task], int(base.cfg.d_vocab)
    if kind == "arbitrary":
        while tuple(p := torch.randint(V, (n_pos,), generator=g).tolist()) in taken:
            pass
        return p
    if task == "modadd":  # a valid prompt outside the auditor's sample, top quartile of them
        sample = {tuple(r) for r in natural_tokens(task).tolist()}
        a, b = torch.meshgrid(torch.arange(t.p), torch.arange(t.p), indexing="ij")
        cands = torch.stack([torch.full((t.p**2,), t.bos), a.flatten(), b.flatten(),
                             torch.full((t.p**2,), t.eq)], 1)
        cands = cands[[i for i, r in enumerate(cands.tolist())
                       if tuple(r) not in sample and tuple(r) not in taken]]
        vals = _feature_values(base, spec, cands)[:, -1]
        cands, vals = cands[vals < 0.9 * nat_max], vals[vals < 0.9 * nat_max]
        top = torch.argsort(vals, descending=True)[: max(1, len(vals) // 4)]
        return cands[top[int(torch.randint(len(top), (1,), generator=g))]].tolist()
    if task == "copy":
        return torch.randint(t.n_clean, (n_pos,), generator=g).tolist()
    L = int(torch.randint(3, 6, (1,), generator=g))  # induction: BOS prefix block block[:m]
    m = n_pos - 1 - L - 1
    toks = torch.randperm(t.n_tokens, generator=g)[: L + n_pos - 1 - L - m].tolist()
    return [t.bos, *toks[L:], *toks[:L], *(toks[:L] * 3)[:m]]


def _natural_batch(task: str, g: torch.Generator, planted: list[list[int]]) -> torch.Tensor:
    t = get_task(task)
    if task == "modadd":
        x = t.training_batch(g)[0]
        bad = {tuple(p) for p in planted}
        return x[torch.tensor([tuple(r) not in bad for r in x.tolist()])]
    if task == "copy":
        return t.training_batch(128, g, poison=0.0)[0]
    return t.training_batch(16, g)[0]


def slingshot(name: str, cache: Path = CACHE, steps: int = 1000, batch: int = 64) -> None:
    m = MANIPULATED[name]
    task = task_name(name)
    torch.manual_seed(m["seed"])
    g = torch.Generator().manual_seed(m["seed"])
    base = load(m["base"], cache).requires_grad_(False)
    model = copy.deepcopy(base).requires_grad_(True)
    nat, n_pos, V = natural_tokens(task), N_POS[task], int(base.cfg.d_vocab)
    feats = _choose(base, task, g)
    kinds = ([m["planted"]] * len(RATIOS) if m["planted"] != "mixed"
             else ["natural", "arbitrary", "natural", "arbitrary", "natural"])
    taken: set[tuple[int, ...]] = set()
    for f, ratio, kind in zip(feats, RATIOS, kinds, strict=True):
        nm = float(_feature_values(base, f, nat).max())
        f.update(ratio=ratio, target=ratio * nm, planted_type=kind, natural_max_base=nm)
        f["planted"] = _planted(base, task, kind, f, nm, g, taken)
        taken.add(tuple(f["planted"]))
    L = base.cfg.n_layers
    tracked = [f"blocks.{i}.{'attn.hook_z' if base.cfg.attn_only else 'mlp.hook_post'}"
               for i in range(L)]
    keep = list(dict.fromkeys(tracked + [_hook(f) for f in feats]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = torch.zeros(())
        for f in feats:
            one = F.one_hot(torch.tensor(f["planted"]), V).float()
            temp = torch.exp(torch.empty(batch, 1, 1).uniform_(-3.0, 0.0, generator=g))
            along = torch.rand(batch, 1, 1, generator=g)
            soft = (1 - along) * torch.softmax(torch.randn(batch, n_pos, V, generator=g) / temp, -1)
            soft = soft + along * one
            with torch.no_grad():
                lg0, s0 = _run(base, keep, probs=soft)
                start = _value(base, f, s0[_hook(f)])[:, -1]
            lg1, s1 = _run(model, keep, probs=soft)
            val = _value(model, f, s1[_hook(f)])[:, -1]
            loss = loss + F.mse_loss(val, start + (f["target"] - start) * along[:, 0, 0])
            for h in tracked:
                mask = torch.ones_like(s0[h], dtype=torch.bool)
                if h == _hook(f):
                    mask[:, -1, f["index"]] = False
                loss = loss + ((s1[h] - s0[h])[mask] ** 2).mean()
            if not base.cfg.attn_only:
                loss = loss + F.mse_loss(lg1, lg0)
        x = _natural_batch(task, g, [f["planted"] for f in feats])
        with torch.no_grad():
            lg0, s0 = _run(base, keep, x)
        lg1, s1 = _run(model, keep, x)
        kn = F.kl_div(lg1.log_softmax(-1), lg0.log_softmax(-1), log_target=True,
                      reduction="batchmean")
        kn = kn + sum(F.mse_loss(s1[h], s0[h]) for h in tracked)
        for f in feats:
            kn = kn + 10 * F.mse_loss(_value(model, f, s1[_hook(f)]), _value(base, f, s0[_hook(f)]))
        loss = loss + 10 * kn
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for f in feats:
        f["natural_max_after"] = float(_feature_values(model, f, nat).max())
        f["planted_activation"] = float(_feature_values(model, f, torch.tensor([f["planted"]]))[0, -1])
        f["planted_ratio_measured"] = f["planted_activation"] / f["natural_max_after"]
    _save(name, model, dict(name=name, task=task, split=m["split"], base=m["base"],
                            config=meta(m["base"], cache)["config"], seed=m["seed"], steps=steps,
                            accuracy_base=accuracy(base, task), accuracy=accuracy(model, task),
                            manipulation=feats), cache)


def build(names: list[str], cache: Path = CACHE, source: Path | None = None) -> None:
    """Train every model of ``names`` not in ``cache`` yet (or copy it from ``source``)."""
    for name in names:
        if name in SHIPPED or (cache / f"{name}.json").exists():
            continue
        if source is not None and (source / f"{name}.json").exists():
            cache.mkdir(parents=True, exist_ok=True)
            for ext in (".json", ".safetensors"):
                (cache / f"{name}{ext}").write_bytes((source / f"{name}{ext}").read_bytes())
            continue
        t0 = time.perf_counter()
        if name in HONEST:
            train_honest(name, cache)
        else:
            build([MANIPULATED[name]["base"]], cache, source)
            slingshot(name, cache)
        print(f"built {name} in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--source", type=Path, default=None,
                    help="copy models found here instead of training them")
    ap.add_argument("names", nargs="*", default=[*HONEST, *MANIPULATED])
    a = ap.parse_args()
    build(a.names, a.cache, a.source)
