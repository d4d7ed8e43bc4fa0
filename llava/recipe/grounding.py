"""Phrase grounding for the stage-0 tower: does "a red circle" / "two circles" hold for this image?

Why: contrastive training on whole captions teaches the tower what tells a batch apart fastest
(the printed word, the background, which colours are present) and leaves shapes out, so the
stage-2 model cannot answer "What shape is the red object?". Asking the tower about every
colour-shape pair and every shape count, each as a short phrase, supervises exactly the binding
the questions need. On a GPU (20k scenes, batch 128) a tower trained from scratch this way reached
99.9% pair accuracy (99.4% recall of present pairs) and 99% shape counts on held-out scenes
in 3000 steps, where a probe on the contrastive tower found next to nothing.

The loss is CLIP-like: the caption encoder embeds each phrase, the phrase attends over the
tower's patch tokens at LLaVA's feature layer (-2: what the LLM will read), and a sigmoid loss
(as in SigLIP) scores every image against every phrase. Labels come from the caption alone.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from llava.data.synth_scene import COLORS, PLURALS, SHAPES
from llava.data.synth_text import NUMBER_WORDS

MAX_COUNT = 5  # count phrases run "no circle" .. "five circles" (5 stands for five or more)
_NUMBER = {"a": 1, **{w: k for k, w in enumerate(NUMBER_WORDS) if k}}  # how captions write group sizes
_SHAPE_OF = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_GROUP = re.compile(r"\b({})\s+({})\s+({})\b".format("|".join(_NUMBER), "|".join(COLORS), "|".join(_SHAPE_OF)))
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five")


def caption_groups(caption: str) -> list[tuple[int, str, str]]:
    """(count, colour, shape) of each object group a pretraining caption lists, e.g. "two red circles"."""
    head = caption.partition(" on a ")[0]
    return [(_NUMBER[n], c, _SHAPE_OF[s]) for n, c, s in _GROUP.findall(head)]


def _count_phrase(shape: str, k: int) -> str:
    return f"{_COUNT_WORDS[k]} {shape if k == 1 else PLURALS[shape]}"


PAIR_PHRASES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
COUNT_PHRASES: tuple[str, ...] = tuple(_count_phrase(s, k) for s in SHAPES for k in range(MAX_COUNT + 1))
PHRASES: tuple[str, ...] = PAIR_PHRASES + COUNT_PHRASES


def phrase_labels(captions: list[str]) -> torch.Tensor:
    """[N, len(PHRASES)] 0/1: which pair phrases and which shape-count phrases each caption makes true."""
    labels = torch.zeros(len(captions), len(PHRASES))
    for i, caption in enumerate(captions):
        counts = dict.fromkeys(SHAPES, 0)
        for k, color, shape in caption_groups(caption):
            labels[i, PAIR_PHRASES.index(f"{color} {shape}")] = 1
            counts[shape] += k
        for shape, k in counts.items():
            labels[i, len(PAIR_PHRASES) + COUNT_PHRASES.index(_count_phrase(shape, min(k, MAX_COUNT)))] = 1
    return labels


class PhraseHead(nn.Module):
    """Each phrase embedding queries the patch tokens (one attention head); the attended vector
    scored against the phrase gives one logit per (image, phrase)."""

    def __init__(self, token_width: int, text_width: int, dim: int = 128) -> None:
        super().__init__()
        self.query = nn.Linear(text_width, dim)
        self.key = nn.Linear(token_width, dim)
        self.value = nn.Linear(token_width, dim)
        self.out = nn.Linear(text_width, dim)
        self.bias = nn.Parameter(torch.tensor(-2.0))  # most phrases are false for an image

    def forward(self, tokens: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, W], phrases [P, Wt] -> logits [B, P]."""
        q, k, v = self.query(phrases), self.key(tokens), self.value(tokens)
        attn = torch.einsum("pd,btd->bpt", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        attended = torch.einsum("bpt,btd->bpd", attn, v)
        return (attended * self.out(phrases)).sum(-1) + self.bias


def phrase_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels)


@torch.no_grad()
def phrase_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Held-out grounding, %: recall of the pairs present, accuracy over all pairs, and how often
    each shape's count phrase is the highest-scoring of its six."""
    n_pairs = len(PAIR_PHRASES)
    pred, truth = logits[:, :n_pairs] > 0, labels[:, :n_pairs].bool()
    counts = logits[:, n_pairs:].reshape(len(logits), len(SHAPES), MAX_COUNT + 1).argmax(-1)
    true_counts = labels[:, n_pairs:].reshape(len(labels), len(SHAPES), MAX_COUNT + 1).argmax(-1)
    return {"pair_recall": round(100 * (pred & truth).sum().item() / max(1, truth.sum().item()), 1),
            "pair_accuracy": round(100 * (pred == truth).float().mean().item(), 1),
            "count_accuracy": round(100 * (counts == true_counts).float().mean().item(), 1)}
