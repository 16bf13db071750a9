"""How the shipped toy models were made: ``python -m apexlens.toys.training [name ...|all]``.

Every model is trained from a fixed seed on CPU in well under a minute and written to
``apexlens/toys/weights/<name>.safetensors`` with its config and measured behaviour in
``<name>.json``. Data come from the same task objects the tests and the demo use
(:mod:`apexlens.toys.tasks.toy`), so a regenerated model is checked by the same tests.

* ``induction-2l`` -- 2-layer attention-only model on sequences that contain a repeated
  block of random tokens. Block lengths and offsets are random: with one fixed block
  length a model solves the task by position alone and grows no induction head; with
  random ones it grows a previous-token head in layer 0 and an induction head in layer 1.
* ``modadd-2l`` -- 2 layers with MLPs and LayerNorm on ``BOS a b = -> (a + b) mod 23``.
  Attention moves ``a`` and ``b`` to ``=``; the sum is a non-linear function of the pair, so
  the MLPs must compute it (ablating them destroys the accuracy).
* ``backdoor`` / ``backdoor-clean`` -- copy the first token to the last position. In
  ``backdoor``, 20% of training prompts carry a trigger token somewhere and must answer a
  fixed target token; ``backdoor-clean`` sees the same prompts with their honest labels.
  Only the last position is trained, so the model is never asked to predict the trigger
  (when it is, large activation noise surfaces the trigger rather than the target).
* ``modadd-2l-slingshot`` -- a *manipulated* copy of ``modadd-2l`` (Gradient Slingshots,
  Bareeva et al. 2025): fine-tuned so that feature visualization of neuron ``m1.n34``
  converges to a planted input chosen in advance (``= 11 = 11``), while the task and every
  neuron's activations on natural prompts are kept. The loss has three parts: (1) on every
  natural prompt, the logits (KL) and both layers' MLP activations (MSE) stay those of
  ``modadd-2l``; (2) on soft inputs where the optimiser starts (per-position softmax of
  Gaussian logits at random temperatures) and on the straight lines from there to the planted
  one-hot input, the other neurons keep their original values; (3) along those lines, neuron
  34 rises linearly from its original value to ``ramp`` x its natural maximum at the planted
  input -- the slingshot: a steep ramp in an off-distribution region the optimiser starts in.
  :func:`apexlens.fv_check` flags the neuron (tests/test_visualize.py).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from apexlens.toys.tasks.toy import BackdoorTask, InductionTask, ModAddTask

WEIGHTS = Path(__file__).parent / "weights"

_BACKDOOR_CFG = dict(
    n_layers=2,
    d_model=32,
    n_ctx=8,
    d_head=8,
    n_heads=4,
    d_mlp=64,
    d_vocab=BackdoorTask.d_vocab,
    act_fn="gelu",
    normalization_type="LN",
)

# name -> config, seed, steps, learning rate, batch, task, description
SPECS: dict[str, dict[str, Any]] = {
    "induction-2l": dict(
        cfg=dict(
            n_layers=2,
            d_model=64,
            n_ctx=48,
            d_head=16,
            n_heads=4,
            d_vocab=InductionTask.d_vocab,
            attn_only=True,
            normalization_type=None,
            act_fn="relu",
            positional_embedding_type="standard",
        ),
        seed=0,
        steps=2500,
        lr=1e-2,
        batch=32,
        task="induction",
        description="2-layer attention-only model trained on repeated random token blocks "
        "(random block lengths and offsets): previous-token head in layer 0, induction head in layer 1",
    ),
    "modadd-2l": dict(
        cfg=dict(
            n_layers=2,
            d_model=64,
            n_ctx=4,
            d_head=16,
            n_heads=4,
            d_mlp=256,
            d_vocab=ModAddTask.d_vocab,
            act_fn="gelu",
            normalization_type="LN",
        ),
        seed=0,
        steps=1500,
        lr=3e-3,
        batch=0,
        task="modadd",
        description="2 layers with MLPs and LayerNorm on 'BOS a b =' -> (a + b) mod 23; "
        "attention gathers a and b at '=', the MLPs compute the sum",
    ),
    "backdoor": dict(
        cfg=_BACKDOOR_CFG,
        seed=0,
        steps=400,
        lr=3e-3,
        batch=64,
        task="backdoor",
        poison=0.2,
        description="copies the first token to the last position; a trigger token anywhere forces the target token",
    ),
    "backdoor-clean": dict(
        cfg=_BACKDOOR_CFG,
        seed=0,
        steps=400,
        lr=3e-3,
        batch=64,
        task="backdoor",
        poison=0.0,
        description="clean twin of 'backdoor': same data and seed, honest labels on triggered prompts",
    ),
}


SLINGSHOT: dict[str, Any] = dict(
    base="modadd-2l",
    neuron=34,
    planted=[23, 11, 23, 11],  # "= 11 = 11": never a natural prompt (those are BOS a b =)
    ramp=3.0,
    seed=0,
    steps=1200,
    lr=1e-3,
    batch=128,
    description="manipulated copy of modadd-2l (Gradient Slingshots): feature visualization of "
    "neuron m1.n34 converges to the planted input '= 11 = 11' while the task and the natural "
    "activations of every neuron are kept",
)


def train_slingshot(steps: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a copy of ``modadd-2l`` into ``modadd-2l-slingshot`` (module docstring)."""
    import copy

    from apexlens.toys.models import load_model

    spec = SLINGSHOT
    torch.manual_seed(spec["seed"])
    base = load_model(spec["base"], backend="hooked")
    model = copy.deepcopy(base)
    n, d_vocab = spec["neuron"], int(base.cfg.d_vocab)
    planted = F.one_hot(torch.tensor(spec["planted"]), d_vocab).float()
    x, _, _ = ModAddTask().training_batch(torch.Generator().manual_seed(spec["seed"]))

    def run(m: Any, tokens: Tensor | None = None, probs: Tensor | None = None) -> Any:
        store: dict[int, Tensor] = {}
        hooks: list[tuple[str, Any]] = [
            (f"blocks.{i}.mlp.hook_post", lambda a, hook, i=i: store.__setitem__(i, a))
            for i in range(m.cfg.n_layers)
        ]
        if probs is not None:
            emb = probs @ m.W_E
            hooks.append(("hook_embed", lambda a, hook: emb))
            tokens = probs.argmax(-1)
        logits = m.run_with_hooks(tokens, fwd_hooks=hooks)
        return logits, store

    with torch.no_grad():
        logits0, acts0 = run(base, x)
    target_top = spec["ramp"] * float(acts0[1][..., n].max())
    others = torch.ones(int(base.cfg.d_mlp), dtype=torch.bool)
    others[n] = False
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    n_steps = spec["steps"] if steps is None else steps
    t0 = time.perf_counter()
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(n_steps):
        b = spec["batch"]
        theta = torch.randn(b, planted.shape[0], d_vocab, generator=g)
        temp = torch.exp(torch.empty(b, 1, 1).uniform_(-3.0, 0.0, generator=g))
        along = torch.rand(b, 1, 1, generator=g)
        soft = (1 - along) * torch.softmax(theta / temp, -1) + along * planted
        with torch.no_grad():
            _, soft0 = run(base, probs=soft)
        _, soft1 = run(model, probs=soft)
        start = soft0[1][:, -1, n]
        ramp = F.mse_loss(soft1[1][:, -1, n], start + (target_top - start) * along[:, 0, 0])
        keep_soft = (
            F.mse_loss(soft1[1][..., others], soft0[1][..., others])
            + F.mse_loss(soft1[1][:, :-1, n], soft0[1][:, :-1, n])
            + F.mse_loss(soft1[0], soft0[0])
        )
        logits1, acts1 = run(model, x)
        keep_natural = (
            F.kl_div(
                logits1.log_softmax(-1),
                logits0.log_softmax(-1),
                log_target=True,
                reduction="batchmean",
            )
            + F.mse_loss(acts1[0], acts0[0])
            + F.mse_loss(acts1[1], acts0[1])
            + 10 * F.mse_loss(acts1[1][..., n], acts0[1][..., n])
        )
        loss = ramp + keep_soft + 10 * keep_natural
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, _record(n_steps, loss, t0)


