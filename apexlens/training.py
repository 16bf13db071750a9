"""How the shipped toy models were made: ``python -m apexlens.training [name ...|all]``.

Every model is trained from a fixed seed on CPU in well under a minute and written to
``apexlens/weights/<name>.safetensors`` with its config and measured behaviour in
``<name>.json``. Data come from the same task objects the tests and the demo use
(:mod:`apexlens.tasks.toy`), so a regenerated model is checked by the same tests.

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

from apexlens.tasks.toy import BackdoorTask, InductionTask, ModAddTask

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


def _model(cfg: dict[str, Any], seed: int) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    return HookedTransformer(HookedTransformerConfig(**cfg, seed=seed, device="cpu"))


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


def train(name: str, steps: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Train ``name`` from its seed; returns the model and its training record."""
    spec = SPECS[name]
    model = _model(spec["cfg"], spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"])
    data = _data_fn(name, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01)
    n_steps = spec["steps"] if steps is None else steps
    # linear decay to a tenth of the rate: the last steps settle instead of jittering
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - 0.9 * i / max(n_steps, 1))
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(n_steps):
        tokens, targets, mask = data(g)
        logits = model(tokens)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (losses * mask.flatten()).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    record = {
        "steps": n_steps,
        "final_loss": round(float(loss.detach()), 4),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    return model, record


def save(name: str, model: Any, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from apexlens.models import measure

    spec = SPECS[name]
    WEIGHTS.mkdir(exist_ok=True)
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith((".mask", ".IGNORE"))
    }
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "names", nargs="*", default=["all"], help=f"models to train: {', '.join(SPECS)} or all"
    )
    args = parser.parse_args(argv)
    names = list(SPECS) if args.names in ([], ["all"]) else args.names
    for name in names:
        if name not in SPECS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(SPECS)}")
        model, record = train(name)
        save(name, model, record)
        meta = json.loads((WEIGHTS / f"{name}.json").read_text())
        print(f"{name}: {record} {meta['behaviour']}")


if __name__ == "__main__":
    main()
