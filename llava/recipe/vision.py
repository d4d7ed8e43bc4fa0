"""Stage 0b: a tiny CLIP-style vision tower, pretrained contrastively on image-caption pairs.

The image side is a transformers `CLIPVisionModel` (saved as a standard CLIP vision folder,
so the trainer loads it like openai/clip-vit-*); the caption side is a small transformer
encoder with masked mean pooling (thrown away after training). Loss: CLIP's symmetric InfoNCE,
optionally with hard negative captions (NegCLIP): the true caption with one colour, shape or
number changed.

`binding_accuracy` checks what the tower sees. Plain CLIP learns what tells a batch's images
apart fastest (the printed word, the background); on held-out scenes it prefers the true caption
to one with a colour changed 92% of the time, a count 67%, a shape 48% (chance). 4 hard negatives
per image (300 steps) lift counts to 98% (the count negatives are answered by counting colours)
but leave shapes at 51%, and a stage-2 model on such a tower answered no better, so the shipped
recipe adds the caption-grounding loss instead (`grounding_weight`, llava.recipe.grounding): for
every colour-shape pair "is it there?", for every shape "how many?", read from the caption.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerBase

from llava.data.synth_scene import SHAPES, WORDS
from llava.model.vision import resize_tower_input
from llava.processing.image import ImageProcessor
from llava.recipe.common import JsonlLog, seed_everything, train_loop
from llava.recipe.grounding import (GroundingHead, PatchCells, caption_order, centre_count_accuracy, centre_loss,
                                    grounding_loss, grounding_scores, grounding_targets, patch_cells, save_readouts,
                                    scenes_of, word_loss, word_read_accuracy)
from llava.recipe.negatives import hard_negatives, perturb_caption
from llava.recipe.tokenizer import IMAGE_TOKEN

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionSpec:
    image_size: int = 96
    patch_size: int = 12
    width: int = 128
    layers: int = 4
    heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    embed_dim: int = 128
    max_text_len: int = 96
    # patch position embeddings start as a 2-D sin-cos grid of this scale (0: CLIP's small random init)
    sincos_positions: float = 0.0
    # the grounding head gives each pair and shape query its own readout (GroundingHead.per_query_readout)
    grounding_per_query_readout: bool = False


def vision_config(spec: VisionSpec) -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.width,
                            intermediate_size=4 * spec.width, num_hidden_layers=spec.layers,
                            num_attention_heads=spec.heads, projection_dim=spec.embed_dim)


def sincos_grid(grid: int, width: int, scale: float = 1.0) -> torch.Tensor:
    """[grid * grid, width] row-major: sines and cosines of the column in the first half, of the row
    in the second (MAE's fixed 2-D embedding, here only the starting point of CLIP's learned one)."""
    quarter = width // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def enc(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.flatten()[:, None].float() * freq[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    out = torch.zeros(grid * grid, width)
    out[:, :4 * quarter] = torch.cat([enc(cols), enc(rows)], dim=1)
    return out * scale


def init_sincos_positions(tower: CLIPVisionModel, scale: float) -> None:
    """Start the tower's patch position embeddings (not CLS's) as a sin-cos grid.

    Why: CLIP's random init (std 0.02) is ~25x weaker than a patch's content, and nothing in
    contrastive or grounding training asks where a patch is, so the patch tokens LLaVA reads forget
    it: a linear probe on a tower trained from that init (the model shipped before this option) finds
    an object patch's left/right half at chance, and "Is the A left or right of the B?" stays at
    chance. Started at content's scale, x survives (probe: 96% after 500 steps, 95.5% in the shipped
    tower). The weights stay an ordinary learned CLIP position embedding."""
    weight = tower.embeddings.position_embedding.weight
    grid = int(round((weight.shape[0] - 1) ** 0.5))
    with torch.no_grad():
        weight[1:] = sincos_grid(grid, weight.shape[1], scale).to(weight)


class TextEncoder(nn.Module):
    """Caption encoder: token + position embeddings, a few transformer layers, masked mean pool."""

    def __init__(self, vocab_size: int, spec: VisionSpec) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, spec.text_width)
        self.pos = nn.Embedding(spec.max_text_len, spec.text_width)
        layer = nn.TransformerEncoderLayer(spec.text_width, 4, 4 * spec.text_width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, spec.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.text_width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.encoder(self.tok(ids) + self.pos(pos), src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.norm((h * m).sum(1) / m.sum(1).clamp(min=1))


@dataclass
class Grounding:
    """One batch's caption-grounding targets (llava.recipe.grounding) and their loss weights."""

    pairs: torch.Tensor
    counts: torch.Tensor
    weight: float
    order: torch.Tensor | None = None
    order_weight: float = 0.0
    cells: PatchCells | None = None  # the batch's per-patch targets: shapes' centres, the word's band
    centre_weight: float = 0.0
    word_weight: float = 0.0


