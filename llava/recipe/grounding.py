"""Caption grounding for the stage-0 tower: which colour-shape pairs does this image hold, and how many of each shape?

Why: contrastive training on whole captions teaches the tower what tells a batch apart fastest
(the printed word, the background, which colours are present) and leaves shapes out, so the
stage-2 model cannot answer "What shape is the red object?". Asking the tower, for every
colour-shape pair, "is there a red circle?" and, for every shape, "how many circles?" supervises
exactly the binding the questions need. Labels are read from the pretraining caption alone (what
it lists), so this stays training on image-caption pairs.

The head reads the tower's patch tokens at LLaVA's feature layer (-2: what the LLM will read):
one learned query per pair and per shape attends over them (as in a DETR/Q-Former readout), then a
logit answers each pair and a 6-way classifier each count. On a GPU (20k scenes, batch 128) a tower
trained from scratch this way reached 99.9% pair accuracy (99.4% recall of present pairs) and 99%
shape counts on held-out scenes in 3000 steps, where the same probe on a contrastive-only tower
found next to nothing (7.8% recall). The head is thrown away with the caption encoder.

Optionally (`order`), each pair query also reads out one number, the pair's place from left to
right, trained by ranking: captions list their groups left to right, so of two listed groups the
first must score lower. Contrastive captions and the questions above never need to know where a
patch is, and with CLIP's random position init the tower's patch tokens forget it (a linear probe
finds an object patch's left/right half at chance), which leaves "Is the A to the left or right of
the B?" unanswerable. The ranking alone cannot bring x back (54% of pairs in order at step 500);
started from sin-cos positions (`VisionSpec.sincos_positions`) it gets 87% at step 500 and 96.9%
at the end of the full recipe's 4000 steps, whose tower's object patches give their x to a linear
probe within 3.6% of the image width (left/right half 95.5%).

Optionally (`per_query_readout`, `VisionSpec.grounding_per_query_readout`), each pair and shape
query also gets readout weights of its own. In the varied world (llava.data.synth_varied) the
shared head sits at its prior for ~2000 steps; with its own weights a query can answer from any
patch it attends to. Same 5000-step schedule, recall of present pairs at steps 833 / 1666 / 2500 /
3332 / 4165 / 5000: 0.2 / 2.0 / 49.2 / 62.7 / 73.7 / 74.8% (shared head: 0.1 at 1000, 2.2 at 2000,
28 at 2500, 52 at 3000, 67 at 4000, 70.8 at 5000); at the end, shape counts 82.7% (79.2) and the
binding check's shape 82.9% (80.9), count 72.5% (60.6). Better, not yet the classic tower's 99%.

Optionally (`centre_weight`), a linear readout of every patch token says which shapes have their
centre in that patch (`centre_cells`, from the scene, not the caption). Why: a model that counts by
how much of the picture a shape covers miscounts shapes of mixed sizes. The out-of-style count
questions whose counted shapes are alike in size (largest / smallest < 1.3) were answered 75% right
by direct-128 (session 44), those of mixed sizes 31-41%; small shapes were undercounted, large ones
overcounted. A per-patch logistic probe on that model's tower found each shape's centre patch too
rarely to count by (27% of varied held-out counts). Marking centres gives the tower one token per
object to attend to, whatever its size.

Optionally (`word_weight`), a linear readout of every patch token names the printed word on the patches
of its band (`word_cells`). Why: the centre readout pulls the patch tokens towards the shapes and the
word fades from them. A linear probe on the flattened tokens still reads it perfectly, but after 10
probe steps it read 36% of held-out words with centres against 68% without (between-word share of the
tokens' variance 0.029 against 0.043), and the whole recipe's chat model then never learnt to read it
(20% in style, where `full-no-readouts` got 100%). The readout makes the word a property of its band's tokens.
"""

from __future__ import annotations

import os
import re
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llava.data.synth_scene import COLORS, PLURALS, SHAPES, WORDS, Scene
from llava.data.synth_text import NUMBER_WORDS

