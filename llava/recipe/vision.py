"""Stage 0b: a tiny CLIP-style vision tower, pretrained contrastively on image-caption pairs.

The image side is a transformers `CLIPVisionModel` (saved as a standard CLIP vision folder,
so the trainer loads it like openai/clip-vit-*); the caption side is a small transformer
encoder with masked mean pooling (thrown away after training). Loss: CLIP's symmetric InfoNCE.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerBase

from llava.recipe.common import JsonlLog, seed_everything, train_loop
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


def vision_config(spec: VisionSpec) -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.width,
                            intermediate_size=4 * spec.width, num_hidden_layers=spec.layers,
                            num_attention_heads=spec.heads, projection_dim=spec.embed_dim)


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


class DualEncoder(nn.Module):
    """CLIP: two towers, two projections into a shared space, a learnable temperature."""

    def __init__(self, vocab_size: int, spec: VisionSpec) -> None:
        super().__init__()
        self.vision = CLIPVisionModel(vision_config(spec))
        self.text = TextEncoder(vocab_size, spec)
        self.image_proj = nn.Linear(spec.width, spec.embed_dim, bias=False)
        self.text_proj = nn.Linear(spec.text_width, spec.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixels)
        # CLS (pooled) plus mean of patches: the patch tokens are what LLaVA reads, so train them too.
        img = out.pooler_output + out.last_hidden_state[:, 1:].mean(1)
        img = F.normalize(self.image_proj(img), dim=-1)
        txt = F.normalize(self.text_proj(self.text(ids, mask)), dim=-1)
        return clip_loss(img, txt, self.logit_scale.clamp(max=np.log(100.0)).exp())


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: matching pairs on the diagonal."""
    logits = scale * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def load_pairs(pretrain_json: str, image_folder: str, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """All (image, caption) pairs of a LLaVA-Pretrain file: uint8 images (N, H, W, 3) and captions."""
    with open(pretrain_json, encoding="utf-8") as f:
        records = json.load(f)[:limit]
    images, captions = [], []
    for rec in records:
        with PIL.Image.open(os.path.join(image_folder, rec["image"])) as im:
            images.append(np.asarray(im.convert("RGB")))
        captions.append(rec["conversations"][-1]["value"].replace(IMAGE_TOKEN, "").strip())
    return np.stack(images), captions


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> CLIP-normalised float NCHW (the LLaVA image processor's output for square images)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def tokenize_captions(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_len: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(captions, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


def pretrain_vision(pretrain_json: str, image_folder: str, tokenizer: PreTrainedTokenizerBase, out_dir: str,
                    spec: VisionSpec | None = None, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
                    seed: int = 0, log_every: int = 10, device: str = "cpu") -> dict:
    """Train the dual encoder, save the vision tower to `out_dir` (CLIP vision folder); returns a summary."""
    spec = spec or VisionSpec()
    seed_everything(seed)
    t0 = time.perf_counter()
    images, captions = load_pairs(pretrain_json, image_folder)
    ids, mask = tokenize_captions(tokenizer, captions, spec.max_text_len)
    model = DualEncoder(len(tokenizer), spec).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    log = JsonlLog(os.path.join(out_dir, "metrics.jsonl"))

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        keep = int(mask[idx].sum(1).max())
        return model(to_pixels(images[idx.numpy()]).to(device), ids[idx, :keep].to(device),
                     mask[idx, :keep].to(device))

    train_loop(model, opt, len(images), steps, batch_size, lr, seed, log, loss_of, log_every, t0=t0)
    model.vision.cpu().save_pretrained(out_dir)
    return {"steps": steps, "first_loss": log.rows[0]["loss"], "final_loss": log.rows[-1]["loss"],
            "seconds": time.perf_counter() - t0, "pairs": len(images)}
