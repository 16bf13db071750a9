"""The command line's error paths (issue 23): an earlier run's files in ``--out`` are not
replaced without ``--overwrite``, Ctrl-C is one line and exit 130, an unknown or misspelt
model name is diagnosed as such, and no argument is silently changed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import apexlens
from apexlens.ui.cli import COMMANDS, main
from apexlens.ui.cli.common import OUTPUTS

RUNS = {
    "path-patch": ["path-patch", "induction-2l", "--n", "3", "--senders", "0.0,1.1"],
    "apex": ["apex", "backdoor", "--n", "2", "--sigmas", "1", "--draws", "2"],
    "discover": ["discover", "induction-2l", "--n", "3", "--method", "exact"],
    "visualize": ["visualize", "induction-2l", "logit:3", "--steps", "2", "--restarts", "1",
                  "--refine-steps", "0", "--natural", "6"],
}


def _one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_every_command_with_files_is_listed():
    """Each command that takes --out lists the files it writes (and no other does)."""
    from apexlens.ui.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    takes_out = {
        name for name, p in sub.choices.items()
        if any("--out" in a.option_strings for a in p._actions)
    }
    assert takes_out == set(OUTPUTS) and set(OUTPUTS) <= set(COMMANDS)
    assert set(RUNS) == set(OUTPUTS) - {"demo"}  # the demo's report: tested in test_report


@pytest.mark.parametrize("command", list(RUNS))
def test_a_second_run_refuses_to_overwrite_unless_asked(command, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*RUNS[command], "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    written = sorted(p.name for p in out.iterdir())
    assert set(written) <= set(OUTPUTS[command]) and written, written  # the table is right
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert "--overwrite" in err and written[0] in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # untouched
    assert main([*argv, "--overwrite"]) == 0


def test_the_demo_refuses_to_overwrite_before_running(tmp_path, capsys, monkeypatch):
    import apexlens.ui.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("ran the demo"))
    (tmp_path / "report.html").write_text("an earlier report")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in _one_line(capsys.readouterr().err)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    import apexlens.ui.cli.path_patch as pp

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pp, "model_and_task", interrupted)
    assert main(["path-patch", "induction-2l", "--out", str(tmp_path / "x")]) == 130
    assert "interrupted" in _one_line(capsys.readouterr().err)


def test_an_unknown_model_is_named_as_such(tmp_path, capsys):
    assert main(["path-patch", "induction2l", "--out", str(tmp_path)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "unknown model 'induction2l' -- did you mean 'induction-2l'?" in err
    assert main(["path-patch", "nosuchmodel", "--out", str(tmp_path)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "unknown model 'nosuchmodel'" in err and "task" not in err
    t = time.perf_counter()
    with pytest.raises(apexlens.ApexlensError, match="did you mean 'modadd-2l'"):
        apexlens.load_model("modadd2l")  # before any hub wait
    assert time.perf_counter() - t < 1.0


def test_visualize_n_pos_zero_is_refused_not_defaulted(tmp_path, capsys):
    argv = [*RUNS["visualize"], "--n-pos", "0", "--out", str(tmp_path / "v")]
    assert main(argv) == 2
    assert "n_pos" in _one_line(capsys.readouterr().err)
    assert not Path(tmp_path / "v").exists() or not any(Path(tmp_path / "v").iterdir())
