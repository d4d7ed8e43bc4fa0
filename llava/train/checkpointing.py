"""What a run writes: resumable checkpoints (atomically) and the final model folder.

Checkpoints: `OUT/checkpoint-{step}/` holding the trainable weights, the optimizer and
scheduler states, each process's RNG states and `state.json` (step, epoch, config, data
hash). A checkpoint is written into `OUT/.tmp-checkpoint-{step}/`, fsynced, marked
complete and then renamed into place with `os.replace`, so a run killed at any moment
leaves either the old latest checkpoint or the new one, never half of one; folders without
the marker (and temp folders) are ignored and cleaned up on resume.

Final outputs (see `write_final`): a llava-hf folder (or the original layout) for
full-model stages, plus `mm_projector.bin` + `projector.safetensors` for stage 1; the
original LoRA layout for LoRA/QLoRA, which `load_checkpoint(OUT, model_base=BASE)` and
`llava convert OUT DST --model-base BASE` merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llava.checkpoint import keys
from llava.checkpoint.hf import save_hf, save_hf_processor
from llava.checkpoint.original import save_original, to_original_config
from llava.checkpoint.partial import NON_LORA_FILE
from llava.checkpoint.paths import existing_ancestor
from llava.checkpoint.tokenizer import save_tokenizer
from llava.errors import OutputPathError

COMPLETE = "COMPLETE"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"


# Files -------------------------------------------------------------------------------------------
def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str, data: Any, indent: int | None = 2) -> None:
    """Write via a temp file + rename, so readers never see half a JSON file (`indent=None`: one line)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


# Finding checkpoints ----------------------------------------------------------------------------
def check_output_dir(out: str) -> None:
    """Refuse an output folder that cannot be created or written, before any model is loaded.

    Otherwise a typo such as `--out results.json/run` fails with a `NotADirectoryError`
    only after the model has been built (or, for a read-only parent, hours later at the
    first checkpoint).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputPathError(f"output folder {out} exists and is a file, not a folder")
    existing = existing_ancestor(out)  # the folder is created in it
    if not os.path.isdir(existing):
        raise OutputPathError(f"output folder {out} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {out} cannot be written: no write permission in {existing}")


def make_output_dir(out: str) -> None:
    """`os.makedirs(out)`, with a failure (a race with `check_output_dir`, a full disk) naming the folder."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"output folder {out} cannot be created: {err.strerror or err}") from err


def complete_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint in `out`, oldest first."""
    if not os.path.isdir(out):
        return []
    found = []
    for name in os.listdir(out):
        match = _CKPT_RE.match(name)
        folder = os.path.join(out, name)
        if match and os.path.isfile(os.path.join(folder, COMPLETE)):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def latest_checkpoint(out: str) -> str | None:
    found = complete_checkpoints(out)
    return found[-1][1] if found else None


def remove_incomplete(out: str) -> list[str]:
    """Delete temp folders and checkpoint folders without the completion marker (left by a kill)."""
    removed = []
    if not os.path.isdir(out):
        return removed
    for name in os.listdir(out):
        folder = os.path.join(out, name)
        partial = name.startswith((_TMP_PREFIX, ".trash-")) or (
            _CKPT_RE.match(name) and not os.path.isfile(os.path.join(folder, COMPLETE)))
        if partial and os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(name)
    return removed


def discard(folder: str) -> None:
    """Remove a folder so that no half-deleted copy is ever visible under its name."""
    trash = os.path.join(os.path.dirname(folder), f".trash-{os.path.basename(folder)}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


# Writing checkpoints ----------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tmp_checkpoint_dir(out: str, step: int) -> str:
    return os.path.join(out, f"{_TMP_PREFIX}{step}")


def write_rng(folder: str, rank: int) -> None:
    path = os.path.join(folder, f"rng-{rank}.pt")
    torch.save(rng_state(), path)
    _fsync_file(path)


def write_checkpoint_files(folder: str, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                           scheduler_state: dict, state: dict[str, Any]) -> None:
    """The main process's part of a checkpoint, written into the temp folder."""
    save_file(_contiguous(trainable), os.path.join(folder, TRAINABLE_FILE))
    torch.save(optimizer_state, os.path.join(folder, "optimizer.pt"))
    torch.save(scheduler_state, os.path.join(folder, "scheduler.pt"))
    write_json(os.path.join(folder, STATE_FILE), state)
    for name in (TRAINABLE_FILE, "optimizer.pt", "scheduler.pt"):
        _fsync_file(os.path.join(folder, name))


