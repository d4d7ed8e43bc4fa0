"""Checkpoint layouts: llava-hf (against transformers), original (full, sharded, released quirks),
projector-only and LoRA with a base model, conversion round trips, and the error messages."""

from __future__ import annotations

import copy
import json
import os

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaConfig as HFLlavaConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from llava.checkpoint import CheckpointMismatch, convert, describe, detect_layout, load_checkpoint, save_checkpoint
from llava.checkpoint import keys
from llava.checkpoint.build import image_processor_for
from llava.checkpoint.original import to_original_config
from llava.checkpoint.tokenizer import load_tokenizer
from llava.model.llava import LlavaModel
from llava.processing.tokenize import tokenize_prompt
from llava.tiny import tiny_model
from test_tokenizers import SP_VOCAB, train_sentencepiece

QUESTION = "<image>\nWhat color is the circle?"


# Helpers ------------------------------------------------------------------------------------------
def _image(size=(28, 28), seed=0) -> PIL.Image.Image:
    g = torch.Generator().manual_seed(seed)
    return PIL.Image.fromarray(torch.randint(0, 255, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


def _inputs(model: LlavaModel, tokenizer, convention="original", size=(28, 28)):
    pixel_values, sizes = image_processor_for(model.config)([_image(size)])
    n = model.image_token_count(sizes[0])
    ids = tokenize_prompt(tokenizer, QUESTION, [n], model.config.image_token_index, convention)
    return torch.tensor([ids]), pixel_values, sizes


@torch.no_grad()
def _logits(model: LlavaModel, tokenizer, convention="original", size=(28, 28)) -> torch.Tensor:
    ids, pixel_values, sizes = _inputs(model, tokenizer, convention, size)
    return model(ids, pixel_values=pixel_values, image_sizes=sizes).logits


@torch.no_grad()
def _logits_of(ckpt, size=(28, 28)) -> torch.Tensor:
    return _logits(ckpt.model, ckpt.tokenizer, ckpt.convention, size)


def _close(a: torch.Tensor, b: torch.Tensor, vocab: int | None = None) -> bool:
    vocab = vocab or min(a.shape[-1], b.shape[-1])
    return a.shape[:-1] == b.shape[:-1] and (a[..., :vocab] - b[..., :vocab]).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model("tiny", seed=3)
    return model, tok, image_processor_for(model.config)


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory, tiny):
    """The tiny model's tower saved alone, as a stand-in for openai/clip-vit-large-patch14-336."""
    folder = tmp_path_factory.mktemp("tower")
    tiny[0].vision_tower.save_pretrained(folder)
    return str(folder)


def _save_lm_base(model: LlavaModel, tok, folder) -> str:
    """A plain causal-LM folder (like lmsys/vicuna-7b-v1.5)."""
    model.language_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _write_original_config(folder, cfg: dict) -> None:
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)


def _released_config(model: LlavaModel, tower: str) -> dict:
    """A config as liuhaotian/llava-v1.5-* ship it: model_type "llava", no tower config or weights."""
    cfg = to_original_config(model.config)
    cfg.pop("llava_extra")
    cfg.update(model_type="llava", mm_vision_tower=tower, image_aspect_ratio="pad")
    return cfg


# llava-hf ------------------------------------------------------------------------------------------
def test_hf_save_matches_transformers_and_reloads(tiny, tmp_path):
    model, tok, proc = tiny
    save_checkpoint(model, copy.deepcopy(tok), proc, tmp_path, layout="hf")
    assert detect_layout(tmp_path) == "hf"
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, pixel_values, _ = _inputs(model, tok, "hf")
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixel_values[0]).logits
    ours = _logits(model, tok, "hf")
    assert _close(ours, theirs)

    ckpt = load_checkpoint(tmp_path)
    assert (ckpt.layout, ckpt.convention, ckpt.name) == ("hf", "hf", tmp_path.name)
    assert not ckpt.model.training and not any(p.requires_grad for p in ckpt.model.vision_tower.parameters())
    assert ckpt.model.dtype == torch.float32 and ckpt.image_processor == proc
    assert _close(_logits_of(ckpt), ours)


def test_hf_anyres_matches_transformers_llava_next(tmp_path):
    model, tok = tiny_model("tiny-anyres", seed=4, anyres_rounding="hf")
    save_checkpoint(model, tok, image_processor_for(model.config), tmp_path, layout="hf")
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    size = (80, 30)  # (width, height): base + a 3x1 grid, padded columns removed
    ids, pixel_values, sizes = _inputs(model, tok, "hf", size)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixel_values[0][None],
                    image_sizes=torch.tensor([[size[1], size[0]]])).logits  # transformers: (height, width)
    assert pixel_values[0].shape[0] == 4
    assert _close(_logits(model, tok, "hf", size), theirs)
    assert _close(_logits_of(load_checkpoint(tmp_path), size), theirs)