class DualEncoder(nn.Module):
    """CLIP: two towers, two projections into a shared space, a learnable temperature."""

    def __init__(self, vocab_size: int, spec: VisionSpec, grounding: bool = False, order: bool = False,
                 centres: bool = False, words: bool = False) -> None:
        super().__init__()
        self.vision = CLIPVisionModel(vision_config(spec))
        if spec.sincos_positions:
            init_sincos_positions(self.vision, spec.sincos_positions)
        self.text = TextEncoder(vocab_size, spec)
        self.image_proj = nn.Linear(spec.width, spec.embed_dim, bias=False)
        self.text_proj = nn.Linear(spec.text_width, spec.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.grounding_head = GroundingHead(spec.width, order=order,
                                            per_query_readout=spec.grounding_per_query_readout) if grounding else None
        # made last, and only when asked for: recipes without it keep their initial weights
        self.centre_head = nn.Linear(spec.width, len(SHAPES)) if centres else None
        self.word_head = nn.Linear(spec.width, 1 + len(WORDS)) if words else None

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._encode(pixels)[0]

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(normalised image embeddings, patch tokens at LLaVA's feature layer -2 when grounding)."""
        patches = any(head is not None for head in (self.grounding_head, self.centre_head, self.word_head))
        out = self.vision(pixel_values=pixels, output_hidden_states=patches)
        # CLS (pooled) plus mean of patches: the patch tokens are what LLaVA reads, so train them too.
        img = out.pooler_output + out.last_hidden_state[:, 1:].mean(1)
        tokens = out.hidden_states[-2][:, 1:] if patches else None
        return F.normalize(self.image_proj(img), dim=-1), tokens

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(ids, mask)), dim=-1)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                neg_ids: torch.Tensor | None = None, neg_mask: torch.Tensor | None = None,
                grounding: Grounding | None = None) -> torch.Tensor:
        """CLIP loss; plus the grounding loss (`grounding.weight` x) when given."""
        img, tokens = self._encode(pixels)
        txt = self.embed_texts(ids, mask)
        neg = self.embed_texts(neg_ids, neg_mask) if neg_ids is not None else None
        loss = clip_loss(img, txt, self.logit_scale.clamp(max=np.log(100.0)).exp(), neg)
        if grounding is not None:
            g = grounding
            pair_logits, count_logits, place = self.grounding_head(tokens)
            loss = loss + g.weight * grounding_loss(pair_logits, count_logits, g.pairs, g.counts, place, g.order,
                                                    g.order_weight)
            if g.cells is not None and g.centre_weight:
                loss = loss + g.centre_weight * centre_loss(self.centre_head(tokens), g.cells.centres)
            if g.cells is not None and g.word_weight:
                loss = loss + g.word_weight * word_loss(self.word_head(tokens), g.cells.words)
        return loss


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor | float,
              neg_txt: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: matching pairs on the diagonal. `neg_txt` (hard negative
    captions) join the candidates each image chooses among, as in NegCLIP."""
    target = torch.arange(len(img), device=img.device)
    logits = scale * img @ txt.t()
    text_loss = F.cross_entropy(logits.t(), target)
    if neg_txt is not None:
        logits = torch.cat([logits, scale * img @ neg_txt.t()], dim=1)
    return (F.cross_entropy(logits, target) + text_loss) / 2


@torch.no_grad()
def binding_accuracy(model: DualEncoder, images: np.ndarray, captions: list[str],
                     tokenizer: PreTrainedTokenizerBase, spec: VisionSpec, device: str = "cpu",
                     seed: int = 0) -> dict[str, float]:
    """How often an image is closer to its caption than to the caption with one colour / shape /
    count changed (%, 50 = the tower does not see it). The stage-0 check that the tower binds
    attributes to objects, which the stage-2 questions need."""
    model.eval()
    img = torch.cat([model.embed_images(to_pixels(images[i:i + 128]).to(device)) for i in range(0, len(images), 128)])
    result = {}
    for kind in ("color", "shape", "count"):
        rng = random.Random(seed)
        pairs = [(i, perturb_caption(c, rng, kind)) for i, c in enumerate(captions)]
        pairs = [(i, neg) for i, neg in pairs if neg is not None]
        if not pairs:
            continue
        idx = [i for i, _ in pairs]
        pos = model.embed_texts(*_to(tokenize_captions(tokenizer, [captions[i] for i in idx], spec.max_text_len), device))
        neg = model.embed_texts(*_to(tokenize_captions(tokenizer, [n for _, n in pairs], spec.max_text_len), device))
        wins = ((img[idx] * pos).sum(-1) > (img[idx] * neg).sum(-1)).float().mean().item()
        result[kind] = round(100 * wins, 1)
    model.train()
    return result


def _to(t: tuple[torch.Tensor, torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return t[0].to(device), t[1].to(device)


def pretrain_records(pretrain_json: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """The image names and captions of a LLaVA-Pretrain file (its first `limit` records)."""
    with open(pretrain_json, encoding="utf-8") as f:
        records = json.load(f)[:limit]
    captions = [rec["conversations"][-1]["value"].replace(IMAGE_TOKEN, "").strip() for rec in records]
    return [rec["image"] for rec in records], captions


def load_pairs(pretrain_json: str, image_folder: str, limit: int | None = None,
               image_size: int = 96) -> tuple[np.ndarray, list[str]]:
    """All (image, caption) pairs of a LLaVA-Pretrain file: uint8 images (N, S, S, 3) and captions."""
    names, captions = pretrain_records(pretrain_json, limit)
    return read_images(image_folder, names, image_size), captions


def read_images(folder: str, names: list[str], image_size: int = 96, threads: int | None = None) -> np.ndarray:
    """uint8 RGB images (N, S, S, 3) from files under `folder`, as the LLaVA image processor with
    'pad' hands them to the tower (a square S-pixel image passes unchanged; any other is padded to a
    square and resized), so the tower pretrains on what it will see inside the VLM.

    Read by `threads` threads (None: one a core, up to 8): Pillow decodes and resizes without the GIL,
    so two read stage 0's 52000 pictures ~1.8x as fast as one (Zen 4 EPYC, 2 cores), the same pixels
    in the same order."""
    threads = threads or min(8, os.cpu_count() or 1)
    processor = ImageProcessor(crop_size=image_size, aspect="pad")

    def read(name: str) -> np.ndarray:
        with PIL.Image.open(os.path.join(folder, name)) as im:
            return processor.square_pixels(im)

    if threads <= 1 or len(names) < 256:
        return np.stack([read(name) for name in names])
    with ThreadPoolExecutor(threads) as pool:
        return np.stack(list(pool.map(read, names, chunksize=64)))


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> CLIP-normalised float NCHW (the LLaVA image processor's output for square images)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def tokenize_captions(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_len: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(captions, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


def scene_pairs(data_dir: str, split: str = "eval", image_size: int = 96) -> tuple[np.ndarray, list[str]]:
    """(images, captions) of a synth folder's `split` scenes, captioned as the pretraining set is: the
    held-out pairs of the binding check (the eval seed's scenes, never trained on)."""
    from llava.data.synth import load_scenes
    from llava.data.synth_text import caption

    scenes = load_scenes(data_dir, split)
    return read_images(data_dir, list(scenes), image_size), [caption(scene) for scene in scenes.values()]


def heldout_cells(data_dir: str, spec: VisionSpec, split: str = "eval") -> PatchCells:
    """The per-patch targets of `scene_pairs(data_dir, split)`'s scenes, in the same order."""
    from llava.data.synth import load_scenes

    return patch_cells(list(load_scenes(data_dir, split).values()), spec.image_size, spec.patch_size)


def pretrain_vision(pretrain_json: str, image_folder: str, tokenizer: PreTrainedTokenizerBase, out_dir: str,
                    spec: VisionSpec | None = None, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
                    seed: int = 0, log_every: int = 10, device: str = "cpu", hard_negatives_per_image: int = 0,
                    check_pairs: tuple[np.ndarray, list[str]] | None = None, grounding_weight: float = 0.0,
                    check_every: int = 0, order_weight: float = 0.0, centre_weight: float = 0.0,
                    word_weight: float = 0.0, check_cells: PatchCells | None = None,
                    init_from: str | None = None) -> dict:
    """Train the dual encoder, save the vision tower to `out_dir` (CLIP vision folder) and the whole dual
    encoder beside it (`DUAL_FILE`); returns a summary, with the binding accuracy on `check_pairs`
    (held-out images and captions) when given.

    `init_from`: a folder an earlier call saved; training goes on from its dual encoder, at
    `spec.image_size` (its tower's position grid resampled where the sides differ: a tower trained at
    a low resolution continues at a higher one, as FixRes and later stages of other VLM recipes do).

    grounding_weight > 0 adds the caption-grounding loss (llava.recipe.grounding) with that weight;
    its held-out scores are logged every `check_every` steps (0: at the end only). order_weight > 0
    adds its left-to-right ranking of the caption's groups (needs grounding_weight > 0); centre_weight > 0
    its per-patch readout of the shapes' centres, word_weight > 0 that of the printed word, both read from
    the images' scenes (`scenes_of`) and scored on `check_cells` (`heldout_cells`) when given."""
    spec = spec or VisionSpec()
    # the arguments are checked before the pictures are read (minutes, for the full recipe's 52000)
    if (order_weight or centre_weight or word_weight) and not grounding_weight:
        raise ValueError("order_weight, centre_weight and word_weight need the grounding head: "
                         "set grounding_weight > 0 too")
    if check_pairs is not None and check_pairs[0].shape[1:3] != (spec.image_size, spec.image_size):
        raise ValueError(f"the check images are {check_pairs[0].shape[1]} px, the tower's are {spec.image_size}: "
                         "read them with scene_pairs(..., image_size=spec.image_size)")
    seed_everything(seed)
    t0 = time.perf_counter()
    names, captions = pretrain_records(pretrain_json)
    images = read_images(image_folder, names, spec.image_size)
    ids, mask = tokenize_captions(tokenizer, captions, spec.max_text_len)
    start = spec if init_from is None else replace(spec, image_size=_tower_side(init_from))
    model = DualEncoder(len(tokenizer), start, grounding=grounding_weight > 0, order=order_weight > 0,
                        centres=centre_weight > 0, words=word_weight > 0)
    if init_from is not None:
        load_dual_encoder(model, init_from)
        if start.image_size != spec.image_size:
            resize_tower_input(model.vision, spec.image_size)
    model = model.to(device).train()
    targets = grounding_targets(captions) if grounding_weight > 0 else None
    order = caption_order(captions) if order_weight > 0 else None
    cells = (patch_cells(scenes_of(image_folder, names), spec.image_size, spec.patch_size)
             if centre_weight or word_weight else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    log = JsonlLog(os.path.join(out_dir, "metrics.jsonl"))
    neg_seed = [seed]  # a new seed per step: fresh perturbations every time a caption comes round

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        keep = int(mask[idx].sum(1).max())
        neg: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if hard_negatives_per_image:
            neg_seed[0] += 1
            negs = hard_negatives([captions[i] for i in idx], neg_seed[0], hard_negatives_per_image)
            neg = _to(tokenize_captions(tokenizer, negs, spec.max_text_len), device)
        grounding = Grounding(targets[0][idx].to(device), targets[1][idx].to(device), grounding_weight,
                              order[idx].to(device) if order is not None else None, order_weight,
                              PatchCells(*(c[idx].to(device) for c in cells)) if cells is not None else None,
                              centre_weight, word_weight) if targets else None
        return model(to_pixels(images[idx.numpy()]).to(device), ids[idx, :keep].to(device),
                     mask[idx, :keep].to(device), *neg, grounding=grounding)

    def check(step: int) -> None:
        if check_pairs and targets and check_every and step % check_every == 0 and step < steps:
            log.write(step=step, grounding=grounding_accuracy(model, *check_pairs, device, check_cells),
                      seconds=round(time.perf_counter() - t0, 2))

    train_loop(model, opt, len(images), steps, batch_size, lr, seed, log, loss_of, log_every, after_step=check, t0=t0)
    binding = binding_accuracy(model, *check_pairs, tokenizer, spec, device, seed) if check_pairs else {}
    if binding:
        log.write(step=steps, binding=binding)
    grounding = {}
    if check_pairs and targets:
        grounding = grounding_accuracy(model, *check_pairs, device, check_cells)
        log.write(step=steps, grounding=grounding)
    save_dual_encoder(model, out_dir)
    losses = [r["loss"] for r in log.rows if "loss" in r]
    return {"steps": steps, "first_loss": losses[0], "final_loss": losses[-1],
            "seconds": time.perf_counter() - t0, "pairs": len(images),
            "hard_negatives_per_image": hard_negatives_per_image, "binding_heldout": binding,
            "grounding_weight": grounding_weight, "order_weight": order_weight, "centre_weight": centre_weight,
            "word_weight": word_weight,
            "grounding_heldout": grounding}


DUAL_FILE = "dual_encoder.safetensors"  # the whole dual encoder (text side and heads too), to train it further


def save_dual_encoder(model: DualEncoder, out_dir: str) -> None:
    """The tower as a CLIP vision folder (what the VLM loads), its readouts, and the whole dual encoder
    beside them (`DUAL_FILE`, for `pretrain_vision(init_from=...)`)."""
    model.vision.cpu().save_pretrained(out_dir)
    save_readouts(model, out_dir)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, DUAL_FILE))


