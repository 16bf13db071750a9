"""The README runs as written: every ```python block, in order, as one script on a fresh
interpreter (offline: the hub is unreachable, so its guarded blocks take their ``except``
path), and every number it quotes is what the code prints.

A ``# -> text`` line in a block is what the code above it prints (in order, within the
block); numbers match to two units of their last printed digit. Numbers in the prose of the
sections that show code must appear in what the blocks print.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import apexlens

README = Path(__file__).parent.parent / "README.md"
MARK = "@@apexlens-readme-block"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
PROSE_SECTIONS = ("## In a notebook", "## Circuit discovery", "## Feature visualization")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The blocks run as one script; its stdout, split per block."""
    blocks = python_blocks(README.read_text())
    parts = []
    for i, block in enumerate(blocks):
        parts.append(f"print({MARK + str(i)!r}, flush=True)\n{block}")
    work = tmp_path_factory.mktemp("readme")
    script = work / "readme.py"
    script.write_text("\n".join(parts))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # no hub: load_model("gpt2") must fail, in one line
        "HF_HOME": str(work / "hf"),  # and no cached copy to fall back on
        "OMP_NUM_THREADS": "1",  # tiny models: one thread is fastest on a shared machine
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = re.split(rf"^{MARK}\d+\n", done.stdout, flags=re.M)[1:]
    assert len(outputs) == len(blocks)
    return blocks, outputs, work


def _skeleton(line: str) -> str:
    return " ".join(NUMBER.sub("#", line).split())


def _matches(expected: str, got: str) -> bool:
    if _skeleton(expected) != _skeleton(got):
        return False
    for e, g in zip(NUMBER.findall(expected), NUMBER.findall(got), strict=True):
        decimals = len(e.partition(".")[2])
        tol = 2 * 10.0**-decimals if decimals else 0.0
        if abs(float(e) - float(g)) > tol + 1e-4 * abs(float(e)):
            return False
    return True


def test_readme_runs_top_to_bottom_and_prints_what_it_quotes(readme_run):
    blocks, outputs, work = readme_run
    quoted = 0
    for block, out in zip(blocks, outputs, strict=True):
        lines = out.splitlines()
        at = 0
        for expected in (ln[len("# -> "):] for ln in block.splitlines() if ln.startswith("# -> ")):
            hit = next((i for i in range(at, len(lines)) if _matches(expected, lines[i])), None)
            assert hit is not None, f"README says\n  {expected}\nbut the block printed\n{out}"
            at = hit + 1
            quoted += 1
    assert quoted >= 20  # the README shows what its code prints
    # what the README says it saved can be loaded back
    assert apexlens.Circuit.load(work / "induction-circuit.json").ablation == "resample"
    assert len(apexlens.Circuit.load(work / "discovered-circuit.json")) == 16
    assert apexlens.load_result(work / "induction-circuit-result").recovery > 1.0


def test_readme_hub_blocks_are_guarded(readme_run):
    blocks, outputs, _ = readme_run
    hub = [i for i, b in enumerate(blocks) if 'load_model("gpt2")' in b]
    assert hub, "the README shows how to load a pretrained model"
    for i in hub:
        assert "except apexlens.ApexlensError" in blocks[i]
        assert outputs[i].count("not available here") == 1  # offline: one line, no traceback


def test_readme_prose_numbers_come_from_the_code(readme_run):
    _, outputs, _ = readme_run
    printed = " ".join(outputs)
    text = README.read_text()
    for heading in PROSE_SECTIONS:
        start = text.index(heading)
        end = text.find("\n## ", start + 1)
        section = text[start:end]
        section = section.split("### Shipped toy models")[0]  # that table is model_info's
        prose = re.sub(r"```.*?```", "", section, flags=re.S)
        for number in re.findall(r"(?<![\w.@])\d\.\d\d(?![\d%])", prose):
            assert number in printed, f"{heading}: {number} is not printed by any block"


def test_readme_uses_random_gpt2_small_as_it_is_exported():
    lines = [ln for ln in README.read_text().splitlines() if "random_gpt2_small(" in ln]
    assert lines and all("apexlens.random_gpt2_small(" in line for line in lines)
    assert "random_gpt2_small" in apexlens.__all__
