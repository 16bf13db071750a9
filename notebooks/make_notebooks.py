"""Writes the two tutorial notebooks (run it after changing a cell; the test suite executes them)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

IOI = [
    new_markdown_cell(
        "# Probing GPT-2's heads on IOI with path patching\n\n"
        "Indirect object identification (Wang et al. 2022): *When Mary and John went to the store, "
        "John gave a drink to* -> *Mary*. We path-patch every head to the logits, then to the "
        "name-mover heads' queries. This needs GPT-2 from the Hugging Face hub; without it the "
        "notebook says so and runs the same analysis on the shipped `induction-2l` toy model."
    ),
    new_code_cell(
        "import plotly.io as pio\n"
        "import apexlens\n"
        "from apexlens import plotting\n"
        "from apexlens.tasks import get_task\n\n"
        'pio.renderers.default = "plotly_mimetype+notebook"\n'
        "try:\n"
        '    model = apexlens.load_model("gpt2")\n'
        '    task = get_task("ioi", tokenizer=model.tokenizer)\n'
        '    receivers = ["9.9.q", "9.6.q", "10.0.q"]  # the name movers\n'
        "except apexlens.ApexlensError as err:\n"
        '    print("GPT-2 is not available here:", str(err)[:160])\n'
        '    print("Running on the shipped induction-2l model instead.")\n'
        '    model = apexlens.load_model("induction-2l")\n'
        '    task = get_task("induction")\n'
        "    receivers = None\n"
        "batch = task.batch(16, seed=0)\n"
        "exp = apexlens.Experiment(model, batch.clean_tokens, batch.corrupted_tokens,\n"
        "                          metric=batch.logit_diff(), positions=batch.named_positions)\n"
        'print(f"clean logit diff {exp.clean_values.mean():.3f}, corrupted {exp.corrupted_values.mean():.3f}")'
    ),
    new_markdown_cell("## Every head -> logits (MLPs recomputed on the way)"),
    new_code_cell(
        'to_logits = exp.path_patch("all-heads", "logits")\nplotting.head_heatmap(to_logits)'
    ),
    new_markdown_cell(
        "## Every head -> the receivers' queries (or the strongest layer-1 head's key)"
    ),
    new_code_cell(
        "if receivers is None:\n"
        "    strongest = int(to_logits.normalized()[1].argmin())\n"
        '    receivers = [f"1.{strongest}.k"]\n'
        'to_receivers = exp.path_patch("all-heads", receivers)\n'
        "print(to_receivers.to_frame().sort_values('normalized').head(5).to_string(index=False))\n"
        "plotting.head_heatmap(to_receivers)"
    ),
    new_code_cell("plotting.path_graph(to_receivers, top_k=5)"),
]

APEX = [
    new_markdown_cell(
        "# APEX: finding a backdoor target from clean inputs\n\n"
        "APEX (Ren, Luo, Li 2026) adds Gaussian noise to hidden activations, inputs and weights "
        "fixed. Small noise measures how stable each prediction is; large noise makes "
        "predictions concentrate on what the *model* is biased toward. The shipped `backdoor` "
        "model answers a fixed target whenever a trigger token appears; we never show it the "
        "trigger, and still find the target."
    ),
    new_code_cell(
        "import plotly.io as pio\n"
        "import plotly.express as px\n"
        "import apexlens\n"
        "from apexlens import plotting\n"
        "from apexlens.tasks import get_task\n\n"
        'pio.renderers.default = "plotly_mimetype+notebook"\n'
        'task = get_task("backdoor")\n'
        "tokens = task.batch(64, seed=0).clean_tokens  # no trigger anywhere\n"
        "labels = task.token_labels(range(task.d_vocab))\n"
        "sigmas = [0.25, 0.5, 1, 2, 4, 8]\n"
        "sweeps = {name: apexlens.apex(apexlens.load_model(name), tokens, sigmas=sigmas, n_draws=32,\n"
        '                              sites="embed", relative=True, seed=0, token_labels=labels)\n'
        '          for name in ("backdoor", "backdoor-clean")}\n'
        "apexlens.compare(sweeps)"
    ),
    new_code_cell("plotting.apex_curves(sweeps)"),
    new_code_cell('plotting.token_histogram(sweeps["backdoor"], 4.0)'),
    new_markdown_cell("## Sample regularity: confident samples escape later"),
    new_code_cell(
        'res = sweeps["backdoor-clean"]\n'
        "px.scatter(x=res.clean_margin.tolist(), y=res.escape_noise.tolist(),\n"
        '           labels={"x": "clean logit margin (top-1 minus top-2)", "y": "escape noise"})'
    ),
]


def main() -> None:
    for name, cells in (("01_ioi_path_patching.ipynb", IOI), ("02_apex_backdoor.ipynb", APEX)):
        nb = new_notebook(
            cells=cells,
            metadata={
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
            },
        )
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