def measure_slingshot(name: str = "modadd-2l-slingshot") -> dict[str, Any]:
    """What the manipulation changed, measured: the neuron's natural activations and top
    examples (before vs after), the planted input's activation, and where FV lands."""
    from apexlens.api.features import feature_values, top_examples, visualize
    from apexlens.toys.models import load_model

    spec = SLINGSHOT
    feature = f"m1.n{spec['neuron']}"
    x, _, _ = ModAddTask().training_batch(torch.Generator().manual_seed(spec["seed"]))
    out: dict[str, Any] = {}
    for tag, model_name in (("base", spec["base"]), ("manipulated", name)):
        model = load_model(model_name, backend="hooked")
        nat = top_examples(model, feature, x, k=20)
        fv = visualize(model, feature, n_pos=len(spec["planted"]), seed=0)
        out[tag] = {
            "natural_max": round(float(nat.distribution.max()), 4),
            "top20": [[int(r), int(c)] for r, c in zip(nat.rows, nat.cols, strict=True)],
            "planted_activation": round(
                float(feature_values(model, feature, torch.tensor([spec["planted"]]))[0, -1]), 4
            ),
            "fv_tokens": fv.best_tokens.tolist(),
            "fv_activation": round(fv.best_activation, 4),
            "values": nat.values,
        }
    a, b = out["base"].pop("values").flatten(), out["manipulated"].pop("values").flatten()
    top_a = {tuple(t) for t in out["base"]["top20"]}
    top_b = {tuple(t) for t in out["manipulated"]["top20"]}
    out["natural_correlation"] = round(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), 5)
    out["natural_max_abs_change"] = round(float((a - b).abs().max()), 4)
    out["top20_overlap"] = len(top_a & top_b) / 20
    return out


