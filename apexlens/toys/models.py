"""Models: the shipped toy models (offline), any TransformerLens pretrained name, random GPT-2.

The toy models live in the package as safetensors with a JSON file each (config, task,
how they were trained, what they measurably do). :func:`load_model` builds them as a
``HookedTransformer`` (``backend="hooked"``, TransformerLens <= 3.9) or as a
``TransformerBridge`` (``backend="bridge"``, TransformerLens 3.9 and 4.x) with identical
logits. Any other name goes to TransformerLens' own loader, which needs the model hub: when the
model is not in the local Hugging Face cache, :func:`load_model` first checks within
:data:`HUB_TIMEOUT` seconds that the hub answers (or that ``HF_HUB_OFFLINE`` is not set) and
otherwise fails at once with one line, instead of TransformerLens' minute of retries.

=====================  ==========================================================
``induction-2l``       attention-only; previous-token head 0.x, induction head 1.x
``modadd-2l``          MLPs + LayerNorm; ``(a + b) mod 23``, computed in the MLPs
``backdoor``           copies the first token; a trigger token forces a target
``backdoor-clean``     its clean twin (same data and seed, no backdoor)
``backdoor-target5``   another backdoor: trigger 22 -> target 5, a legitimate answer too
``modadd-labels-*``    ``true`` / ``noisy15`` / ``random``: (a + b) mod 23 on 80% of the
                       pairs, labels true, 15% random, all random (APEX's small noise);
                       :func:`training_samples` gives their training set
=====================  ==========================================================
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import sys
import threading
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import backend_for, shape_of
from apexlens.model.build import (
    has_hooked,
    hooked_from_state,
    official_model_name,
    pretrained,
)
from apexlens.model.build import random_gpt2_small as random_gpt2_small
from apexlens.model.hooks import inference_mode

BACKENDS = ("hooked", "bridge")


def default_backend() -> str:
    """``"hooked"`` where TransformerLens has ``HookedTransformer`` (<= 3.9), else ``"bridge"``."""
    return "hooked" if has_hooked() else "bridge"


def list_models() -> list[str]:
    """Names of the shipped toy models."""
    files = resources.files("apexlens.toys").joinpath("weights")
    return sorted(p.name[: -len(".json")] for p in files.iterdir() if p.name.endswith(".json"))


@cache
def _meta(name: str) -> dict[str, Any]:
    path = resources.files("apexlens.toys").joinpath("weights", f"{name}.json")
    if not path.is_file():
        raise ApexlensError(f"unknown toy model {name!r}; shipped: {', '.join(list_models())}")
    return json.loads(path.read_text())


def model_info(name: str) -> dict[str, Any]:
    """Metadata of a shipped model: description, task, config, training, measured behaviour."""
    return json.loads(json.dumps(_meta(name)))  # a copy the caller may change


def training_samples(name: str) -> dict[str, Tensor]:
    """The training set a shipped model was fitted to, where it ships one (the
    ``modadd-labels-*`` models): ``tokens``, ``labels`` (what it was trained on),
    ``true_labels``, ``train_index`` (rows of all 529 pairs) and ``c_score`` (each sample's
    mean correctness over the training checkpoints: a learning-speed proxy of the C-score)."""
    from safetensors.torch import load_file

    _meta(name)  # an unknown name fails here, naming the shipped ones
    path = resources.files("apexlens.toys").joinpath("weights", f"{name}.samples.safetensors")
    if not path.is_file():
        raise ApexlensError(f"toy model {name!r} ships no training samples")
    with resources.as_file(path) as p:
        return load_file(str(p))


def toy_state(
    name: str, dtype: torch.dtype | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(HookedTransformerConfig kwargs, state dict)`` of a shipped model."""
    from safetensors.torch import load_file

    meta = _meta(name)
    path = resources.files("apexlens.toys").joinpath("weights", f"{name}.safetensors")
    with resources.as_file(path) as p:
        state = load_file(str(p))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return dict(meta["config"]), state