def publish_checkpoint(out: str, step: int, save_total_limit: int | None) -> str:
    """Mark the temp folder complete, rename it to `checkpoint-{step}` and prune old ones."""
    tmp = tmp_checkpoint_dir(out, step)
    with open(os.path.join(tmp, COMPLETE), "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = os.path.join(out, f"checkpoint-{step}")
    if os.path.exists(final):  # a resumed run saving the same step again
        discard(final)
    os.replace(tmp, final)
    _fsync_dir(out)
    if save_total_limit:
        for _, old in complete_checkpoints(out)[:-save_total_limit]:
            discard(old)
    return final


# Reading checkpoints ----------------------------------------------------------------------------
def read_state(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)


def read_trainable(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, TRAINABLE_FILE))


def read_optimizer(folder: str) -> tuple[dict, dict]:
    opt = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
    sched = torch.load(os.path.join(folder, "scheduler.pt"), map_location="cpu", weights_only=True)
    return opt, sched


def read_rng(folder: str, rank: int) -> dict[str, Any] | None:
    path = os.path.join(folder, f"rng-{rank}.pt")
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# Final outputs -----------------------------------------------------------------------------------
def _unpeft(name: str) -> str:
    """Our name for a parameter of a peft-wrapped language model (`language_model.base_model.model.X`)."""
    prefix = "language_model.base_model.model."
    return "language_model." + name[len(prefix):] if name.startswith(prefix) else name


def _write_common(model, tokenizer, image_processor, out: str) -> None:
    save_tokenizer(tokenizer, out)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(image_processor.to_preprocessor_config(), f, indent=2)


def write_full(model, state: dict[str, torch.Tensor], tokenizer, image_processor, out: str,
               layout: str = "hf") -> None:
    """A full checkpoint from a (gathered) state dict in our names, as `save_checkpoint` writes it."""
    os.makedirs(out, exist_ok=True)
    state = {_unpeft(k): v for k, v in state.items()}
    if layout == "hf":
        save_hf(state, model.config, out)
    else:
        save_original(state, model.config, out)
    _write_common(model, tokenizer, image_processor, out)
    if layout == "hf":
        save_hf_processor(out, model.config, tokenizer, image_processor)  # for transformers' AutoProcessor


def write_projector(state: dict[str, torch.Tensor], out: str) -> None:
    """Stage-1 projector files: the original's `mm_projector.bin` and the same keys as safetensors."""
    projector = {k: v for k, v in state.items() if k.startswith("projector.")}
    original = _contiguous(keys.to_original(projector))  # model.mm_projector.0.weight, ...
    torch.save(original, os.path.join(out, "mm_projector.bin"))
    save_file(original, os.path.join(out, "projector.safetensors"), metadata={"format": "pt"})


def write_lora(model, state: dict[str, torch.Tensor], trainable: list[str], tokenizer, image_processor, out: str,
               source: str, include_tower: bool, include_embeddings: bool) -> None:
    """The original LoRA layout: adapter_config.json + adapter_model.safetensors (peft),
    non_lora_trainables.bin (projector etc. under PEFT names), config.json (original)."""
    from peft.utils import get_peft_model_state_dict

    os.makedirs(out, exist_ok=True)
    peft_lm = model.language_model
    lm_state = {k[len("language_model."):]: v for k, v in state.items() if k.startswith("language_model.")}
    adapter = get_peft_model_state_dict(peft_lm, state_dict=lm_state, save_embedding_layers=False)
    save_file(_contiguous(adapter), os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = peft_lm.peft_config["default"]
    inference_mode, base = peft_config.inference_mode, peft_config.base_model_name_or_path
    peft_config.inference_mode, peft_config.base_model_name_or_path = True, source
    try:
        peft_config.save_pretrained(out)
    finally:
        peft_config.inference_mode, peft_config.base_model_name_or_path = inference_mode, base

    ours = {_unpeft(k): state[k] for k in trainable if "lora_" not in k}
    if include_tower:
        ours.update({k: v for k, v in state.items() if k.startswith("vision_tower.")})
    if include_embeddings:
        for k, v in state.items():
            name = _unpeft(k)
            if name.endswith(("embed_tokens.weight", "lm_head.weight")) and name.startswith("language_model."):
                ours[name] = v
    non_lora = {f"base_model.model.{k}": v for k, v in keys.to_original(ours).items()}
    torch.save(_contiguous(non_lora), os.path.join(out, NON_LORA_FILE))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(to_original_config(model.config, dtype=torch.float32), f, indent=2)
    _write_common(model, tokenizer, image_processor, out)


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for name in ("llava", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


__all__ = ["COMPLETE", "complete_checkpoints", "latest_checkpoint", "remove_incomplete", "discard", "write_json",
           "sha256_file", "tmp_checkpoint_dir", "write_rng", "write_checkpoint_files", "publish_checkpoint",
           "read_state", "read_trainable", "read_optimizer", "read_rng", "set_rng_state", "write_full",
           "write_projector", "write_lora", "library_versions"]