MAX_COUNT = 5  # counts are classified 0 .. 5 (5 stands for five or more)
_NUMBER = {"a": 1, **{w: k for k, w in enumerate(NUMBER_WORDS) if k}}  # how captions write group sizes
_SHAPE_OF = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_GROUP = re.compile(r"\b({})\s+({})\s+({})\b".format("|".join(_NUMBER), "|".join(COLORS), "|".join(_SHAPE_OF)))

PAIRS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)  # what each pair query asks about
CENTRE_POS_WEIGHT = 8.0  # a patch holds a centre ~1-2% of the time: weigh the rare positives up


def caption_groups(caption: str) -> list[tuple[int, str, str]]:
    """(count, colour, shape) of each object group a pretraining caption lists, e.g. "two red circles"."""
    head = caption.partition(" on a ")[0]
    return [(_NUMBER[n], c, _SHAPE_OF[s]) for n, c, s in _GROUP.findall(head)]


def grounding_targets(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """From captions: pairs [N, len(PAIRS)] 0/1 (which colour-shape pairs are present) and
    counts [N, len(SHAPES)] in 0..MAX_COUNT (how many of each shape)."""
    pairs = torch.zeros(len(captions), len(PAIRS))
    counts = torch.zeros(len(captions), len(SHAPES), dtype=torch.long)
    for i, caption in enumerate(captions):
        for k, color, shape in caption_groups(caption):
            pairs[i, PAIRS.index(f"{color} {shape}")] = 1
            counts[i, SHAPES.index(shape)] += k
    return pairs, counts.clamp(max=MAX_COUNT)


def _patch_of(scene: Scene, image_size: int, patch_size: int) -> Callable[[float, float], tuple[int, int]]:
    """(row, col) of the patch a canvas point falls in, as the tower sees the picture ('pad': centred on a
    square of its long side, then resized)."""
    width, height = scene.canvas
    side, grid = max(width, height), image_size // patch_size
    dx, dy = (side - width) // 2, (side - height) // 2
    return lambda x, y: (min(grid - 1, int((y + dy) * image_size / side) // patch_size),
                         min(grid - 1, int((x + dx) * image_size / side) // patch_size))


def centre_cells(scene: Scene, image_size: int, patch_size: int) -> torch.Tensor:
    """[grid * grid, len(SHAPES)] 0/1, row-major: which shapes have their centre in each patch."""
    grid, patch = image_size // patch_size, _patch_of(scene, image_size, patch_size)
    cells = torch.zeros(grid * grid, len(SHAPES))
    for o in scene.objects:
        row, col = patch(o.x, o.y)
        cells[row * grid + col, SHAPES.index(o.shape)] = 1
    return cells


def word_cells(scene: Scene, image_size: int, patch_size: int) -> torch.Tensor:
    """[grid * grid] long, row-major: 1 + the printed word's index in WORDS on the patches of the band it is
    centred in (`Scene.word_box`), 0 elsewhere and in pictures without a word."""
    grid = image_size // patch_size
    cells = torch.zeros(grid * grid, dtype=torch.long)
    if scene.word and scene.word_box:
        if scene.word not in WORDS:
            raise ValueError(f"the word readout names only the synthetic worlds' words {WORDS}, not {scene.word!r}")
        x0, y0, x1, y1 = scene.word_box
        patch = _patch_of(scene, image_size, patch_size)
        (r0, c0), (r1, c1) = patch(x0, y0), patch(x1 - 1, y1 - 1)
        cells.view(grid, grid)[r0:r1 + 1, c0:c1 + 1] = 1 + WORDS.index(scene.word)
    return cells


class PatchCells(NamedTuple):
    """Per-patch targets read from the scenes: `centre_cells` [N, patches, len(SHAPES)], `word_cells` [N, patches]."""

    centres: torch.Tensor
    words: torch.Tensor


def patch_cells(scenes: list[Scene], image_size: int, patch_size: int) -> PatchCells:
    return PatchCells(torch.stack([centre_cells(s, image_size, patch_size) for s in scenes]),
                      torch.stack([word_cells(s, image_size, patch_size) for s in scenes]))


def scenes_of(image_folder: str, names: list[str]) -> list[Scene]:
    """The scene of each image path under `image_folder`, from the `scenes.jsonl` of the deepest folder
    on its path that has one (a mixed set keeps the second world's scenes in a folder of its own)."""
    from llava.data.synth import load_scenes

    loaded: dict[str, dict] = {}  # per folder its scenes, {} where it has none (each folder looked at once)
    out = []
    for name in names:
        parts = name.split("/")
        for k in range(len(parts) - 1, -1, -1):
            folder = os.path.join(image_folder, *parts[:k])
            if folder not in loaded:
                loaded[folder] = load_scenes(folder) if os.path.exists(os.path.join(folder, "scenes.jsonl")) else {}
            if "/".join(parts[k:]) in loaded[folder]:
                out.append(loaded[folder]["/".join(parts[k:])])
                break
        else:
            raise ValueError(f"no scenes.jsonl under {image_folder} describes {name}: centre targets need the scenes")
    return out


def centre_loss(logits: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Per-patch, per-shape logistic loss of the centre readout (`centre_cells` targets)."""
    return F.binary_cross_entropy_with_logits(logits, cells, pos_weight=logits.new_tensor(CENTRE_POS_WEIGHT))


def word_loss(logits: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Per-patch cross-entropy of the word readout (`word_cells` targets: 0 is "no word here")."""
    return F.cross_entropy(logits.flatten(0, 1), cells.flatten())


@torch.no_grad()
def word_read_accuracy(logits: torch.Tensor, cells: torch.Tensor) -> float:
    """%: pictures with a word whose band's patches, their word logits summed, read it right."""
    has = (cells > 0).any(1)
    band = (cells > 0).unsqueeze(-1).float()
    read = (logits[..., 1:] * band).sum(1).argmax(-1) + 1
    return round(100 * (read[has] == cells.max(1).values[has]).float().mean().item(), 1) if has.any() else float("nan")


@torch.no_grad()
def centre_count_accuracy(logits: torch.Tensor, counts: torch.Tensor) -> float:
    """%: shapes (all six, of each image) whose number of patches read as a centre equals their count."""
    return round(100 * ((logits > 0).sum(1).clamp(max=MAX_COUNT) == counts).float().mean().item(), 1)


def caption_order(captions: list[str]) -> torch.Tensor:
    """[N, len(PAIRS)]: each listed pair's place among its caption's groups (0 = leftmost), -1 where absent."""
    order = torch.full((len(captions), len(PAIRS)), -1, dtype=torch.long)
    for i, caption in enumerate(captions):
        for place, (_, color, shape) in enumerate(caption_groups(caption)):
            order[i, PAIRS.index(f"{color} {shape}")] = place
    return order


class GroundingHead(nn.Module):
    """Learned queries (one per pair, one per shape) attend over the patch tokens; the pair queries'
    outputs give one presence logit each (and with `order`, a left-to-right score each), the shape
    queries' a count distribution each."""

    def __init__(self, width: int, heads: int = 4, order: bool = False, per_query_readout: bool = False) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(len(PAIRS) + len(SHAPES), width) * 0.02)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.pair = nn.Linear(width, 1)
        self.count = nn.Linear(width, MAX_COUNT + 1)
        self.place = nn.Linear(width, 1) if order else None  # made last: without it, the same init as before
        # Each query's own readout on top of the shared one, from zero (so the start is the shared head's).
        # Why: with one shared `pair` Linear, "is there a red circle?" can only be answered once the red-
        # circle query already attends to circles alone; its own weights can read "red and round" off
        # whatever red patch it finds, which breaks that chicken-and-egg plateau where shapes vary.
        self.pair_own = nn.Parameter(torch.zeros(len(PAIRS), width)) if per_query_readout else None
        self.count_own = nn.Parameter(torch.zeros(len(SHAPES), width, MAX_COUNT + 1)) if per_query_readout else None

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """tokens [B, T, W] -> (pair logits [B, len(PAIRS)], count logits [B, len(SHAPES), MAX_COUNT + 1],
        left-to-right scores [B, len(PAIRS)] or None)."""
        out, _ = self.attn(self.queries.expand(len(tokens), -1, -1), tokens, tokens, need_weights=False)
        pairs, shapes = out[:, :len(PAIRS)], out[:, len(PAIRS):]
        place = self.place(pairs).squeeze(-1) if self.place is not None else None
        pair_logits, count_logits = self.pair(pairs).squeeze(-1), self.count(shapes)
        if self.pair_own is not None:
            pair_logits = pair_logits + (pairs * self.pair_own).sum(-1)
            count_logits = count_logits + torch.einsum("bsw,swk->bsk", shapes, self.count_own)
        return pair_logits, count_logits, place


def _ordered_gaps(place: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """For every two groups one caption lists, i before j (so i lies left of j): score of j - score of i."""
    a, b = order.unsqueeze(2), order.unsqueeze(1)
    listed_before = (a >= 0) & (b >= 0) & (a < b)  # [B, i, j]
    return (place.unsqueeze(1) - place.unsqueeze(2))[listed_before]


def order_loss(place: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Ranking: of two listed groups, the one listed first scores lower (softplus of the violation)."""
    gaps = _ordered_gaps(place, order)
    return F.softplus(-gaps).mean() if gaps.numel() else place.sum() * 0


def grounding_loss(pair_logits: torch.Tensor, count_logits: torch.Tensor, pairs: torch.Tensor,
                   counts: torch.Tensor, place: torch.Tensor | None = None, order: torch.Tensor | None = None,
                   order_weight: float = 0.0) -> torch.Tensor:
    loss = (F.binary_cross_entropy_with_logits(pair_logits, pairs)
            + F.cross_entropy(count_logits.flatten(0, 1), counts.flatten()))
    if place is not None and order is not None and order_weight:
        loss = loss + order_weight * order_loss(place, order)
    return loss


@torch.no_grad()
def grounding_scores(pair_logits: torch.Tensor, count_logits: torch.Tensor, pairs: torch.Tensor,
                     counts: torch.Tensor, place: torch.Tensor | None = None,
                     order: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out grounding, %: recall of the pairs present, accuracy over all pairs, shape counts (and
    with left-to-right scores, how many pairs of listed groups they put in the caption's order)."""
    pred, truth = pair_logits > 0, pairs.bool()
    scores = {"pair_recall": round(100 * (pred & truth).sum().item() / max(1, truth.sum().item()), 1),
              "pair_accuracy": round(100 * (pred == truth).float().mean().item(), 1),
              "count_accuracy": round(100 * (count_logits.argmax(-1) == counts).float().mean().item(), 1)}
    if place is not None and order is not None:
        scores["order_accuracy"] = round(100 * (_ordered_gaps(place, order) > 0).float().mean().item(), 1)
    return scores


READOUT_HEADS = ("grounding_head", "centre_head", "word_head")  # the dual encoder's, where it has them
READOUTS_FILE = "readouts.safetensors"  # saved beside the tower


def save_readouts(model: nn.Module, folder: str) -> None:
    """Keep a stage-0 model's readout heads beside its tower (`load_readouts`), so what the tower's
    tokens carry can be read on other pictures later (the out-of-style set's) without training again."""
    heads = {f"{name}.{key}": value.detach().cpu().contiguous() for name in READOUT_HEADS
             if getattr(model, name, None) is not None for key, value in getattr(model, name).state_dict().items()}
    if heads:
        save_file(heads, os.path.join(folder, READOUTS_FILE))


def load_readouts(model: nn.Module, folder: str) -> None:
    """Load the heads `save_readouts` kept in `folder` into `model`'s (made with the same heads)."""
    path = os.path.join(folder, READOUTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {READOUTS_FILE} in {folder}: towers trained before it was kept have none")
    state = load_file(path)
    for name in READOUT_HEADS:
        if getattr(model, name, None) is None:
            continue
        head = {key.partition(".")[2]: value for key, value in state.items() if key.partition(".")[0] == name}
        if not head:
            raise ValueError(f"{path} has no {name}: the tower was trained without it")
        getattr(model, name).load_state_dict(head)
