"""Checkpoints: the llava-hf and original layouts (full, projector-only, LoRA), one loader for all."""

from llava.checkpoint.io import CheckpointMismatch
from llava.checkpoint.loader import (LAYOUTS, LoadedCheckpoint, convert, describe, detect_layout, load_checkpoint,
                                     save_checkpoint)
from llava.checkpoint.tokenizer import load_tokenizer

__all__ = ["LAYOUTS", "CheckpointMismatch", "LoadedCheckpoint", "convert", "describe", "detect_layout",
           "load_checkpoint", "load_tokenizer", "save_checkpoint"]