@pytest.mark.parametrize("tie", [False, True])
def test_loads_folders_saved_by_transformers(tiny, tmp_path, tie):
    model, tok, _ = tiny
    text = model.config.text_config.to_dict() | {"tie_word_embeddings": tie}
    config = HFLlavaConfig(text_config=text, vision_config=model.config.vision_config.to_dict(),
                           image_token_index=model.config.image_token_index, tie_word_embeddings=tie)
    torch.manual_seed(5)
    hf = LlavaForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    ids, pixel_values, _ = _inputs(ckpt.model, ckpt.tokenizer, ckpt.convention)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixel_values[0]).logits
    assert _close(_logits_of(ckpt), theirs)


# original layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("safe, shard", [(True, None), (False, 40_000), (True, 40_000)])
def test_original_save_and_load(tiny, tmp_path, safe, shard):
    model, tok, proc = tiny
    kwargs = {"safe_serialization": safe} | ({"max_shard_bytes": shard} if shard else {})
    save_checkpoint(model, tok, proc, tmp_path, layout="original", **kwargs)
    files = set(os.listdir(tmp_path))
    index = ("model.safetensors.index.json" if safe else "pytorch_model.bin.index.json") if shard else None
    assert index in files if shard else ("model.safetensors" in files)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["mm_projector_type"]) == \
        ("llava_llama", ["LlavaLlamaForCausalLM"], "mlp2x_gelu")
    assert cfg["hidden_size"] == 64 and cfg["mm_hidden_size"] == 32 and cfg["mm_patch_merge_type"] == "flat"
    ckpt = load_checkpoint(tmp_path)
    assert (ckpt.layout, ckpt.convention) == ("original", "original")
    assert _close(_logits_of(ckpt), _logits(model, tok))


@pytest.mark.parametrize("via", ["config-path", "override"])
def test_released_config_without_tower_weights(tiny, tower_dir, tmp_path, via):
    model, tok, _ = tiny
    named = tower_dir if via == "config-path" else "openai/clip-vit-large-patch14-336"
    _write_original_config(tmp_path, _released_config(model, named))
    state = {k: v for k, v in keys.to_original(model.state_dict()).items() if "vision_tower" not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    tok.save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path, vision_tower=tower_dir if via == "override" else None)
    assert ckpt.layout == "original" and ckpt.model.config.image_token_index == -200
    assert ckpt.model.config.image_aspect_ratio == "pad"
    assert _close(_logits_of(ckpt), _logits(model, tok))


def test_absent_im_patch_flag_adds_a_token_like_the_original(tiny, tower_dir, tmp_path):
    model, tok, proc = tiny
    save_checkpoint(model, tok, proc, tmp_path, layout="original")
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["mm_use_im_patch_token"]  # the original's loader then adds <im_patch> and resizes
    _write_original_config(tmp_path, cfg)
    ckpt = load_checkpoint(tmp_path)
    rows = ckpt.model.language_model.get_input_embeddings().weight.shape[0]
    assert len(ckpt.tokenizer) == rows == 513 and ckpt.model.config.text_config.vocab_size == 513
    assert _close(_logits_of(ckpt), _logits(model, tok), vocab=512)


def test_convert_original_to_hf_and_back(tmp_path):
    """A SentencePiece tokenizer without <image>: converting to hf must add it and grow the vocab."""
    sp = train_sentencepiece(tmp_path / "sp")
    model, tok = tiny_model("tiny", seed=6, tokenizer=load_tokenizer(sp))
    model.config.image_token_index, model.config.template = -200, None  # template: from the name
    proc = image_processor_for(model.config)
    save_checkpoint(model, tok, proc, tmp_path / "llava-v1.5-tiny", layout="original")
    reference = _logits(model, tok)

    hf = convert(tmp_path / "llava-v1.5-tiny", tmp_path / "as-hf", to="hf")
    assert hf.model.config.image_token_index == SP_VOCAB and hf.convention == "hf"
    hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "as-hf").eval()
    ids, pixel_values, _ = _inputs(hf.model, hf.tokenizer, "hf")
    assert (ids == SP_VOCAB).sum() == model.image_token_count((28, 28))
    with torch.no_grad():
        assert _close(hf_model(input_ids=ids, pixel_values=pixel_values[0]).logits, reference, vocab=SP_VOCAB)

    convert(tmp_path / "as-hf", tmp_path / "back", to="original")
    back = load_checkpoint(tmp_path / "back")
    assert back.layout == "original" and back.model.config.template == "llava_v1"  # kept from the first name
    assert _close(_logits_of(back), reference, vocab=SP_VOCAB)


