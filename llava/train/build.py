"""Building the model a run trains: from a checkpoint or from parts, then frozen per stage.

Two sources: an existing LLaVA checkpoint (any layout `load_checkpoint` reads), or a plain
causal LM folder + a CLIP/SigLIP folder joined by a fresh projector (stage 1). Then the
stage decides what learns (`Stage.trains`), LoRA/QLoRA wrap the language model through
peft's public API, and gradient checkpointing goes through transformers' public switch.
Nothing here knows about processes; the loop wraps the result with its Strategy.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from llava.checkpoint import load_checkpoint, load_tokenizer
from llava.checkpoint.build import image_processor_for, resize_vocab
from llava.checkpoint.hf import to_hf_config
from llava.checkpoint.io import CheckpointMismatch, load_weights_file
from llava.checkpoint.loader import prepare_for_hf
from llava.checkpoint.tokenizer import IMAGE_TOKEN, add_special_tokens, token_id
from llava.config import LlavaConfig
from llava.errors import InputError
from llava.model.llava import LlavaModel
from llava.model.vision import load_vision_tower, resize_tower_input
from llava.processing.image import ImageProcessor
from llava.train.config import TrainConfig

PROJECTOR_FILES = ("projector.safetensors", "mm_projector.bin")
DEFAULT_TEMPLATE = "vicuna_v1"  # the original's --version v1


@dataclass
class Built:
    """A model ready to train, with what saving it later needs to know about where it came from."""

    model: LlavaModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: ImageProcessor
    convention: str  # how the dataset tokenizes <image> ("hf" or "original"), as the output's loader will
    source: str  # the LM (fresh) or checkpoint folder: the base a LoRA output merges into
    tower_is_stock: bool  # tower weights == what config.vision_tower_name loads (LoRA output may omit them)
    base_vocab: int  # LM rows before tokens were added (a LoRA output stores the embeddings if it grew)
    save_layout: str = "hf"  # "hf", "original" or "lora": what the run writes at the end


def build_model(cfg: TrainConfig) -> Built:
    """The untrained starting point of a run (CPU, fp32, train mode, nothing frozen yet)."""
    torch.manual_seed(cfg.seed)  # fresh projector / image_newline init: the same on every process
    built = _from_parts(cfg) if cfg.model is None else _from_checkpoint(cfg)
    model = built.model
    if cfg.image_size is not None and cfg.image_size != model.config.vision_config.image_size:
        built.image_processor = resize_input(model, built.image_processor, cfg.image_size)
        built.tower_is_stock = False
    if cfg.pretrain_mm_mlp_adapter:
        load_projector(model, cfg.pretrain_mm_mlp_adapter)
    inherited = model.config.template
    if cfg.stage != "pretrain" and inherited == "plain":
        inherited = None  # a stage-1 checkpoint carries `plain`; instruction tuning uses the chat template
    model.config.template = cfg.template or inherited or DEFAULT_TEMPLATE
    model.config.tokenizer_model_max_length = cfg.model_max_length  # as the original's training writes it
    if built.tokenizer.pad_token_id is None:  # the original pads with unk
        built.tokenizer.pad_token = built.tokenizer.unk_token or built.tokenizer.eos_token
    built.save_layout = output_layout(cfg, model.config)
    if built.save_layout == "hf":
        prepare_for_hf(model, built.tokenizer)  # <image> as a token now, so the vocabulary never changes mid-run
    # Tokenize <image> the way the output's loader will (llava-hf: whole prompt; original: chunks).
    built.convention = cfg.convention or ("hf" if built.save_layout == "hf" else "original")
    return built


def resize_input(model: LlavaModel, processor: ImageProcessor, side: int) -> ImageProcessor:
    """`--image-size`: the tower resampled to `side`-px pictures (`resize_tower_input`), its config and the image
    processor saying so. More pixels give more patches, so more image tokens per picture: a model trained at a low
    resolution can go on at a higher one (the tiny recipe's last phase: small objects became several patches).
    anyres is refused: its grids are in units of the tower's side."""
    if side <= 0:
        raise InputError(f"--image-size {side}: must be a positive number of pixels")
    if model.config.image_aspect_ratio == "anyres":
        raise InputError("--image-size: the checkpoint is anyres, whose grids are in units of the tower's side; "
                         "train it at its own size")
    try:
        resize_tower_input(model.vision_tower, side)
    except ValueError as err:
        raise InputError(f"--image-size: {err}") from None
    model.config.vision_config.image_size = side
    return _processor_at(processor, side)


def _processor_at(processor: ImageProcessor, side: int) -> ImageProcessor:
    """The image processor cropping `side`-px pictures, its resize edge scaled alike."""
    edge = processor.shortest_edge and round(processor.shortest_edge * side / processor.crop_size)
    return replace(processor, crop_size=side, shortest_edge=edge)


def swap_tower(model: LlavaModel, processor: ImageProcessor, path: str) -> ImageProcessor:
    """`--vision-tower` beside `--model`: the checkpoint's tower replaced by the one in `path` (the same
    tower trained further, e.g. at a higher resolution, whose side the image processor then takes, as
    with `--image-size`). The projector stays, so the two towers must be of one kind, width and depth."""
    try:
        tower = load_vision_tower(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise InputError(f"--vision-tower {path}: {str(err).splitlines()[0]}") from None
    old, new = model.vision_tower.config, tower.config
    shape = ("model_type", "hidden_size", "num_hidden_layers", "patch_size")
    if any(getattr(old, k) != getattr(new, k) for k in shape):
        raise InputError(f"--vision-tower {path}: its tower ({', '.join(f'{k} {getattr(new, k)}' for k in shape)}) "
                         f"is not the checkpoint's ({', '.join(f'{k} {getattr(old, k)}' for k in shape)}), whose "
                         "features the projector reads")
    side = new.image_size
    if side != old.image_size and model.config.image_aspect_ratio == "anyres":
        raise InputError(f"--vision-tower {path}: {side} px, the checkpoint's tower {old.image_size}; the checkpoint "
                         "is anyres, whose grids are in units of the tower's side")
    model.vision_tower = tower.to(next(model.vision_tower.parameters()).dtype)
    model.config.vision_config = new
    model.config.vision_tower_name = os.path.abspath(path)
    return _processor_at(processor, side)


def output_layout(cfg: TrainConfig, config: LlavaConfig) -> str:
    """"lora", "hf" or "original": `--save-layout auto` is hf where the llava-hf layout can hold the model."""
    if cfg.stage_spec.output == "lora":
        return "lora"
    if cfg.save_layout != "auto":
        if cfg.save_layout == "hf":
            try:
                to_hf_config(config)
            except ValueError as err:
                raise ValueError(f"this model cannot be saved in the llava-hf layout ({err}); "
                                 "pass --save-layout original") from None
        return cfg.save_layout
    try:
        to_hf_config(config)
        return "hf"
    except ValueError:
        return "original"


def _from_checkpoint(cfg: TrainConfig) -> Built:
    ckpt = load_checkpoint(cfg.model, model_base=cfg.model_base, vision_tower=cfg.vision_tower, device="cpu",
                           dtype=torch.float32)
    model, processor = ckpt.model, ckpt.image_processor
    if cfg.vision_tower is not None:
        processor = swap_tower(model, processor, cfg.vision_tower)
    image_processor = _with_aspect(model, processor, cfg)
    return Built(model.train(), ckpt.tokenizer, image_processor, ckpt.convention,
                 source=os.path.abspath(cfg.model), tower_is_stock=False,
                 base_vocab=model.input_embeddings().weight.shape[0])


def _with_aspect(model: LlavaModel, processor: ImageProcessor, cfg: TrainConfig) -> ImageProcessor:
    """The checkpoint's image processor in the asked aspect mode, written into its config too (as the
    original's trainer writes its flag), so that training sees what the saved model will; None keeps
    the checkpoint's. square <-> pad switch the processor alone; square or pad -> anyres is
    LLaVA-NeXT's own path (a 1.5-style checkpoint fine-tuned on grids of tiles): the grid
    resolutions (`--image-grid-pinpoints`, default 1.6's in units of the tower's side) and merge
    type (default spatial_unpad) go into the config, and unpadding grows a fresh image newline,
    which the finetune and lora stages train with the projector. Leaving anyres is refused: the
    model learnt its tiles and newline. On an anyres checkpoint `--image-grid-pinpoints` replaces its
    grids; the flags that would otherwise do nothing are refused rather than ignored."""
    config, aspect = model.config, cfg.image_aspect_ratio
    have = config.image_aspect_ratio
    if (aspect or have) != "anyres" and cfg.image_grid_pinpoints:
        raise InputError(f"--image-grid-pinpoints: the checkpoint is {have} and grids are anyres's; add "
                         "--image-aspect-ratio anyres (LLaVA-NeXT's fine-tuning from a 1.5-style checkpoint)")
    if aspect in (None, have):
        if cfg.mm_patch_merge_type not in (None, config.mm_patch_merge_type):
            raise CheckpointMismatch(f"--mm-patch-merge-type {cfg.mm_patch_merge_type}: the checkpoint merges "
                                     f"{config.mm_patch_merge_type}; leave the flag out")
        if have == "anyres" and cfg.image_grid_pinpoints:
            config.image_grid_pinpoints = _grid_pinpoints(cfg, processor.crop_size)
            return replace(processor, pinpoints=config.image_grid_pinpoints)
        return processor
    if {aspect, have} <= {"square", "pad"}:
        config.image_aspect_ratio = aspect
        return replace(processor, aspect=aspect)
    if aspect != "anyres":
        raise CheckpointMismatch(f"--image-aspect-ratio {aspect}: the checkpoint was trained as {have}, on grids of "
                                 f"tiles with their own merge; fine-tune it as {have} (leave the flag out)")
    merge = cfg.mm_patch_merge_type or "spatial_unpad"
    pinpoints = _grid_pinpoints(cfg, processor.crop_size)
    config.image_aspect_ratio, config.image_grid_pinpoints, config.mm_patch_merge_type = "anyres", pinpoints, merge
    config.anyres_rounding = "hf"  # unpad as transformers does: the output is llava-hf's llava_next unless asked
    if "unpad" in merge and model.image_newline is None:
        model.add_image_newline()  # seeded by build_model
    return replace(processor, aspect="anyres", pinpoints=pinpoints)


def _grid_pinpoints(cfg: TrainConfig, side: int) -> list[tuple[int, int]]:
    """`--image-grid-pinpoints`, or LLaVA-1.6's grids (336x672 ... 1008x336) in units of this tower's
    crop size; each side must be a whole number of tiles (else the processor and merge disagree)."""
    pins = [tuple(p) for p in cfg.image_grid_pinpoints or ()] or [
        (side, 2 * side), (2 * side, side), (2 * side, 2 * side), (3 * side, side), (side, 3 * side)]
    bad = [p for p in pins if p[0] % side or p[1] % side]
    if bad:
        raise InputError(f"--image-grid-pinpoints {bad}: every width and height must be a multiple of the vision "
                         f"tower's image size, {side}")
    return pins


def _from_parts(cfg: TrainConfig) -> Built:
    for what, path in (("--language-model", cfg.language_model), ("--vision-tower", cfg.vision_tower)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{what} {path}: not a folder (pass a local transformers model folder)")
    tokenizer = load_tokenizer(cfg.language_model)
    lm = AutoModelForCausalLM.from_pretrained(cfg.language_model, dtype=torch.float32)
    tower = load_vision_tower(cfg.vision_tower, dtype=torch.float32)
    anyres = cfg.image_aspect_ratio == "anyres"
    config = LlavaConfig(
        text_config=lm.config, vision_config=tower.config, projector_type=cfg.projector_type,
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select=cfg.vision_feature_select,
        image_aspect_ratio=cfg.image_aspect_ratio, mm_patch_merge_type=cfg.mm_patch_merge_type,
        image_grid_pinpoints=_grid_pinpoints(cfg, tower.config.image_size) if anyres else None,
        vision_tower_name=os.path.abspath(cfg.vision_tower), template=cfg.template,
    )
    model = LlavaModel(config, language_model=lm, vision_tower=tower)
    base_vocab = model.input_embeddings().weight.shape[0]
    add_special_tokens(tokenizer, [IMAGE_TOKEN])
    resize_vocab(model, len(tokenizer))
    model.config.image_token_index = token_id(tokenizer, IMAGE_TOKEN)
    return Built(model.train(), tokenizer, image_processor_for(model.config, cfg.vision_tower), "original",
                 source=os.path.abspath(cfg.language_model), tower_is_stock=True, base_vocab=base_vocab)


# Stage-1 projectors ------------------------------------------------------------------------------
def projector_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Projector weights under `nn.Sequential` names from any of the names they are saved under:
    the original's `model.mm_projector.0.weight`, llava-hf's `multi_modal_projector.linear_1.weight`,
    ours `projector.0.weight`, or bare `0.weight`."""
    if any("mm_projector." in k for k in state):
        return {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if any("multi_modal_projector." in k for k in state):
        index = {"linear_1": "0", "linear_2": "2"}
        out = {}
        for k, v in state.items():
            if "multi_modal_projector." in k:
                name, rest = k.split("multi_modal_projector.", 1)[1].split(".", 1)
                out[f"{index.get(name, name)}.{rest}"] = v
        return out
    if any(k.startswith("projector.") for k in state):
        return {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    return dict(state)


def load_projector(model: LlavaModel, path: str) -> None:
    """Load a stage-1 projector file (or a folder holding one) into `model.projector`."""
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in PROJECTOR_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(f"{path} holds none of {', '.join(PROJECTOR_FILES)}")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"projector file not found: {path}")
    state = load_weights_file(path)
    weights = projector_state(state)
    try:
        model.projector.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointMismatch(f"{path} does not fit this model's {model.config.projector_type} projector "
                                 f"(was it trained with the same language model and vision tower?): {err}") from None


# Stages -----------------------------------------------------------------------------------------
def prepare_for_stage(model: LlavaModel, cfg: TrainConfig, compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze, quantize and LoRA-wrap in place for `cfg.stage`; returns the trainable names."""
    stage = cfg.stage_spec
    model.requires_grad_(False)
    lm = model.language_model
    lm.config.use_cache = False
    if stage.quantize:
        from peft import prepare_model_for_kbit_training

        from llava.model.quantize import quantize_language_model

        quantize_language_model(model, stage.quantize, compute_dtype=compute_dtype)
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for users to do
            warnings.simplefilter("ignore", FutureWarning)
            lm = prepare_model_for_kbit_training(model.language_model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    if "lora" in stage.trains:
        lm = _add_lora(lm, cfg)
    elif "language_model" in stage.trains:
        lm.requires_grad_(True)
    model.language_model = lm
    if "projector" in stage.trains and not cfg.freeze_projector:
        model.projector.requires_grad_(True)
    if "image_newline" in stage.trains and model.image_newline is not None:
        model.image_newline.requires_grad_(True)
    if cfg.unfreeze_vision_tower:
        model.vision_tower.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"stage {stage.name!r} leaves nothing to train (is --freeze-projector set?)")
    return names


def enable_gradient_checkpointing(lm: nn.Module) -> None:
    """Recompute decoder activations in backward (non-reentrant: no input-grad tricks needed)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _add_lora(lm: nn.Module, cfg: TrainConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA training needs peft: pip install peft") from None
    present = {name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, nn.Linear)}
    present |= {name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if type(m).__name__.startswith("Linear")}
    targets = [t for t in cfg.lora_targets if t in present]
    if not targets:
        raise ValueError(f"none of the LoRA targets {list(cfg.lora_targets)} is a linear layer of this language "
                         f"model (its linear layers: {sorted(present)}); pass --lora-targets")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for users to do
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(lm, config)


# Optimizer ----------------------------------------------------------------------------------------
def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases, norm weights (LayerNorm, RMSNorm, ...) and other 1-D parameters: no weight decay."""
    names = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or p_name == "bias" or param.ndim < 2:
                names.add(full)
    return names


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: (projector | vision tower | rest) x (decay | no decay), empty ones dropped.

    The projector (and image_newline) use `mm_projector_lr`, the tower `vision_tower_lr`,
    each falling back to the main learning rate, as the original's LLaVATrainer does.
    """
    no_decay = _no_decay_names(model)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = ("projector" if name.startswith(("projector.", "image_newline")) else
                "vision_tower" if name.startswith("vision_tower.") else "language_model")
        groups.setdefault((part, name not in no_decay), []).append(param)
    lrs = {"language_model": None, "projector": cfg.mm_projector_lr, "vision_tower": cfg.vision_tower_lr}
    # The language model's group first: its learning rate is the one progress lines report.
    return [{"params": groups[(part, decay)], "lr": lrs[part] or cfg.learning_rate,
             "weight_decay": cfg.weight_decay if decay else 0.0, "group": f"{part}{'' if decay else '/no_decay'}"}
            for part in lrs for decay in (True, False) if (part, decay) in groups]


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedules (same formulas), without importing its trainer stack (seconds of imports)."""
    def factor(step: int) -> float:
        if step < warmup_steps and name != "constant":
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if name == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        return 1.0  # constant, constant_with_warmup

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