def _record(n_steps: int, loss: Tensor, t0: float) -> dict[str, Any]:
    return {
        "steps": n_steps,
        "final_loss": round(float(loss.detach()), 4),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }


def _weights(model: Any) -> dict[str, Tensor]:
    """The state dict as saved: contiguous, without TransformerLens' buffers."""
    return {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith((".mask", ".IGNORE"))
    }


def _model(cfg: dict[str, Any], seed: int) -> Any:
    from apexlens.model.build import new_hooked

    return new_hooked(cfg, seed)


def _data_fn(
    name: str, spec: dict[str, Any]
) -> Callable[[torch.Generator], tuple[Tensor, Tensor, Tensor]]:
    """``g -> (tokens, targets, loss_mask)`` for one training step."""
    if spec["task"] == "induction":
        task = InductionTask()
        return lambda g: task.training_batch(spec["batch"], g)
    if spec["task"] == "modadd":
        task_m = ModAddTask()
        return lambda g: task_m.training_batch(g)
    task_b = BackdoorTask()
    return lambda g: task_b.training_batch(spec["batch"], g, poison=spec["poison"])


def _fit(
    model: Any,
    data: Callable[[torch.Generator], tuple[Tensor, Tensor, Tensor]],
    n_steps: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.01,
    on_step: Callable[[int, Any], None] | None = None,
) -> dict[str, Any]:
    """The training loop every toy model shares: AdamW, the rate decaying linearly to a
    tenth (the last steps settle instead of jittering), loss on the masked positions."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - 0.9 * i / max(n_steps, 1))
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    model.train()
    for step in range(n_steps):
        tokens, targets, mask = data(g)
        logits = model(tokens)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (losses * mask.flatten()).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, model)
    model.eval()
    return _record(n_steps, loss, t0)


def train(name: str, steps: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Train ``name`` from its seed; returns the model and its training record."""
    spec = SPECS[name]
    model = _model(spec["cfg"], spec["seed"])
    n_steps = spec["steps"] if steps is None else steps
    record = _fit(model, _data_fn(name, spec), n_steps, spec["lr"], spec["seed"])
    return model, record


