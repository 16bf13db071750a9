"""Issue 12, items 11 and 13: what the README shows works and measures what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import apexlens
from apexlens.toys.models import load_model
from apexlens.toys.tasks import get_task


def test_readme_uses_random_gpt2_small_as_it_is_exported():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    lines = [line for line in readme.splitlines() if "random_gpt2_small(" in line]
    assert lines and all("apexlens.random_gpt2_small(" in line for line in lines)
    assert "random_gpt2_small" in apexlens.__all__


# ----------------------------------------------------------------------------- 13. README circuit
def test_readme_induction_circuit_recovers_most_of_the_effect():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"exp\.evaluate_circuit\((\[.*?\])\)", readme, re.S)
    assert block, "the README evaluates a circuit"
    edges = eval(block.group(1), {"range": range})  # a literal list of edge pairs
    model = load_model("induction-2l")
    batch = get_task("induction").batch(32, seed=0)
    exp = apexlens.Experiment(
        model, batch.clean_tokens, batch.corrupted_tokens, metric=batch.logit_diff()
    )
    res = exp.evaluate_circuit(edges)
    assert res.recovery > 0.9 and res.proportion_explained > 0.9
    quoted = re.search(r"recovery (\d\.\d\d)", readme)
    assert quoted and float(quoted.group(1)) == pytest.approx(res.recovery, abs=0.006)