def _tower_side(folder: str) -> int:
    return CLIPVisionConfig.from_pretrained(folder).image_size


def load_dual_encoder(model: DualEncoder, folder: str) -> None:
    """Load the dual encoder `pretrain_vision` kept in `folder` into `model` (made with the same spec and
    heads, at the side it was trained at); one clear error where the folder has none or another shape."""
    path = os.path.join(folder, DUAL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {DUAL_FILE} in {folder}: towers trained before it was kept cannot be continued")
    try:
        model.load_state_dict(load_file(path))
    except RuntimeError as err:
        raise ValueError(f"{path} is not a dual encoder of this spec and heads: {str(err).splitlines()[0]}") from None


@torch.no_grad()
def grounding_accuracy(model: DualEncoder, images: np.ndarray, captions: list[str], device: str = "cpu",
                       cells: PatchCells | None = None) -> dict[str, float]:
    """The grounding head on held-out scenes (`grounding_scores`): what the tower's patch tokens carry;
    with the scenes' `cells`, how often a centre head's centre patches count each shape right and a word
    head reads the printed word."""
    model.eval()
    tokens = [model._encode(to_pixels(images[i:i + 128]).to(device))[1] for i in range(0, len(images), 128)]
    outs = [model.grounding_head(t) for t in tokens]
    readouts = {name: torch.cat([head(t).cpu() for t in tokens])
                for name, head in (("centres", model.centre_head), ("words", model.word_head))
                if head is not None and cells is not None}
    model.train()
    pair_logits, count_logits = (torch.cat([o[k].cpu() for o in outs]) for k in (0, 1))
    place = torch.cat([o[2].cpu() for o in outs]) if outs and outs[0][2] is not None else None
    pairs, counts = grounding_targets(captions)
    scores = grounding_scores(pair_logits, count_logits, pairs, counts, place,
                              caption_order(captions) if place is not None else None)
    if "centres" in readouts:
        scores["centre_count_accuracy"] = centre_count_accuracy(readouts["centres"], counts)
    if "words" in readouts:
        scores["word_read_accuracy"] = word_read_accuracy(readouts["words"], cells.words)
    return scores
