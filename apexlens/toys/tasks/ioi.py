"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

A prompt such as ``"When Mary and John went to the store, John gave a drink to"`` names two
people; the *subject* (S, John) is repeated, and the model should complete with the
*indirect object* (IO, Mary). Templates come in two orders: ``BABA`` (S named first) and
``ABBA`` (IO named first). The corrupted ("ABC") prompt replaces the second mention of S by
a third name C, so nothing tells IO from S any more.

Named positions per prompt (token indices, BOS included when ``prepend_bos``, as
TransformerLens' ``to_tokens`` does by default): ``"IO"``, ``"S1"``, ``"S2"`` and ``"end"``
(the last token, where the answer is predicted). The answer token is `` IO``, the wrong
token `` S``. A batch uses one template with single-token names, places and objects, so
every prompt in it has the same token length.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.toys.tasks.base import TaskBatch, batch_generator

# The templates of the IOI paper's dataset ([A] = IO, [B] = S); the prompt stops before the
# final name, which is the answer.
BABA_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
]
ABBA_TEMPLATES = [
    t.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)
    for t in BABA_TEMPLATES
]

NAMES = [
    "Michael",
    "Christopher",
    "Jessica",
    "Matthew",
    "Ashley",
    "Jennifer",
    "Joshua",
    "Amanda",
    "Daniel",
    "David",
    "James",
    "Robert",
    "John",
    "Joseph",
    "Andrew",
    "Ryan",
    "Brandon",
    "Jason",
    "Justin",
    "Sarah",
    "William",
    "Jonathan",
    "Stephanie",
    "Brian",
    "Nicole",
    "Nicholas",
    "Anthony",
    "Heather",
    "Eric",
    "Elizabeth",
    "Adam",
    "Megan",
    "Melissa",
    "Kevin",
    "Steven",
    "Thomas",
    "Timothy",
    "Christina",
    "Kyle",
    "Rachel",
    "Laura",
    "Lauren",
    "Amber",
    "Brittany",
    "Danielle",
    "Richard",
    "Kimberly",
    "Jeffrey",
    "Amy",
    "Crystal",
    "Michelle",
    "Tiffany",
    "Jeremy",
    "Benjamin",
    "Mark",
    "Emily",
    "Aaron",
    "Charles",
    "Rebecca",
    "Jacob",
    "Stephen",
    "Patrick",
    "Sean",
    "Erin",
    "Jamie",
    "Kelly",
    "Samantha",
    "Nathan",
    "Sara",
    "Dustin",
    "Paul",
    "Angela",
    "Tyler",
    "Scott",
    "Katherine",
    "Andrea",
    "Gregory",
    "Erica",
    "Mary",
    "Travis",
    "Lisa",
    "Kenneth",
    "Bryan",
    "Lindsey",
    "Kristen",
    "Jose",
    "Alexander",
    "Jesse",
    "Katie",
    "Lindsay",
    "Shannon",
    "Vanessa",
    "Courtney",
    "Christine",
    "Alicia",
    "Cody",
    "Allison",
    "Bradley",
    "Samuel",
]
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]


