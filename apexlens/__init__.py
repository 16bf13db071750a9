"""apexlens: exact, fast path patching and APEX activation-noise probing for TransformerLens.

Public API (one screen):

* graph      -- node vocabulary ``"embed"``, ``"9.9"``, ``"9.9.q"``, ``"m3"``, ``"logits"``
* patching   -- :func:`path_patch`, :func:`evaluate_circuit`, :func:`act_patch`, :func:`patched`
* noise      -- :func:`apex` (APEX sweeps), :func:`noise_hooks`
* scoring    -- :class:`LogitDiff`, :class:`LogitDiffRecovery`, :class:`KLDivergence`,
                :class:`AnswerProb`, :class:`Scores`
* models     -- :func:`load_model` (shipped toy models offline, or any TL pretrained name),
                :func:`to_bridge` (a HookedTransformer-format model as a TransformerBridge)
* tasks      -- :func:`get_task`, :class:`TaskBatch`
* plotting   -- plotly figures for every result
"""

from apexlens.backend import ApexlensError
from apexlens.bridge import to_bridge
from apexlens.noise import ApexResult, apex, compare, noise_hooks
from apexlens.tasks.base import Task, TaskBatch

__all__ = ["ApexlensError", "Task", "TaskBatch", "ApexResult", "apex", "compare", "noise_hooks", "to_bridge"]
__version__ = "0.1.0"
