"""Checkpoints that need a base model: projector-only (stage 1) and LoRA (original layout).

Projector-only: `config.json` + `mm_projector.bin`; the language model comes from the base.
LoRA: `config.json` + `adapter_config.json` + `adapter_model.(bin|safetensors)` +
`non_lora_trainables.bin` (projector etc., PEFT-prefixed); merged into the base with PEFT's
public API. The base may be a plain causal LM folder (e.g. vicuna) or a full LLaVA folder in
either layout. Which kind a folder is comes from its files, never its name (the original's
name tests misroute LoRA folders without "lora" in their name).
"""

from __future__ import annotations

import os

from torch import nn

from llava.checkpoint import keys
from llava.checkpoint.hf import is_hf_config
from llava.checkpoint.io import load_torch_file, load_weights_file, read_json_object
from llava.checkpoint.original import from_original_config, is_original_config, read_config
from llava.checkpoint.stored import read_state_dict
from llava.config import LlavaConfig
from llava.errors import CheckpointError, CheckpointMismatch, MissingDependency

PROJECTOR_FILE = "mm_projector.bin"
NON_LORA_FILE = "non_lora_trainables.bin"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_base(model_base: str) -> keys.StateDict:
    """All weights of a base folder in our names: a plain LM's, or a LLaVA base's (LM, tower,
    projector), which the checkpoint's own projector then replaces."""
    cfg = read_config(model_base)
    raw = read_state_dict(model_base)
    if is_hf_config(cfg):
        state = keys.from_hf(raw)
    elif is_original_config(cfg):
        state = keys.from_original(raw)
    else:  # a plain causal LM: its names are the LM's own
        state = {"language_model." + k: v for k, v in raw.items() if not k.endswith(keys.DROP_SUFFIXES)}
    return state


def overlay(base: keys.StateDict, ours: keys.StateDict) -> keys.StateDict:
    """`base` updated with `ours`; a projector or tower in `ours` replaces the base's whole
    (so a base with another projector type leaves no stray weights behind)."""
    replaced = tuple(f"{part}." for part in ("projector", "vision_tower")
                     if any(k.startswith(f"{part}.") for k in ours))
    return {k: v for k, v in base.items() if not (replaced and k.startswith(replaced))} | ours


def read_projector_only(path: str, model_base: str, vision_tower: str | None = None
                        ) -> tuple[LlavaConfig, keys.StateDict]:
    """Config from `path`, LM from `model_base`, projector from `path/mm_projector.bin`."""
    cfg = read_config(path)
    projector = load_torch_file(os.path.join(path, PROJECTOR_FILE))
    # The original keeps keys containing mm_projector; with im_start/end the file also holds embed_tokens.
    kept = {k: v for k, v in projector.items() if "mm_projector" in k or k.endswith("embed_tokens.weight")}
    if not any("mm_projector" in k for k in kept):
        raise CheckpointMismatch(f"{os.path.join(path, PROJECTOR_FILE)} holds no mm_projector weights "
                                 f"(found {sorted(projector)[:8]})")
    state = overlay(read_base(model_base), keys.from_original(kept))
    return from_original_config(cfg, vision_tower, state), state


def strip_peft_prefix(state: keys.StateDict) -> keys.StateDict:
    """The original's renaming of non_lora_trainables: drop `base_model.`, then one `model.`
    from every key if any key starts `model.model.`."""
    state = {(k[len("base_model."):] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


def read_lora(path: str, model_base: str, vision_tower: str | None = None) -> tuple[LlavaConfig, keys.StateDict]:
    """Config from `path`, LM from `model_base`, non-LoRA trainables (projector) from `path`.

    The LoRA deltas themselves are applied to the built model by `merge_lora`.
    """
    cfg = read_config(path)
    state = read_base(model_base)
    non_lora_path = os.path.join(path, NON_LORA_FILE)
    if os.path.isfile(non_lora_path):
        state = overlay(state, keys.from_original(strip_peft_prefix(load_torch_file(non_lora_path))))
    return from_original_config(cfg, vision_tower, state), state


def merge_lora(language_model: nn.Module, adapter_dir: str) -> nn.Module:
    """Apply a PEFT LoRA adapter to the language model and merge it in (W += scale * B @ A).

    Adapter keys are named after the original's LlavaLlamaForCausalLM, whose LM weights have
    the same names as a plain causal LM, so the adapter fits our language model as is.
    Adapter tensors that match no module are an error, not a silent no-op.
    """
    try:
        from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    except ImportError:
        raise MissingDependency("merging a LoRA checkpoint needs peft: pip install peft") from None
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    read_json_object(config_path, "a PEFT adapter config")  # a bad file named, before peft's unnamed error
    try:
        config = PeftConfig.from_pretrained(adapter_dir)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{config_path} is not a PEFT adapter config ({type(err).__name__}: {err})") from None
    config.inference_mode = True
    # Read here rather than by peft, so a truncated or corrupt file is named.
    weights_path = next(p for name in ADAPTER_WEIGHTS if os.path.isfile(p := os.path.join(adapter_dir, name)))
    adapter_state = load_weights_file(weights_path)
    try:
        peft_model = PeftModel(language_model, config)
        result = set_peft_model_state_dict(peft_model, adapter_state)
    except (RuntimeError, ValueError) as err:
        raise CheckpointMismatch(f"LoRA adapter in {adapter_dir} does not fit the base model: {err}") from None
    if result.unexpected_keys:
        raise CheckpointMismatch(f"LoRA adapter in {adapter_dir} has {len(result.unexpected_keys)} weights the base "
                                 f"model has no place for: {result.unexpected_keys[:8]}")
    return peft_model.merge_and_unload()