def _ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (TL's tokenizers prepend BOS themselves)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def _single(tokenizer: Any, words: list[str], prefix: str = " ") -> list[str]:
    return [w for w in words if len(_ids(tokenizer, prefix + w)) == 1]


class IOITask:
    """IOI prompts for a GPT-2-tokenizer model: ``IOITask(model.tokenizer).batch(32, seed=0)``.

    Args:
        tokenizer: a GPT-2 tokenizer (``model.tokenizer``, or
            :func:`apexlens.toys.tokenizer.gpt2_tokenizer` offline).
        prepend_bos: put ``<|endoftext|>`` first, as TransformerLens' ``to_tokens`` does.
        order: ``"BABA"``, ``"ABBA"`` or ``"mixed"`` (each batch draws one template).
    """

    name = "ioi"

    def __init__(self, tokenizer: Any = None, *, prepend_bos: bool = True, order: str = "mixed"):
        if tokenizer is None:
            raise ApexlensError("the IOI task needs a GPT-2 tokenizer: IOITask(model.tokenizer)")
        if order not in ("BABA", "ABBA", "mixed"):
            raise ApexlensError(f"order must be 'BABA', 'ABBA' or 'mixed', got {order!r}")
        self.tokenizer, self.prepend_bos, self.order = tokenizer, prepend_bos, order
        self.names = _single(tokenizer, NAMES)
        self.places = _single(tokenizer, PLACES)
        self.objects = _single(tokenizer, OBJECTS)
        if len(self.names) < 3:
            raise ApexlensError(
                "the tokenizer has fewer than three single-token names: is it GPT-2's?"
            )

    def templates(self) -> list[str]:
        if self.order == "BABA":
            return BABA_TEMPLATES
        if self.order == "ABBA":
            return ABBA_TEMPLATES
        return BABA_TEMPLATES + ABBA_TEMPLATES

    def prompt(self, template: str, io: str, s: str, place: str, obj: str) -> str:
        """The prompt text without its answer (the template's last ``[A]``)."""
        text = template[: template.rindex(" [A]")]
        return (
            text.replace("[A]", io)
            .replace("[B]", s)
            .replace("[PLACE]", place)
            .replace("[OBJECT]", obj)
        )

    def encode(self, text: str) -> list[int]:
        ids = _ids(self.tokenizer, text)
        return [self.tokenizer.bos_token_id, *ids] if self.prepend_bos else ids

    def batch(self, n: int, *, seed: int = 0, template: int | None = None) -> TaskBatch:
        g = batch_generator(n, seed)
        temps = self.templates()
        t = temps[
            int(torch.randint(len(temps), (1,), generator=g)) if template is None else template
        ]
        clean, corrupted, io_pos, s1_pos, s2_pos = [], [], [], [], []
        answers, wrongs = [], []
        for _ in range(n):
            a, b, c = (self.names[int(i)] for i in torch.randperm(len(self.names), generator=g)[:3])
            place = self.places[int(torch.randint(len(self.places), (1,), generator=g))]
            obj = self.objects[int(torch.randint(len(self.objects), (1,), generator=g))]
            ids = self.encode(self.prompt(t, a, b, place, obj))
            tok_a, tok_b, tok_c = (_ids(self.tokenizer, " " + x)[0] for x in (a, b, c))
            where_a = [i for i, x in enumerate(ids) if x == tok_a]
            where_b = [i for i, x in enumerate(ids) if x == tok_b]
            if len(where_a) != 1 or len(where_b) != 2:  # a name glued to punctuation: retokenised
                raise ApexlensError(f"template {t!r} does not tokenise names as single tokens")
            corrupt = list(ids)
            corrupt[where_b[1]] = tok_c  # ABC: the second mention of S becomes C
            clean.append(ids)
            corrupted.append(corrupt)
            io_pos.append(where_a[0])
            s1_pos.append(where_b[0])
            s2_pos.append(where_b[1])
            answers.append(tok_a)
            wrongs.append(tok_b)
        lengths = {len(x) for x in clean}
        if len(lengths) != 1:  # pragma: no cover - guarded by single-token vocabulary
            raise ApexlensError("IOI prompts of one batch tokenised to different lengths")
        T = lengths.pop()
        end = torch.full((n,), T - 1)
        named = {
            "IO": torch.tensor(io_pos),
            "S1": torch.tensor(s1_pos),
            "S2": torch.tensor(s2_pos),
            "end": end,
        }
        return TaskBatch(
            torch.tensor(clean),
            torch.tensor(corrupted),
            torch.tensor(answers),
            torch.tensor(wrongs),
            end,
            named,
        )

    def token_labels(self, tokens: Int[Tensor, " pos"]) -> list[str]:
        return [self.tokenizer.decode([int(t)]) for t in tokens]
