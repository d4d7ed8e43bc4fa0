"""The LLaVA model: vision tower -> projector -> causal language model, merged at one point.

The language model is any transformers causal LM, driven only through its public API
(`inputs_embeds`, `attention_mask`, `position_ids`, `cache`). Images enter the sequence as
runs of placeholder ids (`config.image_token_index`); `embed` swaps those rows for image
features after checking that the counts agree. Nothing else in the package splices.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from llava.config import LlavaConfig
from llava.errors import ImageTokenMismatch  # re-exported: raised here
from llava.model.anyres import anyres_feature_count, merge_anyres_features
from llava.model.projector import build_projector
from llava.model.vision import build_vision_tower, select_features

Size = tuple[int, int]  # (width, height)



class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig, language_model: PreTrainedModel | None = None,
                 vision_tower: PreTrainedModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower if vision_tower is not None else build_vision_tower(config.vision_config)
        self.projector = build_projector(config.projector_type, config.vision_hidden_size, config.hidden_size)
        self.language_model = (language_model if language_model is not None
                               else AutoModelForCausalLM.from_config(config.text_config))
        self.image_newline = None
        if "unpad" in config.mm_patch_merge_type:
            self.add_image_newline()

    def add_image_newline(self) -> None:
        """A fresh image newline (spatial_unpad's row separator), scaled like an embedding."""
        hidden = self.config.hidden_size
        self.image_newline = nn.Parameter(torch.randn(hidden) / hidden**0.5)

    # Properties ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    def input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    # Images ---------------------------------------------------------------------------------
    def image_token_count(self, image_size: Size) -> int:
        """How many placeholder tokens one image of this (width, height) becomes."""
        c = self.config
        if c.image_aspect_ratio != "anyres":
            newline = 1 if "unpad" in c.mm_patch_merge_type else 0
            return c.tokens_per_crop + (newline if c.mm_patch_merge_type != "flat" else 0)
        return anyres_feature_count(image_size, c.image_grid_pinpoints, c.image_size, c.patches_per_side,
                                    merge_type=c.mm_patch_merge_type, rounding=c.anyres_rounding)

    def encode_images(self, pixel_values: Sequence[torch.Tensor], image_sizes: Sequence[Size]) -> list[torch.Tensor]:
        """Per image, a [n_tokens, hidden] tensor of projected (and, for anyres, merged) features.

        All crops of all images go through the tower in one batch. The tower runs without
        gradients when it is frozen, so stage 1/2 training spends nothing on it.
        """
        if len(pixel_values) != len(image_sizes):
            raise ValueError(f"{len(pixel_values)} pixel tensors but {len(image_sizes)} image sizes")
        if len(pixel_values) == 0:
            return []
        crops_per_image = [int(p.shape[0]) for p in pixel_values]
        crops = torch.cat(list(pixel_values), dim=0).to(self.vision_tower.device)
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats = select_features(self.vision_tower, crops, self.config.vision_feature_layer,
                                    self.config.vision_feature_select)
        proj_dtype = next(self.projector.parameters(), feats).dtype
        feats = self.projector(feats.to(proj_dtype))
        out = []
        for image_feats, size in zip(torch.split(feats, crops_per_image), image_sizes):
            if self.config.mm_patch_merge_type == "flat":
                out.append(image_feats.flatten(0, 1))
            else:
                newline = self.image_newline.to(image_feats.dtype) if self.image_newline is not None else None
                out.append(merge_anyres_features(
                    image_feats, size, self.config.image_grid_pinpoints or [], self.config.image_size,
                    merge_type=self.config.mm_patch_merge_type, image_newline=newline,
                    rounding=self.config.anyres_rounding))
        return out

    # The merge point --------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_features: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with every placeholder row replaced by the next image feature row."""
        is_image = input_ids == self.config.image_token_index
        n_slots = int(is_image.sum())
        n_feats = sum(int(f.shape[0]) for f in image_features) if image_features else 0
        if n_slots != n_feats:
            raise ImageTokenMismatch(
                f"the prompt has {n_slots} image placeholder tokens but the images give {n_feats} feature rows "
                f"({len(image_features or [])} image(s)); each <image> must be expanded to its image's token count")
        # Placeholder ids may lie outside the vocabulary (the original's -200): embed a valid id there.
        safe_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.input_embeddings()(safe_ids)
        if n_slots:
            feats = torch.cat(list(image_features), dim=0).to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats)
        elif self.training and any(p.requires_grad for p in self.projector.parameters()):
            # A text-only batch must still touch the projector: in stage 1 it is the only trainable
            # part (no graph otherwise), and DDP/FSDP need every rank to reduce the same parameters.
            empty = embeds.new_zeros(0, self.config.vision_hidden_size)
            embeds = embeds + self.projector(empty).sum()
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: Sequence[torch.Tensor] | None = None,
                image_sizes: Sequence[Size] | None = None, image_features: Sequence[torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **lm_kwargs: Any):
        """Full forward; pass `pixel_values` (+ sizes) or precomputed `image_features`, not both."""
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("pass pixel_values or image_features, not both")
            sizes = image_sizes if image_sizes is not None else [(self.config.image_size,) * 2] * len(pixel_values)
            image_features = self.encode_images(pixel_values, sizes)
        embeds = self.embed(input_ids, image_features)
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   labels=labels, **lm_kwargs)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding safe)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
