"""Issue 12, items 5-9: progress, argument parsing, --out, task fit, APEX defaults."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

import apexlens
from apexlens.toys.models import load_model
from apexlens.toys.tasks import get_task
from apexlens.ui.cli import main


# ----------------------------------------------------------------------------- 5. progress
def test_cli_progress_on_stderr(tmp_path, capsys, monkeypatch):
    import apexlens.runs.rows

    # bars appear after PROGRESS_DELAY seconds; this work takes less, so show them at once
    monkeypatch.setattr(apexlens.runs.rows, "PROGRESS_DELAY", 0)
    assert main(["path-patch", "induction-2l", "--n", "4", "--out", str(tmp_path / "a")]) == 0
    cap = capsys.readouterr()
    assert "path patching" in cap.err and "path patching" not in cap.out
    argv = ["apex", "backdoor", "--n", "4", "--sigmas", "1,4", "--draws", "3"]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    cap = capsys.readouterr()
    # 2 sigmas x 3 draws x 4 prompts = 24 noisy forward rows
    assert re.search(r"APEX.*24 noisy forward rows", cap.err)
    assert "done" in cap.err and "APEX" not in cap.out
    assert main([*argv, "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- 6. parsing
def test_cli_sites_keep_layer_lists_together(tmp_path, capsys):
    from apexlens.ui.cli import split_sites

    assert split_sites("z:0,1") == ["z:0,1"]
    assert split_sites("resid_pre:3,resid_post") == ["resid_pre:3", "resid_post"]
    assert split_sites("z:0,-1,mlp_out:1,2,embed") == ["z:0,-1", "mlp_out:1,2", "embed"]
    out = tmp_path / "z"
    argv = ["apex", "backdoor", "--n", "2", "--sigmas", "1", "--draws", "2", "--sites", "z:0,1"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err


def test_cli_negative_sigma_is_one_clear_error(capsys):
    for argv in (["--sigmas", "-1,2"], ["--sigmas", "-0.5"], ["--sigmas=-1,2"]):
        assert main(["apex", "backdoor", *argv]) == 2
        err = capsys.readouterr().err
        assert "expected one argument" not in err
        assert "sigma" in err and ">= 0" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- 7. --out
def test_cli_bad_out_fails_before_computing(tmp_path, capsys, monkeypatch):
    import apexlens.ui.cli as cli

    def boom(*a, **k):  # computing anything would be a bug: the check comes first
        raise AssertionError("computed before checking --out")

    for command in cli.COMMANDS.values():  # each command module's own reference
        if hasattr(command, "model_and_task"):
            monkeypatch.setattr(command, "model_and_task", boom)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, message in [
        (a_file, "is a file"),
        (a_file / "sub", "is a file"),
        (Path("/proc/apexlens-no-such/out"), "cannot write"),
    ]:
        for cmd in (["path-patch", "induction-2l"], ["apex", "backdoor"]):
            assert main([*cmd, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err
            assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- 8. task fit
@pytest.mark.parametrize(
    "model, task",
    [("induction-2l", "modadd"), ("modadd-2l", "backdoor"), ("backdoor", "induction")],
)
def test_cli_refuses_a_task_the_model_does_not_fit(model, task, capsys, tmp_path):
    assert main(["path-patch", model, "--task", task, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert task in err and model in err and len(err.strip().splitlines()) == 1


def test_check_task_fits():
    from apexlens.toys.models import check_task_fits

    model = load_model("induction-2l")
    check_task_fits(get_task("induction"), model, "induction-2l")  # fits: no error
    with pytest.raises(apexlens.ApexlensError, match="vocabulary"):
        check_task_fits(get_task("modadd"), model)  # any model: d_vocab 25 vs 61
    with pytest.raises(apexlens.ApexlensError, match="trained on"):
        check_task_fits(get_task("induction"), load_model("backdoor-clean"), "backdoor-clean")
    small = load_model("modadd-2l")
    with pytest.raises(apexlens.ApexlensError, match="n_ctx"):
        check_task_fits(get_task("induction"), _with_vocab(small, 61))


def _with_vocab(model, d_vocab):
    """A stand-in with the model's config but another vocabulary size (n_ctx stays 4)."""

    class Cfg:
        pass

    cfg = Cfg()
    cfg.__dict__.update(vars(model.cfg))
    cfg.d_vocab = d_vocab

    class M:
        pass

    m = M()
    m.cfg = cfg
    return m


# ----------------------------------------------------------------------------- 9. defaults
def test_cli_apex_defaults_match_the_library(capsys):
    import inspect

    from apexlens.ui.cli import build_parser

    args = build_parser().parse_args(["apex", "backdoor"])
    lib = inspect.signature(apexlens.apex).parameters
    assert args.sites == lib["sites"].default == "block_in"
    assert args.relative is lib["relative"].default is True
    with pytest.raises(SystemExit):
        main(["apex", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "block_in" in help_text and "paper" in help_text
    assert build_parser().parse_args(["apex", "backdoor", "--absolute"]).relative is False


def test_cli_gpt2_offline_is_quick(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(
        socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("down"))
    )
    t = time.perf_counter()
    assert main(["path-patch", "gpt2", "--task", "ioi", "--out", str(tmp_path)]) == 2
    assert time.perf_counter() - t < 2.0
    err = capsys.readouterr().err
    assert "huggingface.co" in err and len(err.strip().splitlines()) == 1