# projector-only and LoRA ---------------------------------------------------------------------------
@pytest.mark.parametrize("base_kind", ["causal-lm", "llava-hf"])
def test_projector_only_with_base(tiny, tower_dir, tmp_path, base_kind):
    model, tok, proc = tiny
    if base_kind == "causal-lm":
        base = _save_lm_base(model, tok, tmp_path / "vicuna")
    else:  # a full LLaVA as base: its own (different) projector must be replaced
        other = copy.deepcopy(model)
        torch.nn.init.normal_(other.projector[0].weight)
        base = str(tmp_path / "llava-base")
        save_checkpoint(other, copy.deepcopy(tok), proc, base, layout="hf")
    proj = tmp_path / "llava-pretrain"
    proj.mkdir()
    _write_original_config(proj, _released_config(model, tower_dir) | {"model_type": "llava_llama"})
    state = keys.to_original(model.state_dict())
    torch.save({k: v for k, v in state.items() if "mm_projector" in k}, proj / "mm_projector.bin")
    assert detect_layout(proj) == "original-projector"
    with pytest.raises(ValueError, match="projector-only.*--model-base"):
        load_checkpoint(proj)
    ckpt = load_checkpoint(proj, model_base=base)
    assert ckpt.layout == "original-projector"
    assert _close(_logits_of(ckpt), _logits(model, tok))


def test_lora_merged_into_base(tiny, tower_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok, _ = tiny
    base = _save_lm_base(model, tok, tmp_path / "vicuna")
    torch.manual_seed(7)
    peft_lm = get_peft_model(copy.deepcopy(model.language_model),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora = tmp_path / "finetune-run"  # no "lora" in the name: detected by files
    peft_lm.save_pretrained(lora)
    # A projector trained along with the adapter, saved under the original's PEFT names.
    torch.manual_seed(8)
    projector = {f"base_model.model.model.mm_projector.{k}": torch.randn_like(v)
                 for k, v in model.projector.state_dict().items()}
    torch.save(projector, lora / "non_lora_trainables.bin")
    _write_original_config(lora, _released_config(model, tower_dir))
    assert detect_layout(lora) == "original-lora"

    reference = LlavaModel(model.config, language_model=peft_lm.merge_and_unload(),
                           vision_tower=copy.deepcopy(model.vision_tower)).eval()
    reference.projector.load_state_dict({k.split("mm_projector.")[1]: v for k, v in projector.items()})
    ckpt = load_checkpoint(lora, model_base=base)
    assert ckpt.layout == "original-lora" and not _close(_logits(model, tok), _logits(reference, tok))
    assert _close(_logits_of(ckpt), _logits(reference, tok))


# describe -----------------------------------------------------------------------------------------
def test_describe_reads_config_only(tiny, tmp_path):
    model, tok, proc = tiny
    save_checkpoint(model, tok, proc, tmp_path / "llava-v1.5-tiny", layout="original")
    info = describe(tmp_path / "llava-v1.5-tiny")
    assert info["layout"] == "original" and info["architecture"] == "LlavaLlamaForCausalLM"
    assert info["template"] == "vicuna_v1"  # the tiny preset's own, over the name's llava_v1
    assert info["image_tokens_per_image"] == 4 and info["projector"] == "mlp2x_gelu"
    assert info["language_model"].startswith("llama: hidden 64, 2 layers")
    assert info["context_length"] == 512 and info["params_projector"] == 32 * 64 + 64 + 64 * 64 + 64


# errors -------------------------------------------------------------------------------------------
def test_missing_tower_says_how_to_pass_it(tiny, tmp_path):
    model, tok, _ = tiny
    _write_original_config(tmp_path, _released_config(model, "nobody/no-such-tower"))
    state = {k: v for k, v in keys.to_original(model.state_dict()).items() if "vision_tower" not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    tok.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nobody/no-such-tower.*--vision-tower PATH.*vision_tower="):
        load_checkpoint(tmp_path)


def test_wrong_shape_names_the_tensor(tiny, tmp_path):
    model, tok, proc = tiny
    save_checkpoint(model, tok, proc, tmp_path, layout="original")
    state = load_file(tmp_path / "model.safetensors")
    state["model.mm_projector.2.bias"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match=r"projector\.2\.bias: checkpoint \(3,\) vs model \(64,\)"):
        load_checkpoint(tmp_path)


def test_empty_folder_lists_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"looked for config\.json \+ weights.*mm_projector\.bin.*"
                                                r"adapter_config\.json.*found \[\]"):
        load_checkpoint(tmp_path)


def test_plain_language_model_folder_points_to_model_base(tiny, tmp_path):
    model, tok, _ = tiny
    _save_lm_base(model, tok, tmp_path)
    with pytest.raises(FileNotFoundError, match="no vision parts.*model_base"):
        detect_layout(tmp_path)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"not found: {missing}"):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face hub.*local folder"):
        load_checkpoint("nobody/no-such-llava")


# configs of the released checkpoints (no weights needed) ------------------------------------------
RELEASED_V15_13B = {  # liuhaotian/llava-v1.5-13b config.json (facts 2.1)
    "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 5120, "intermediate_size": 13824,
    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40, "max_position_embeddings": 4096,
    "max_length": 4096, "rms_norm_eps": 1e-05, "rope_scaling": None, "pretraining_tp": 1,
    "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 32000, "transformers_version": "4.31.0",
    "use_cache": True, "initializer_range": 0.02,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
    "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False, "mm_resampler_type": None,
    "freeze_mm_vision_resampler": False, "tune_mm_vision_resampler": False,
}
V16_KEYS = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "unfreeze_mm_vision_tower": True,
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right", "mm_vision_tower_lr": 2e-06}


def test_released_v15_config_resolves_offline():
    from llava.checkpoint.build import expected_shapes
    from llava.checkpoint.original import from_original_config

    config = from_original_config(RELEASED_V15_13B)
    text, vision = config.text_config, config.vision_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.vocab_size) == ("llama", 5120, 40, 32000)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1024, 24, 336, 14)
    assert (config.projector_type, config.vision_feature_layer, config.image_aspect_ratio) == ("mlp2x_gelu", -2, "pad")
    assert config.mm_patch_merge_type == "flat" and config.image_token_index == -200 and config.tokens_per_crop == 576
    assert config.extra["mm_use_im_patch_token"] is False and config.context_length == 4096
    shapes, _ = expected_shapes(config)
    assert sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("projector.")) == 31_467_520


