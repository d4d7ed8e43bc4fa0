"""CLIP-style image preprocessing with PIL + numpy (no torchvision); loading is in image_io.py.

Numerics follow transformers' PIL image-processor backend (the one upstream LLaVA used via
CLIPImageProcessor): PIL resize on uint8, float64 rescale by 1/255 then float32, float32
normalisation. That makes our pixel tensors bit-identical to transformers', so checkpoints
see exactly the inputs they were trained and evaluated on.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from llava.errors import ImageError, ImageNotFound  # re-exported: raised by the loaders
from llava.processing.anyres import Size, parse_pinpoints, select_best_resolution
from llava.processing.image_io import image_to_base64, load_image, max_pixels, to_rgb  # re-exported

__all__ = ["ASPECTS", "CLIP_MEAN", "CLIP_STD", "RESIZE_MODES", "V16_PINPOINTS", "ImageError", "ImageNotFound",
           "ImageProcessor", "bounded_resize", "divide_to_patches", "expand2square", "image_to_base64",
           "load_image", "max_pixels", "resize_and_pad", "to_rgb"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest_edge", "square")
ASPECTS = ("pad", "square", "anyres")
V16_PINPOINTS: tuple[Size, ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

# Memory guards for extreme images; ordinary photos never hit them, so their tensors stay
# bit-identical to transformers'. A shortest-edge resize bigger than _MAX_RESIZE_PIXELS (aspect
# ratio > ~148:1 at 336) computes only the centre crop (within 2 grey levels); PIL's horizontal-pass
# temporary (new width x old height) stays under _MAX_TEMP_PIXELS by first box-averaging rows of a
# very tall image; 'pad' first shrinks (area average) an image more than 4:1 whose square canvas
# would exceed _MAX_PAD_PIXELS (a 1x100000 strip: 30 GB) to a long side of 8192.
_MAX_RESIZE_PIXELS = 1 << 24
_MAX_TEMP_PIXELS = 1 << 26
_MAX_PAD_PIXELS = 1 << 26
_SUPPORT = 5  # source pixels beyond any PIL filter's reach (LANCZOS 3, MKS2021 4.5), per unit scale


def bounded_resize(img: PIL.Image.Image, size: Size, resample: int) -> PIL.Image.Image:
    """img.resize(size), but a very tall image is row-averaged first so PIL's W x h temporary stays
    bounded (a 1x10^7 image would need 10 GB); identical to img.resize otherwise."""
    height, (new_w, new_h) = img.size[1], size
    if new_w * height > _MAX_TEMP_PIXELS and height >= 2 * new_h:
        factor = min(height // new_h, math.ceil(new_w * height / _MAX_TEMP_PIXELS))
        img = img.reduce((1, factor))
    return img.resize(size, resample=resample)


def _padded_square(img: PIL.Image.Image, background: tuple[int, int, int]) -> PIL.Image.Image:
    """expand2square, box-averaging first an elongated image whose canvas would be huge. Up to 4:1
    the canvas is at most 4x the image (already bounded when loaded) and nothing changes."""
    width, height = img.size
    side = max(width, height)
    if side * side > max(4 * width * height, _MAX_PAD_PIXELS):
        scale = math.isqrt(_MAX_PAD_PIXELS) / side
        img = img.resize((max(1, round(width * scale)), max(1, round(height * scale))), PIL.Image.BOX)
    return expand2square(img, background)


def _crop_of_resize(img: PIL.Image.Image, size: Size, crop: int, resample: int) -> PIL.Image.Image:
    """The centre `crop` of the long side of img.resize(size), without building the resized image.

    PIL resizes horizontally, then vertically; each pass is reproduced on only the source rows
    (or columns) the crop needs; results match the full resize within 2 grey levels (box rounding).
    """
    (width, height), (new_w, new_h) = img.size, size
    tall = new_h >= new_w
    long_in, long_out = (height, new_h) if tall else (width, new_w)
    start = (long_out - crop) // 2
    scale = long_in / long_out
    margin = _SUPPORT * max(scale, 1.0) + 2
    lo = max(0, math.floor(start * scale - margin))
    hi = min(long_in, math.ceil((start + crop) * scale + margin))
    box_lo, box_hi = start * scale - lo, (start + crop) * scale - lo
    if tall:
        part = img.crop((0, lo, width, hi))
        part = part if width == new_w else part.resize((new_w, hi - lo), resample=resample)
        return part.resize((new_w, crop), resample=resample, box=(0, box_lo, new_w, box_hi))
    part = img.crop((lo, 0, hi, height)).resize((crop, height), resample=resample, box=(box_lo, 0, box_hi, height))
    return part if height == new_h else part.resize((crop, new_h), resample=resample)


def expand2square(img: PIL.Image.Image, background: tuple[int, int, int]) -> PIL.Image.Image:
    """Centre the image on a square canvas of its long side (v1.5 'pad'), keeping all content."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = PIL.Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_and_pad(img: PIL.Image.Image, target: Size, resample: int) -> PIL.Image.Image:
    """Fit inside target (width, height) keeping aspect, centred on black (AnyRes, facts 4.3)."""
    width, height = img.size
    target_w, target_h = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    canvas = PIL.Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(bounded_resize(img, (new_w, new_h), resample), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def divide_to_patches(img: PIL.Image.Image, patch: int) -> list[PIL.Image.Image]:
    """Row-major patch×patch crops."""
    width, height = img.size
    return [img.crop((x, y, x + patch, y + patch)) for y in range(0, height, patch) for x in range(0, width, patch)]


@dataclass
class ImageProcessor:
    """Turns PIL images into the pixel tensors the vision tower expects."""

    crop_size: int = 336
    resize_mode: str = "shortest_edge"  # CLIP: shortest edge + centre crop; "square": SigLIP squash
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = PIL.Image.BICUBIC
    aspect: str = "pad"  # pad (v1.5) | square (processor only) | anyres (v1.6)
    pinpoints: list[Size] | None = None  # (width, height) resolutions for anyres
    shortest_edge: int | None = None  # resize target when it differs from crop_size (rare)
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}; expected one of {', '.join(RESIZE_MODES)}")
        if self.aspect not in ASPECTS:
            raise ValueError(f"unknown image aspect {self.aspect!r}; expected one of {', '.join(ASPECTS)}")
        self.mean = tuple(float(x) for x in self.mean)
        self.std = tuple(float(x) for x in self.std)
        if self.pinpoints is not None:
            self.pinpoints = parse_pinpoints(self.pinpoints, self.crop_size)
        if self.aspect == "anyres" and not self.pinpoints:
            raise ValueError("aspect 'anyres' needs pinpoints (the candidate grid resolutions)")

    @property
    def background(self) -> tuple[int, int, int]:
        """Padding colour for 'pad': the mean pixel, truncated like the original ((122,116,104) for CLIP)."""
        return tuple(int(x * 255) for x in self.mean)

    @property
    def _resize_edge(self) -> int:
        return self.shortest_edge or self.crop_size

    def _resize(self, img: PIL.Image.Image) -> PIL.Image.Image:
        if self.resize_mode == "square":
            size = (self.crop_size, self.crop_size)
        else:
            # transformers' get_resize_output_image_size: the long side is truncated, not rounded.
            width, height = img.size
            edge = self._resize_edge
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(edge * long / short)
            size = (edge, new_long) if width <= height else (new_long, edge)
            if size[0] * size[1] > _MAX_RESIZE_PIXELS and new_long > self.crop_size:
                return _crop_of_resize(img, size, self.crop_size, self.resample)
        return img if img.size == size else bounded_resize(img, size, self.resample)

    def _center_crop(self, arr: np.ndarray) -> np.ndarray:
        """Centre crop HWC uint8; zero-pad first if smaller (as transformers does)."""
        crop = self.crop_size
        height, width = arr.shape[:2]
        if height < crop or width < crop:
            new_h, new_w = max(crop, height), max(crop, width)
            top, left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
            padded = np.zeros((new_h, new_w, arr.shape[2]), dtype=arr.dtype)
            padded[top:top + height, left:left + width] = arr
            arr, height, width = padded, new_h, new_w
        top, left = (height - crop) // 2, (width - crop) // 2
        return arr[top:top + crop, left:left + crop]

    def square_pixels(self, img: PIL.Image.Image) -> np.ndarray:
        """One image as the [S, S, 3] uint8 pixels the tower sees, before rescale and normalise:
        padded to a square first under 'pad', then resized (and centre-cropped)."""
        img = to_rgb(img)
        if self.aspect == "pad":
            img = _padded_square(img, self.background)
        return self._resized_pixels(img)

    def _resized_pixels(self, img: PIL.Image.Image) -> np.ndarray:
        arr = np.asarray(self._resize(to_rgb(img)), dtype=np.uint8)
        return self._center_crop(arr) if self.resize_mode == "shortest_edge" else arr

    def preprocess(self, img: PIL.Image.Image) -> Tensor:
        """One image -> [3, S, S] float32: resize, (centre crop), rescale, normalise."""
        arr = self._resized_pixels(img)
        x = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def anyres_crops(self, img: PIL.Image.Image) -> list[PIL.Image.Image]:
        """[base squashed to S×S] + row-major tiles of the image resized-and-padded to the best grid."""
        best = select_best_resolution(img.size, self.pinpoints)
        padded = resize_and_pad(img, best, self.resample)
        base = bounded_resize(img, (self._resize_edge, self._resize_edge), self.resample)
        return [base] + divide_to_patches(padded, self.crop_size)

    def __call__(self, images: PIL.Image.Image | Sequence[PIL.Image.Image]) -> tuple[list[Tensor], list[Size]]:
        """Per image a [crops, 3, S, S] tensor (1 crop unless anyres) and its original (W, H).

        Non-RGB images are converted by `to_rgb` (16-bit and float modes scaled, not clipped).
        """
        if isinstance(images, PIL.Image.Image):
            images = [images]
        tensors, sizes = [], []
        for i, img in enumerate(images):
            img = to_rgb(img, f"image {i}")
            sizes.append(img.size)
            if self.aspect == "anyres":
                crops = self.anyres_crops(img)
            elif self.aspect == "pad":
                crops = [_padded_square(img, self.background)]
            else:
                crops = [img]
            tensors.append(torch.stack([self.preprocess(c) for c in crops]))
        return tensors, sizes

    # transformers preprocessor_config.json ----------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_dict: str | os.PathLike | dict, **overrides: Any) -> ImageProcessor:
        """Read a CLIP / SigLIP / Llava / LlavaNext preprocessor_config.json (file, folder or dict).

        NeXT pinpoints are stored (height, width) and are swapped to our (width, height).
        The aspect mode is not in these files except implicitly (LlavaNext -> anyres, Llava's
        do_pad); otherwise it stays 'pad' unless overridden (it belongs to the model config).
        """
        if isinstance(path_or_dict, dict):
            cfg = dict(path_or_dict)
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "preprocessor_config.json"
            if not path.is_file():
                raise FileNotFoundError(f"preprocessor config not found: {path}")
            cfg = json.loads(path.read_text())

        kind = str(cfg.get("image_processor_type", ""))
        size = cfg.get("size") or {}
        crop = cfg.get("crop_size")
        args: dict[str, Any] = {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if "shortest_edge" in size and cfg.get("do_center_crop", True):
            args["resize_mode"] = "shortest_edge"
            if isinstance(crop, dict):
                crop = crop.get("height", crop.get("width"))
            args["crop_size"] = int(crop or size["shortest_edge"])
            if int(size["shortest_edge"]) != args["crop_size"]:
                args["shortest_edge"] = int(size["shortest_edge"])
        elif "height" in size or "shortest_edge" in size:
            args["resize_mode"] = "square"
            args["crop_size"] = int(size.get("height", size.get("shortest_edge")))
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std"), ("resample", "resample"),
                             ("rescale_factor", "rescale_factor")):
            if cfg.get(theirs) is not None:
                args[ours] = cfg[theirs]
        if cfg.get("image_grid_pinpoints"):
            args["pinpoints"] = [(w, h) for h, w in parse_pinpoints(cfg["image_grid_pinpoints"])]
        if "LlavaNext" in kind or (args.get("pinpoints") and "LlavaImageProcessor" not in kind):
            args["aspect"] = "anyres"
            args.setdefault("pinpoints", list(V16_PINPOINTS))  # LlavaNextImageProcessor's default
        elif "LlavaImageProcessor" in kind and "do_pad" in cfg:
            args["aspect"] = "pad" if cfg["do_pad"] else "square"
        args.update(overrides)
        return cls(**args)

    def to_preprocessor_config(self) -> dict[str, Any]:
        """A transformers preprocessor_config.json dict (AutoImageProcessor-loadable).

        pad/square -> LlavaImageProcessor (CLIP's keys plus do_pad, which is the same
        expand2square, so the aspect survives a round trip); anyres -> LlavaNextImageProcessor.
        """
        kind = "LlavaNextImageProcessor" if self.aspect == "anyres" else "LlavaImageProcessor"
        if self.resize_mode == "square":
            size: dict[str, int] = {"height": self.crop_size, "width": self.crop_size}
        else:
            size = {"shortest_edge": self._resize_edge}
        cfg: dict[str, Any] = {
            "image_processor_type": kind,
            "do_resize": True,
            "size": size,
            "resample": int(self.resample),
            "do_center_crop": self.resize_mode == "shortest_edge",
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }
        if self.aspect != "anyres":
            cfg["do_pad"] = self.aspect == "pad"
        else:
            cfg["image_grid_pinpoints"] = [[h, w] for w, h in self.pinpoints]
            cfg["do_pad"] = True  # NeXT's do_pad pads the crop count for batching, not the image
        return cfg

