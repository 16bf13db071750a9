"""The user's model comes back as it was (issue 23, item 4): every module's train/eval flag,
the user's own hooks -- after every public call, after an exception, and after a
``KeyboardInterrupt`` at any point of a long call (injected deterministically: at the k-th
metric call, or from the user's own hook at its k-th firing, for every k)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import apexlens
from apexlens.model.hooks import inference_mode

from backends import model_backends
from helpers import hook_count, random_model, random_tokens


def _flags(model: torch.nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _odd_flags(model: torch.nn.Module) -> list[bool]:
    """The model in eval mode, one block in training mode and every third module too (an
    MC-dropout-like set-up no call may switch off)."""
    model.eval()
    model.blocks[0].train()
    for i, m in enumerate(model.modules()):
        if i % 3 == 0:
            m.training = True
    return _flags(model)


def _calls(model: Any, clean: torch.Tensor, corrupted: torch.Tensor) -> dict[str, Callable[[], Any]]:
    metric = apexlens.LogitDiff(clean[:, -1], (clean[:, -1] + 1) % 41)
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    scores = exp.attribute_edges(method="exact")
    fv = apexlens.visualize(model, "m0.n1", n_pos=4, steps=2, restarts=1, refine_steps=1)

    def patched() -> Any:
        with apexlens.patched(model, apexlens.Paths("0.1", "logits"), corrupted):
            return model(clean)

    def noise() -> Any:
        with apexlens.noise_hooks(model, 0.5):
            return model(clean)

    return {
        "path_patch": lambda: apexlens.path_patch(model, clean, corrupted, senders="all-heads",
                                                  metric=lambda lg: lg[..., -1, 3] - lg[..., -1, 5]),
        "act_patch": lambda: apexlens.act_patch(model, clean, corrupted, metric=metric),
        "evaluate_circuit": lambda: exp.evaluate_circuit(apexlens.full_graph(model)[::3]),
        "attribute_edges exact": lambda: exp.attribute_edges(method="exact"),
        "attribute_edges eap-ig": lambda: exp.attribute_edges(method="eap-ig", ig_steps=2),
        "faithfulness": lambda: exp.faithfulness(scores, fractions=[0.5, 1.0]),
        "discover": lambda: exp.discover(threshold=0.1, order=scores),
        "apex": lambda: apexlens.apex(model, clean, sigmas=[1.0], n_draws=2),
        "noise_hooks": noise,
        "visualize": lambda: apexlens.visualize(model, "m0.n1", n_pos=4, steps=2, restarts=1),
        "top_examples": lambda: apexlens.top_examples(model, "m0.n1", clean, k=3),
        "fv_check": lambda: apexlens.fv_check(model, "m0.n1", clean, fv=fv, k=3, peers=19,
                                              refine_steps=1),
        "check": lambda: apexlens.check(model),
        "patched": patched,
    }


@pytest.mark.parametrize("backend", model_backends())
def test_every_call_leaves_every_module_flag_as_it_was(backend):
    model = random_model(41, backend=backend, n_layers=2)
    clean, corrupted = random_tokens(model, batch=2, n_pos=5)
    for name, call in _calls(model, clean, corrupted).items():
        before = _odd_flags(model)
        call()
        assert _flags(model) == before, name
        assert hook_count(model) == 0, name


class _Interrupt:
    """Raises KeyboardInterrupt at the k-th call."""

    def __init__(self, k: int):
        self.k, self.n = k, 0

    def tick(self) -> None:
        self.n += 1
        if self.n == self.k:
            raise KeyboardInterrupt


def test_an_interrupt_anywhere_in_discover_leaves_hooks_and_flags_as_they_were():
    model = random_model(42, n_layers=2)
    clean, corrupted = random_tokens(model, batch=2, n_pos=5)
    box = {"stop": _Interrupt(0)}

    def metric(lg: torch.Tensor) -> torch.Tensor:
        box["stop"].tick()
        return lg[..., -1, 3] - lg[..., -1, 5]

    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    scores = exp.attribute_edges(method="exact")
    user_hook_calls = [0]

    def user_hook(act: torch.Tensor, hook: Any) -> None:  # the user's own permanent hook
        user_hook_calls[0] += 1
        box["stop"].tick()

    model.hook_dict["blocks.1.hook_resid_post"].add_hook(user_hook, is_permanent=True)
    n_user = hook_count(model)
    edges = apexlens.full_graph(model)[-10:]

    def fresh() -> Any:
        # an Experiment keeps what it computed once (clean readouts, circuit plans) for the
        # next call, so each attempt gets a new one: every attempt makes the same calls
        box["stop"] = _Interrupt(0)
        return apexlens.Experiment(model, clean, corrupted, metric=metric)

    first = fresh()
    box["stop"] = _Interrupt(0)
    expected = first.discover(threshold=0.05, order=scores, edges=edges)
    total = box["stop"].n  # metric calls + user hook firings of one whole discover
    assert total > 5
    for k in range(1, total + 1):
        before = _odd_flags(model)
        attempt = fresh()
        box["stop"] = _Interrupt(k)
        with pytest.raises(KeyboardInterrupt):
            attempt.discover(threshold=0.05, order=scores, edges=edges)
        assert _flags(model) == before, k
        assert hook_count(model) == n_user, k
    model.eval()
    box["stop"] = _Interrupt(0)
    again = exp.discover(threshold=0.05, order=scores, edges=edges)  # nothing left behind changes it
    assert again.edges == expected.edges
    model.reset_hooks(including_permanent=True)


def test_an_interrupt_during_the_restore_still_restores_every_flag():
    """A second Ctrl-C while the flags are being put back: the restore finishes, then the
    interrupt is raised."""

    class Flaky(torch.nn.Module):
        armed = False

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "training" and value and Flaky.armed:
                Flaky.armed = False
                raise KeyboardInterrupt
            super().__setattr__(name, value)

    model = random_model(43, n_layers=2)
    model.flaky = Flaky()
    before = _odd_flags(model)
    model.flaky.training = True
    before = _flags(model)
    with pytest.raises(KeyboardInterrupt):
        with inference_mode(model):
            assert not any(_flags(model))
            Flaky.armed = True
    assert _flags(model) == before