def test_released_v16_and_other_language_models():
    from llava.checkpoint.original import from_original_config, to_original_config

    config = from_original_config(RELEASED_V15_13B | V16_KEYS)
    assert config.image_aspect_ratio == "anyres" and config.image_grid_pinpoints[3] == (1008, 336)
    assert config.tokenizer_model_max_length == 4096 and config.extra["mm_vision_tower_lr"] == 2e-06
    with torch.device("meta"):
        assert LlavaModel(config).image_token_count((640, 480)) == 2340  # facts 4.5
    mistral = from_original_config(RELEASED_V15_13B | {"model_type": "llava_mistral", "sliding_window": None})
    assert mistral.text_config.model_type == "mistral"
    assert from_original_config(RELEASED_V15_13B | {"architectures": ["LlavaMistralForCausalLM"]}
                                ).text_config.model_type == "mistral"
    written = to_original_config(mistral)
    assert (written["model_type"], written["architectures"]) == ("llava_mistral", ["LlavaMistralForCausalLM"])
    again = from_original_config(written)
    assert again.to_dict()["vision_config"] == mistral.to_dict()["vision_config"]
    assert again.text_config.hidden_size == 5120 and again.extra.items() >= mistral.extra.items()


def test_tower_architecture_inferred_from_stored_weights(tmp_path):
    """Self-trained checkpoints carry the tower's weights; with its name unresolvable, they define it."""
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=1, image_size=28, patch_size=14)  # 64-wide heads, quick_gelu: as OpenAI CLIP
    model, tok = tiny_model("tiny", seed=9, vision_config=vision)
    save_checkpoint(model, tok, image_processor_for(model.config), tmp_path, layout="original")
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["llava_extra"]["vision_config"]
    _write_original_config(tmp_path, cfg | {"mm_vision_tower": "nobody/self-trained-tower"})
    with pytest.warns(UserWarning, match="inferred from the checkpoint's tower weights"):
        ckpt = load_checkpoint(tmp_path)
    assert ckpt.model.config.vision_config.num_attention_heads == 1
    assert _close(_logits_of(ckpt), _logits(model, tok))
    with pytest.warns(UserWarning, match="inferred"):
        assert describe(tmp_path)["vision_tower"].startswith("nobody/self-trained-tower: hidden 64")