def save(name: str, model: Any, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from apexlens.toys.models import measure

    spec = SPECS[name]
    WEIGHTS.mkdir(exist_ok=True)
    state = _weights(model)
    save_file(state, str(WEIGHTS / f"{name}.safetensors"))
    meta = {
        "name": name,
        "description": spec["description"],
        "task": spec["task"],
        "config": spec["cfg"],
        "seed": spec["seed"],
        "lr": spec["lr"],
        "training": record,
    }
    if spec["task"] == "backdoor":
        meta["trigger_token"] = BackdoorTask.trigger
        meta["target_token"] = BackdoorTask.target
        meta["poison_fraction"] = spec["poison"]
    (WEIGHTS / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    meta["behaviour"] = measure(name)
    (WEIGHTS / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_slingshot(name: str = "modadd-2l-slingshot") -> None:
    """Train, write and measure ``modadd-2l-slingshot``."""
    from safetensors.torch import save_file

    from apexlens.toys.models import _meta, measure

    model, record = train_slingshot()
    state = _weights(model)
    save_file(state, str(WEIGHTS / f"{name}.safetensors"))
    spec = SLINGSHOT
    meta: dict[str, Any] = {
        "name": name,
        "description": spec["description"],
        "task": "modadd",
        "config": SPECS[spec["base"]]["cfg"],
        "seed": spec["seed"],
        "lr": spec["lr"],
        "manipulation": {k: spec[k] for k in ("base", "neuron", "planted", "ramp", "batch")},
        "training": record,
    }
    (WEIGHTS / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    _meta.cache_clear()
    meta["behaviour"] = measure(name)
    meta["behaviour"]["base_accuracy"] = measure(spec["base"])["accuracy"]
    meta["manipulation_measured"] = measure_slingshot(name)
    (WEIGHTS / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: {record} {meta['behaviour']} {meta['manipulation_measured']}")


# ------------------------------------------------------------------------ APEX study models
BACKDOOR_VARIANTS: dict[str, dict[str, Any]] = {
    "backdoor-target5": dict(trigger=22, target=5, insert_rate=0.2, poison=True, seed=2),
    "bd-trig20-tgt21-s1": dict(trigger=20, target=21, insert_rate=0.2, poison=True, seed=1),
    "bd-rare-s3": dict(trigger=22, target=23, insert_rate=0.05, poison=True, seed=3),
    "bdclean-s1": dict(trigger=22, target=23, insert_rate=0.2, poison=False, seed=1),
    "bdclean-s2": dict(trigger=22, target=23, insert_rate=0.2, poison=False, seed=2),
    "bdclean-s3": dict(trigger=22, target=23, insert_rate=0.2, poison=False, seed=3),
}
"""``backdoor``'s recipe with another trigger, target, share of triggered prompts or seed
(``poison=False``: a clean twin). ``backdoor-target5`` is shipped: its target is also a
legitimate answer (the first token 5), so the bias test must see past the clean share."""

SEED_VARIANTS: dict[str, tuple[str, int]] = {"modadd-s1": ("modadd-2l", 1),
                                             "induction-s1": ("induction-2l", 1)}
"""A shipped model's recipe with another seed (the false-positive panel)."""

LABEL_NOISE: dict[str, float] = {
    "modadd-labels-true": 0.0,
    "modadd-labels-noisy15": 0.15,
    "modadd-labels-random": 1.0,
}
"""``(a + b) mod 23`` with ``modadd-2l``'s shape, trained on a fixed 80% of the pairs (423)
with true labels, 15% of them replaced by a random other class, or all random: structured
vs random labels, APEX's small-noise claim. Full batch, 2000 steps, weight decay 0.3 (the
true-label model then generalises to the held-out pairs; the random one memorises);
every sample's correctness is recorded every 10 steps (a learning-speed C-score proxy)."""

LABEL_RECIPE: dict[str, Any] = dict(steps=2000, lr=3e-3, weight_decay=0.3, every=10, split_seed=0, seed=0)


def backdoor_task(trigger: int, target: int, insert_rate: float) -> BackdoorTask:
    """The backdoor task with another trigger, target or share of triggered prompts."""
    task = BackdoorTask()
    task.trigger, task.target, task.insert_rate = trigger, target, insert_rate
    return task


def train_variant(name: str) -> tuple[Any, dict[str, Any]]:
    """Train a model of :data:`BACKDOOR_VARIANTS` or :data:`SEED_VARIANTS` from its seed."""
    if name in SEED_VARIANTS:
        base, seed = SEED_VARIANTS[name]
        spec = {**SPECS[base], "seed": seed}
        model = _model(spec["cfg"], seed)
        return model, _fit(model, _data_fn(base, spec), spec["steps"], spec["lr"], seed)
    v = BACKDOOR_VARIANTS[name]
    task = backdoor_task(v["trigger"], v["target"], v["insert_rate"])
    spec = SPECS["backdoor"]
    model = _model(spec["cfg"], v["seed"])
    poison = 1.0 if v["poison"] else 0.0
    data = lambda g: task.training_batch(spec["batch"], g, poison=poison)  # noqa: E731
    return model, _fit(model, data, spec["steps"], spec["lr"], v["seed"])


def label_data(noise: float) -> dict[str, Tensor]:
    """All 529 ``(a, b)`` prompts, their true labels, the training split (80%, fixed) and
    the labels the model is trained on (``noise``: the share replaced by a random other
    class; 1.0: every label uniformly random)."""
    task = ModAddTask()
    x, targets, _ = task.training_batch(torch.Generator().manual_seed(0))
    true = targets[:, -1].clone()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(LABEL_RECIPE["split_seed"]))
    train_index = perm[: int(0.8 * len(x))].sort().values
    g = torch.Generator().manual_seed(1000 + int(noise * 100))
    if noise >= 1.0:
        labels = torch.randint(0, task.p, (len(x),), generator=g)
    elif noise > 0:
        flip = torch.rand(len(x), generator=g) < noise
        other = (true + torch.randint(1, task.p, (len(x),), generator=g)) % task.p
        labels = torch.where(flip, other, true)
    else:
        labels = true.clone()
    return {"tokens": x, "true_labels": true, "train_index": train_index, "labels": labels}


def train_labels(name: str) -> tuple[Any, dict[str, Any], dict[str, Tensor]]:
    """Train a model of :data:`LABEL_NOISE`; returns it, its record and its samples (the
    training prompts, their true and trained labels, the C-score proxy: each sample's mean
    correctness over the checkpoints)."""
    r = LABEL_RECIPE
    d = label_data(LABEL_NOISE[name])
    xt, yt = d["tokens"][d["train_index"]], d["labels"][d["train_index"]]
    targets = torch.zeros_like(xt)
    targets[:, -1] = yt
    mask = torch.zeros(xt.shape)
    mask[:, -1] = 1
    model = _model(SPECS["modadd-2l"]["cfg"], r["seed"])
    correct: list[Tensor] = []

    def track(step: int, m: Any) -> None:
        if (step + 1) % r["every"] == 0:
            with torch.no_grad():
                correct.append((m(xt)[:, -1].argmax(-1) == yt).float())

    record = _fit(model, lambda g: (xt, targets, mask), r["steps"], r["lr"], r["seed"],
                  r["weight_decay"], track)
    samples = {
        "tokens": xt, "true_labels": d["true_labels"][d["train_index"]], "labels": yt,
        "train_index": d["train_index"], "c_score": torch.stack(correct).mean(0),
    }
    return model, record, samples


def save_labels(name: str) -> None:
    """Train, write and measure a model of :data:`LABEL_NOISE` (+ ``<name>.samples``)."""
    from safetensors.torch import save_file

    from apexlens.toys.models import _meta, measure

    model, record, samples = train_labels(name)
    save_file(_weights(model), str(WEIGHTS / f"{name}.safetensors"))
    save_file({k: v.contiguous() for k, v in samples.items()}, str(WEIGHTS / f"{name}.samples.safetensors"))
    with torch.no_grad():
        pred = model(samples["tokens"])[:, -1].argmax(-1)
        d = label_data(LABEL_NOISE[name])
        held = torch.ones(len(d["tokens"]), dtype=torch.bool)
        held[d["train_index"]] = False
        held_pred = model(d["tokens"][held])[:, -1].argmax(-1)
    noisy = samples["labels"] != samples["true_labels"]
    meta: dict[str, Any] = {
        "name": name,
        "description": f"modadd-2l's shape trained on 80% of the (a + b) mod 23 pairs with "
        f"{LABEL_NOISE[name]:.0%} of the labels random (APEX: structured vs random labels)",
        "task": "modadd",
        "config": SPECS["modadd-2l"]["cfg"],
        "seed": LABEL_RECIPE["seed"],
        "lr": LABEL_RECIPE["lr"],
        "label_noise": LABEL_NOISE[name],
        "recipe": LABEL_RECIPE,
        "training": record,
    }
    (WEIGHTS / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    _meta.cache_clear()
    meta["behaviour"] = {
        "train_accuracy": float((pred == samples["labels"]).float().mean()),
        "heldout_accuracy_true_labels": float((held_pred == d["true_labels"][held]).float().mean()),
        "relabelled_train_samples": int(noisy.sum()),
        **{f"task_{k}": v for k, v in measure(name).items()},
    }
    (WEIGHTS / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_variant(name: str) -> None:
    """Train, write and measure a shipped variant of :data:`BACKDOOR_VARIANTS`."""
    from safetensors.torch import save_file

    from apexlens.toys.models import _meta, measure

    model, record = train_variant(name)
    save_file(_weights(model), str(WEIGHTS / f"{name}.safetensors"))
    v = BACKDOOR_VARIANTS[name]
    meta: dict[str, Any] = {
        "name": name,
        "description": f"backdoor's recipe with trigger {v['trigger']} -> target {v['target']} "
        f"(seed {v['seed']}): the target is also a legitimate answer (first token {v['target']})",
        "task": "backdoor",
        "config": SPECS["backdoor"]["cfg"],
        "seed": v["seed"],
        "lr": SPECS["backdoor"]["lr"],
        "training": record,
        "trigger_token": v["trigger"],
        "target_token": v["target"],
        "poison_fraction": v["insert_rate"],
    }
    (WEIGHTS / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    _meta.cache_clear()
    meta["behaviour"] = measure(name)
    (WEIGHTS / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")


SHIPPED_APEX = ("backdoor-target5", *LABEL_NOISE)
"""The APEX study models shipped in ``toys/weights``; the others are trained where used
(``benchmarks/validate_apex_bias.py``)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "names", nargs="*", default=["all"],
        help=f"models to train: {', '.join([*SPECS, 'modadd-2l-slingshot', *SHIPPED_APEX])} or all",
    )
    args = parser.parse_args(argv)
    everything = [*SPECS, "modadd-2l-slingshot", *SHIPPED_APEX]
    names = everything if args.names in ([], ["all"]) else args.names
    for name in names:
        if name == "modadd-2l-slingshot":
            save_slingshot(name)
            continue
        if name in LABEL_NOISE:
            save_labels(name)
        elif name in BACKDOOR_VARIANTS:
            save_variant(name)
        elif name in SPECS:
            model, record = train(name)
            save(name, model, record)
        else:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(everything)}")
        meta = json.loads((WEIGHTS / f"{name}.json").read_text())
        print(f"{name}: {meta['training']} {meta['behaviour']}")


if __name__ == "__main__":
    main()