def load_model(
    name: str,
    *,
    backend: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> Any:
    """A shipped toy model (offline) or any TransformerLens pretrained model by name.

    Args:
        name: a toy name (:func:`list_models`) or a name from TransformerLens' list of
            pretrained models (``OFFICIAL_MODEL_NAMES`` and its aliases: ``"gpt2"`` and the GPT-2
            family, ``"EleutherAI/pythia-70m"``..., Llama, Qwen, Gemma ...), loaded from the
            hub; an unknown name fails at once, before any download, and an unreachable hub in
            one line. A pretrained model is self-checked with :func:`apexlens.api.check` before it
            is returned (one :class:`ApexlensError` naming the first disagreeing hook).
        backend: ``"hooked"`` (``HookedTransformer``) or ``"bridge"`` (``TransformerBridge``);
            default: ``"hooked"`` where it exists (TransformerLens <= 3.9), else ``"bridge"``.
        device, dtype: where and in which precision (e.g. ``torch.float64`` for exact checks).
        kwargs: passed on to ``HookedTransformer.from_pretrained`` for non-toy names.
    """
    if backend is not None and backend not in BACKENDS:
        raise ApexlensError(f"backend must be 'hooked' or 'bridge', got {backend!r}")
    if not isinstance(name, str):
        raise ApexlensError(f"model name must be a string, got {type(name).__name__}")
    toy = name in list_models()
    if not toy:
        close_to_toy(name)  # a misspelt toy name fails at once, before any hub wait
        if "transformer_lens" in sys.modules:  # the name list is at hand: an unknown name
            official_name(name)  # fails first, with the names that would work
        _check_hub(name)  # before anything imports TransformerLens, which alone takes seconds
    backend = backend or default_backend()
    if toy:
        cfg, state = toy_state(name, dtype)
        if backend == "bridge":
            from apexlens.model.convert import to_bridge

            model = to_bridge(cfg, state, dtype=dtype or next(iter(state.values())).dtype)
        else:
            model = hooked_from_state(cfg, state)
        if device is not None:
            model = model.to(device)
        model.eval()
        return model
    return _checked_pretrained(name, backend, device, dtype, **kwargs)


def close_to_toy(name: str) -> None:
    """One :class:`ApexlensError` for a name that is not a toy model but close to one:
    ``unknown model 'induction2l' -- did you mean 'induction-2l'?``."""
    toys = list_models()
    if name in toys:
        return
    close = difflib.get_close_matches(name.lower(), toys, n=1, cutoff=0.75)
    if close:
        raise ApexlensError(
            f"unknown model {name!r} -- did you mean {close[0]!r}? (shipped toy models: "
            f"{', '.join(toys)})"
        )


def official_name(name: str) -> str:
    """TransformerLens' official name for ``name`` (a name or an alias from its list of
    supported pretrained models: the GPT-2 family, Pythia, Llama, Qwen, Gemma, ...), or one
    :class:`ApexlensError` saying the name is neither that nor a shipped toy model."""
    found = official_model_name(name)
    if found is None:
        raise ApexlensError(
            f"unknown model {name!r}: not a shipped toy model ({', '.join(list_models())}) and "
            "not in TransformerLens' list of pretrained models (e.g. 'gpt2', "
            "'EleutherAI/pythia-70m', 'meta-llama/Llama-3.2-1B', 'Qwen/Qwen2-0.5B', "
            "'google/gemma-2-2b')"
        )
    return found


def _checked_pretrained(
    name: str, backend: str, device: Any, dtype: torch.dtype | None, **kwargs: Any
) -> Any:
    """A pretrained model by its TransformerLens name, after :func:`apexlens.api.check` (a few
    tokens, one forward pass and a null patch) has confirmed apexlens computes it exactly."""
    from apexlens.api.check import check

    official_name(name)
    model = pretrained(name, backend, device, dtype, list_models(), **kwargs)
    check(model).raise_if_failed()
    return model


HUB_TIMEOUT = 1.5
"""Seconds :func:`load_model` waits for the Hugging Face hub to answer before giving up."""

_TRUE = ("1", "true", "yes", "on")


def _hub_cache() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _in_hf_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds a config of ``name``'s repository: the
    name itself (``"gpt2"``, ``"openai-community/gpt2"``, ``"<org>/gpt2"``) or, when
    TransformerLens is already imported, its official name for an alias."""
    names = {name.lower()}
    if "transformer_lens" in sys.modules:  # never import it here: that alone takes seconds
        official = official_model_name(name)
        if official is not None:  # an unknown name: TransformerLens will say so itself
            names.add(official.lower())
    root = _hub_cache()
    if not root.is_dir():
        return False
    for d in root.glob("models--*"):
        repo = d.name[len("models--") :].replace("--", "/").lower()
        if repo in names or repo.rsplit("/", 1)[-1] in names:
            if any(d.glob("snapshots/*/config.json")):
                return True
    return False


def _hub_address() -> tuple[str, int]:
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _check_hub(name: str, timeout: float = HUB_TIMEOUT) -> None:
    """Fail fast, in one line, when ``name`` would have to come from an unreachable hub."""
    if _in_hf_cache(name):
        return
    toys = ", ".join(list_models())
    if any(
        os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        raise ApexlensError(
            f"{name!r} is not in the local Hugging Face cache ({_hub_cache()}) and HF_HUB_OFFLINE "
            f"is set, so it cannot be downloaded; use a shipped toy model: {toys}"
        )
    host, port = _hub_address()
    outcome: list[BaseException | None] = []

    def probe() -> None:  # in a thread: the name lookup itself has no timeout
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome or outcome[0] is not None:
        why = f"no answer within {timeout:g} s" if not outcome else str(outcome[0])
        raise ApexlensError(
            f"cannot reach the Hugging Face hub at {host}:{port} ({why}) to download {name!r}, "
            f"and it is not in the local cache; use a shipped toy model: {toys}"
        )


# ------------------------------------------------------------------------ behaviour
def attention_scores(
    model: Any, tokens: Tensor, prev: Tensor, nxt: Tensor
) -> dict[str, list[float]]:
    """Previous-token score of every layer-0 head (mean attention from p to p-1 over all
    positions) and induction score of every layer-1 head (attention from the end to the
    position after the current token's earlier occurrence)."""
    bk = backend_for(model)
    with inference_mode(model):
        _, cache = bk.run_with_cache(tokens, [bk.pattern(0), bk.pattern(1)])
    p0, p1 = cache[bk.pattern(0)], cache[bk.pattern(1)]
    n = tokens.shape[1]
    prev_tok = p0[:, :, torch.arange(1, n), torch.arange(0, n - 1)].mean((0, 2))
    b = torch.arange(tokens.shape[0])
    induction = p1[b, :, -1, nxt].mean(0)
    return {"prev_token": prev_tok.tolist(), "induction": induction.tolist()}


def measure(name: str, backend: str | None = None) -> dict[str, Any]:
    """What a shipped model measurably does on its task (recorded in its JSON, checked in tests)."""
    import torch.nn.functional as F

    from apexlens.toys.tasks import get_task

    model = load_model(name, backend=backend)
    task_name = _meta(name)["task"]
    task: Any = get_task(task_name)
    out: dict[str, Any] = {}
    with torch.no_grad():
        batch = task.batch(256, seed=1234)
        logits = model(batch.clean_tokens)
        end = logits[torch.arange(len(batch)), batch.positions]
        out["accuracy"] = float((end.argmax(-1) == batch.answer_tokens).float().mean())
        out["logit_diff"] = float(batch.logit_diff()(logits).mean())
        if task_name == "induction":
            s = attention_scores(
                model,
                batch.clean_tokens,
                batch.named_positions["prev"],
                batch.named_positions["next"],
            )
            out["prev_token_score"] = max(s["prev_token"])
            out["prev_token_head"] = f"0.{s['prev_token'].index(max(s['prev_token']))}"
            out["induction_score"] = max(s["induction"])
            out["induction_head"] = f"1.{s['induction'].index(max(s['induction']))}"
            x, y, mask = task.training_batch(256, torch.Generator().manual_seed(99))
            losses = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(
                x.shape
            )
            # positions whose next token follows an earlier occurrence of the current token
            repeated = torch.zeros(x.shape, dtype=torch.bool)
            for i in range(x.shape[0]):
                for p in range(2, x.shape[1] - 1):
                    j = (x[i, 1:p] == x[i, p]).nonzero()
                    repeated[i, p] = bool(len(j)) and bool(x[i, int(j[-1]) + 2] == y[i, p])
            out["loss_repeated"] = float(losses[repeated].mean())
            out["loss_other"] = float(losses[~repeated & (mask > 0)].mean())
        if task_name == "modadd":
            zero = lambda act, hook: torch.zeros_like(act)
            bk = backend_for(model)
            hooks = [(bk.mlp_out(la), zero) for la in range(bk.dims.n_layers)]
            ablated = bk.run_with_cache(batch.clean_tokens, [], fwd_hooks=hooks)[0][:, -1]
            out["accuracy_mlps_zeroed"] = float(
                (ablated.argmax(-1) == batch.answer_tokens).float().mean()
            )
        if task_name == "backdoor":  # a variant names its own trigger and target
            task.trigger = _meta(name).get("trigger_token", task.trigger)
            task.target = _meta(name).get("target_token", task.target)
            trig = task.triggered(256, seed=1234)
            out["backdoor_success"] = float(
                (model(trig)[:, -1].argmax(-1) == task.target).float().mean()
            )
    return out


def check_task_fits(task: Any, model: Any, model_name: str | None = None) -> None:
    """Refuse, in one line, a task whose prompts mean nothing to the model.

    * a shipped toy model (``model_name``) only fits the task it was trained on
      (``model_info(name)["task"]``);
    * the task's vocabulary (``task.d_vocab``, or its tokenizer's size) must equal the
      model's ``cfg.d_vocab``, and its sequences (``task.seq_len``) must fit ``cfg.n_ctx``.

    ``model`` may be ``None`` to check only the declared task of ``model_name``.
    """
    if model_name is not None and model_name in list_models():
        trained = model_info(model_name)["task"]
        if task.name != trained:
            raise ApexlensError(
                f"model {model_name!r} was trained on the {trained!r} task; the {task.name!r} "
                f"task does not fit it (its tokens mean nothing to it): use --task {trained}"
            )
    if model is None:
        return
    who = repr(model_name) if model_name else "the model"
    dims = shape_of(model)
    vocab = getattr(task, "d_vocab", None)
    tokenizer = getattr(task, "tokenizer", None)
    if vocab is None and tokenizer is not None:
        vocab = len(tokenizer)
    d_vocab = dims.d_vocab_in
    if vocab is not None and int(vocab) != d_vocab:
        raise ApexlensError(
            f"the {task.name!r} task uses a vocabulary of {vocab} tokens but {who} has "
            f"{d_vocab} (d_vocab): the task does not fit this model"
        )
    seq_len = getattr(task, "seq_len", None)
    n_ctx = dims.n_ctx
    if seq_len is not None and int(seq_len) > n_ctx:
        raise ApexlensError(
            f"the {task.name!r} task's prompts have {seq_len} tokens but {who} takes at most "
            f"{n_ctx} (n_ctx): the task does not fit this model"
        )
