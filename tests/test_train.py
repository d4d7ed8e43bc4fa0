"""Training: stages, what each trains, outputs that load everywhere, sampler, entry points."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava.checkpoint import load_checkpoint
from llava.dataclass_cli import saved_value
from llava.processing.tokenize import tokenize_prompt
from llava.train.build import param_groups
from llava.train.cli import add_train_command
from llava.train.config import STAGES, TrainConfig
from llava.train.loop import train
from llava.errors import InputError
from llava.train.sampler import epoch_batches, steps_per_epoch
from train_helpers import draw, make_sources, weights, write_data


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster (and steadier on a busy machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict[str, str]:
    return make_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"plain": write_data(root, n_image=8, plain=True, name="plain.json"),
            "chat": write_data(root, n_image=6, n_text=2, name="chat.json"), "folder": root}


def run(stage: str, data_file: Path, out: Path, folder: Path, **kw) -> "TrainResult":  # noqa: F821
    kw.setdefault("micro_batch_size", 4)
    kw.setdefault("global_batch_size", 4)
    kw.setdefault("progress", False)
    kw.setdefault("gradient_checkpointing", False)
    return train(TrainConfig(stage=stage, data=str(data_file), image_folder=str(folder), out=str(out), **kw))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def logits(model, tokenizer, image: Path, convention: str):
    from llava.checkpoint.build import image_processor_for
    from llava.processing.image import load_image

    pixel_values, sizes = image_processor_for(model.config)([load_image(image)])
    ids = tokenize_prompt(tokenizer, "USER: <image>\nWhat color is the shape? ASSISTANT:",
                          [model.image_token_count(sizes[0])], model.config.image_token_index, convention)
    return model.eval()(torch.tensor([ids]), pixel_values=pixel_values, image_sizes=sizes).logits


# Stage 1 ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(src, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    result = run("pretrain", data["plain"], out, data["folder"], language_model=src["lm"],
                 vision_tower=src["tower"], max_steps=4, gradient_checkpointing=True)
    return out, result


def test_pretrain_trains_only_the_projector(src, pretrained):
    out, result = pretrained
    assert result.global_step == 4 and (out / "metrics.jsonl").exists()
    trained, source = weights(out), weights(src["llava"])  # same LM and tower, another projector init
    lm_and_tower = [k for k in source if not k.startswith("multi_modal_projector.")]
    assert lm_and_tower and all(torch.equal(trained[k], source[k]) for k in lm_and_tower)
    # The projector moved away from its fresh initialisation (seeded, so a rebuild gives it back).
    from llava.train.build import build_model

    fresh = build_model(TrainConfig(stage="pretrain", data="x", out="y", language_model=src["lm"],
                                    vision_tower=src["tower"]).resolved()).model.projector.state_dict()
    assert not torch.equal(trained["multi_modal_projector.linear_1.weight"], fresh["0.weight"])
    # The original's stage-1 file and the same keys as safetensors.
    mm = torch.load(out / "mm_projector.bin", weights_only=True)
    assert sorted(mm) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                          "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert torch.equal(mm["model.mm_projector.0.weight"], trained["multi_modal_projector.linear_1.weight"])
    assert sorted(load_file(out / "projector.safetensors")) == sorted(mm)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["config"]["stage"] == "pretrain"
    assert state["config"]["template"] == "plain"
    assert len(state["data_sha256"]) == 64 and "torch" in state["versions"] and state["loss"] == result.final_loss


# Stage 2 ---------------------------------------------------------------------------------------------
def test_finetune_trains_lm_and_projector_and_loss_falls(src, data, pretrained, tmp_path):
    projector_file = pretrained[0] / "mm_projector.bin"
    out = tmp_path / "finetune"
    run("finetune", data["chat"], out, data["folder"], language_model=src["lm"], vision_tower=src["tower"],
        pretrain_mm_mlp_adapter=str(projector_file), learning_rate=1e-3, max_steps=20, group_by_modality_length=False)
    first, last = losses(out)[:2], losses(out)[-2:]
    assert sum(last) < 0.8 * sum(first), losses(out)
    trained, source = weights(out), weights(src["llava"])
    tower = [k for k in source if k.startswith("vision_tower.")]
    assert all(torch.equal(trained[k], source[k]) for k in tower)
    assert not torch.equal(trained["language_model.model.layers.0.mlp.up_proj.weight"],
                           source["language_model.model.layers.0.mlp.up_proj.weight"])
    stage1 = weights(pretrained[0])["multi_modal_projector.linear_2.weight"]
    assert not torch.equal(trained["multi_modal_projector.linear_2.weight"], stage1)

    # Loads in transformers, in llava.load, and answers.
    from transformers import LlavaForConditionalGeneration

    import llava

    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ckpt = load_checkpoint(out)
    image = data["folder"] / "img0.png"
    ours = logits(ckpt.model, ckpt.tokenizer, image, ckpt.convention)
    assert ckpt.convention == "hf" and ckpt.model.config.template == "vicuna_v1"
    from llava.checkpoint.build import image_processor_for
    from llava.processing.image import load_image

    pixel_values, _ = image_processor_for(ckpt.model.config)([load_image(image)])
    ids = tokenize_prompt(ckpt.tokenizer, "USER: <image>\nWhat color is the shape? ASSISTANT:",
                          [ckpt.model.image_token_count((28, 28))], ckpt.model.config.image_token_index, "hf")
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=pixel_values[0]).logits
    assert (ours - theirs).abs().max() < 1e-4
    pipe = llava.load(str(out), device="cpu")
    assert isinstance(pipe.generate("What color is the shape?", images=str(image), max_new_tokens=3,
                                    temperature=0), str)


def test_finetune_from_checkpoint_with_unfrozen_tower(src, data, tmp_path):
    out = tmp_path / "v16"
    result = run("finetune", data["chat"], out, data["folder"], model=src["llava"], unfreeze_vision_tower=True,
                 vision_tower_lr=1e-4, learning_rate=1e-3, max_steps=2)
    groups = {g["group"]: g["lr"] for g in param_groups(result.model, result_cfg(result))}
    assert groups["vision_tower"] == 1e-4 and groups["language_model"] == 1e-3
    trained, source = weights(out), weights(src["llava"])
    assert not torch.equal(trained["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"],
                           source["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"])


def test_a_checkpoint_keeps_its_aspect_mode_unless_one_is_asked_for(src, data, tmp_path):
    """`--image-aspect-ratio` on a `--model` checkpoint was once ignored while the run's config said it
    (a recipe phase asked for pad and trained on centre crops). Now square <-> pad switch what training
    feeds the model and what the saved one says; square or pad -> anyres is LLaVA-NeXT's path (grids,
    a fresh image newline that trains); leaving anyres is one clear error."""
    from llava.train.build import build_model

    source = load_checkpoint(src["llava"]).model.config
    have, side = source.image_aspect_ratio, source.vision_config.image_size
    other = "square" if have == "pad" else "pad"
    kept = run("finetune", data["chat"], tmp_path / "kept", data["folder"], model=src["llava"], max_steps=1)
    assert result_cfg(kept).image_aspect_ratio is None and kept.model.config.image_aspect_ratio == have
    asked = TrainConfig(stage="finetune", data=str(data["chat"]), out=str(tmp_path / "x"), model=src["llava"],
                        image_aspect_ratio=other).resolved()
    assert build_model(asked).image_processor.aspect == other
    run("finetune", data["chat"], tmp_path / "switched", data["folder"], model=src["llava"], max_steps=1,
        image_aspect_ratio=other)
    saved = load_checkpoint(tmp_path / "switched")
    assert saved.model.config.image_aspect_ratio == other and saved.image_processor.aspect == other

    grids = [(side, 2 * side), (2 * side, side), (2 * side, 2 * side)]
    to_anyres = TrainConfig(stage="finetune", data=str(data["chat"]), out=str(tmp_path / "y"), model=src["llava"],
                            image_aspect_ratio="anyres", image_grid_pinpoints=grids).resolved()
    fresh = build_model(to_anyres)
    with pytest.raises(ValueError, match=f"multiple of the vision tower's image size, {side}"):
        build_model(dataclasses.replace(to_anyres, image_grid_pinpoints=[(side + 1, side)]))
    assert fresh.image_processor.aspect == "anyres" and fresh.model.image_newline is not None
    run("finetune", data["chat"], tmp_path / "anyres", data["folder"], model=src["llava"],
        image_aspect_ratio="anyres", image_grid_pinpoints=grids, learning_rate=1e-2, warmup_ratio=0.0, max_steps=2)
    nxt = load_checkpoint(tmp_path / "anyres")
    assert nxt.model.config.image_aspect_ratio == "anyres" and nxt.model.config.mm_patch_merge_type == "spatial_unpad"
    assert nxt.layout == "hf" and nxt.model.config.anyres_rounding == "hf"
    assert [tuple(p) for p in nxt.model.config.image_grid_pinpoints] == grids and nxt.image_processor.aspect == "anyres"
    assert not torch.equal(nxt.model.image_newline.detach(), fresh.model.image_newline.detach())  # it learnt
    from llava.errors import CheckpointMismatch

    with pytest.raises(CheckpointMismatch, match="trained as anyres"):  # one clear error in the CLI
        run("finetune", data["chat"], tmp_path / "back", data["folder"], model=str(tmp_path / "anyres"), max_steps=1,
            image_aspect_ratio=other)
    # Flags that would do nothing are refused; grids on an anyres checkpoint replace its own.
    with pytest.raises(ValueError, match="anyres's grids; this build is pad"):
        TrainConfig(stage="finetune", data="d", out="o", language_model=src["lm"], vision_tower=src["tower"],
                    image_grid_pinpoints=grids).resolved()
    with pytest.raises(InputError, match="--image-grid-pinpoints: the checkpoint is"):
        build_model(dataclasses.replace(asked, image_aspect_ratio=None, image_grid_pinpoints=grids))
    with pytest.raises(CheckpointMismatch, match="--mm-patch-merge-type spatial_unpad"):
        build_model(dataclasses.replace(asked, image_aspect_ratio=None, mm_patch_merge_type="spatial_unpad"))
    regrid = build_model(dataclasses.replace(to_anyres, model=str(tmp_path / "anyres"), image_aspect_ratio=None,
                                             image_grid_pinpoints=grids[:1]))
    assert regrid.model.config.image_grid_pinpoints == grids[:1] and regrid.image_processor.pinpoints == grids[:1]


def result_cfg(result) -> TrainConfig:
    return TrainConfig.from_dict(result.state["config"])


# LoRA / QLoRA ----------------------------------------------------------------------------------------
def test_lora_trains_adapters_and_projector_and_merges(src, data, tmp_path):
    out = tmp_path / "lora-run"
    result = run("lora", data["chat"], out, data["folder"], language_model=src["lm"], vision_tower=src["tower"],
                 lora_r=4, lora_alpha=8, learning_rate=1e-2, mm_projector_lr=1e-3, max_steps=3)
    model = result.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    lora_modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n}
    assert lora_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    groups = {g["group"]: g["lr"] for g in param_groups(model, result_cfg(result))}
    assert groups == {"language_model": 1e-2, "projector": 1e-3, "projector/no_decay": 1e-3}
    files = sorted(os.listdir(out))
    for name in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json"):
        assert name in files
    non_lora = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert sorted(non_lora) == [f"base_model.model.model.mm_projector.{k}" for k in
                                ("0.bias", "0.weight", "2.bias", "2.weight")]
    # Base weights untouched; the merged output equals the in-memory model merged.
    base_lm = load_file(Path(src["lm"]) / "model.safetensors")
    q = model.language_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(q, base_lm["model.layers.0.self_attn.q_proj.weight"])
    reference = copy.deepcopy(model)
    reference.language_model = reference.language_model.merge_and_unload()
    loaded = load_checkpoint(out, model_base=src["lm"])
    assert loaded.layout == "original-lora" and loaded.convention == "original"
    image = data["folder"] / "img1.png"
    expected = logits(reference, loaded.tokenizer, image, "original")
    assert (logits(loaded.model, loaded.tokenizer, image, "original") - expected).abs().max() < 1e-5
    # ... and `llava convert OUT DST --model-base BASE` merges it into a llava-hf folder.
    from llava.cli import main as llava_main

    assert llava_main(["convert", str(out), str(tmp_path / "merged"), "--model-base", src["lm"]]) == 0
    merged = load_checkpoint(tmp_path / "merged")
    assert merged.layout == "hf"
    assert (logits(merged.model, merged.tokenizer, image, "original") - expected).abs().max() < 1e-5


def test_qlora_runs_on_cpu(src, data, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    result = run("qlora", data["chat"], out, data["folder"], model=src["llava"], lora_r=4, lora_alpha=8,
                 learning_rate=1e-2, max_steps=2)
    assert result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    assert type(result.model.language_model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ \
        == "Linear4bit"
    # A LoRA on a llava base: merged into the (unquantized) base checkpoint.
    loaded = load_checkpoint(out, model_base=src["llava"])
    assert loaded.layout == "original-lora"


# AnyRes ----------------------------------------------------------------------------------------------
def test_anyres_mixed_sizes_and_text_rows_in_one_batch(tmp_path):
    src = make_sources(tmp_path / "src", preset="tiny-anyres", seed=1)
    data = write_data(tmp_path / "data", n_image=6, n_text=2, sizes=((28, 28), (56, 28), (28, 70), (90, 40)))
    batches = epoch_batches(8, 4, seed=42, epoch=0)
    assert any(min(b) < 6 <= max(b) for b in batches)  # some step mixes image and text rows
    out = tmp_path / "out"
    run("finetune", data, out, tmp_path / "data", model=src["llava"], learning_rate=2e-3, max_steps=16,
        group_by_modality_length=False, global_batch_size=8, micro_batch_size=8)
    assert sum(losses(out)[-2:]) < 0.8 * sum(losses(out)[:2]), losses(out)
    from transformers import LlavaNextForConditionalGeneration

    LlavaNextForConditionalGeneration.from_pretrained(out)
    assert load_checkpoint(out).model.config.image_aspect_ratio == "anyres"


# Sampler and loss normalisation ----------------------------------------------------------------------
def test_group_by_modality_batches_are_single_modality_and_deterministic():
    lengths = [10 + i for i in range(13)] + [-(5 + i) for i in range(7)]  # 13 image rows, 7 text rows
    batches = epoch_batches(20, 4, seed=3, epoch=0, modality_lengths=lengths)
    assert len(batches) == steps_per_epoch(20, 4, lengths) == 4 + 2
    for batch in batches:
        assert len(batch) == 4
        assert all(lengths[i] > 0 for i in batch) or all(lengths[i] <= 0 for i in batch)
        assert [abs(lengths[i]) for i in batch] == sorted((abs(lengths[i]) for i in batch), reverse=True)
    assert set().union(*batches) == set(range(20))
    assert batches == epoch_batches(20, 4, seed=3, epoch=0, modality_lengths=lengths)
    assert batches != epoch_batches(20, 4, seed=3, epoch=1, modality_lengths=lengths)
    plain = epoch_batches(10, 4, seed=0, epoch=0)
    assert [len(b) for b in plain] == [4, 4, 4] and set().union(*plain) == set(range(10))


def _padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(abs(lengths[i]) for i in b) for b in batches)


def test_a_length_window_sorts_across_batches_so_they_pad_less():
    """Rows sorted by length across N batches: the same rows each epoch (top-ups included), every
    batch full and single-modality, deterministic, and far fewer padded tokens; a window of 1 is the
    original's grouping."""
    import random

    rng = random.Random(0)
    lengths = [rng.randint(50, 400) for _ in range(300)] + [-rng.randint(20, 200) for _ in range(100)]
    one = epoch_batches(400, 16, seed=5, epoch=0, modality_lengths=lengths)
    assert epoch_batches(400, 16, seed=5, epoch=0, modality_lengths=lengths, length_window=1) == one
    windowed = epoch_batches(400, 16, seed=5, epoch=0, modality_lengths=lengths, length_window=8)
    assert windowed == epoch_batches(400, 16, seed=5, epoch=0, modality_lengths=lengths, length_window=8)
    assert len(windowed) == len(one) == steps_per_epoch(400, 16, lengths)
    assert sorted(i for b in windowed for i in b) == sorted(i for b in one for i in b)
    for batch in windowed:
        assert len(batch) == 16
        assert all(lengths[i] > 0 for i in batch) or all(lengths[i] <= 0 for i in batch)
    assert _padded_tokens(windowed, lengths) < 0.8 * _padded_tokens(one, lengths)
    with pytest.raises(InputError, match="length window"):
        epoch_batches(400, 16, seed=5, epoch=0, modality_lengths=lengths, length_window=0)


def test_every_train_config_field_is_a_flag_of_llava_train():
    """The flags are derived from TrainConfig's fields: each field has one, and aliases, lists and
    switches parse to the config's own types."""
    import dataclasses

    from llava.train.cli import add_train_args, config_from_args

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= {a.dest for a in parser._actions}
    cfg = config_from_args(parser.parse_args([
        "--stage", "lora", "--data", "d.json", "--output-dir", "o", "--lr", "1e-4", "--batch-size", "2",
        "--gradient-accumulation-steps", "3", "--version", "vicuna_v1", "--lora-targets", "q_proj, v_proj",
        "--report-to", "none", "--adam-betas", "0.8,0.99", "--resume", "--no-progress", "--unfreeze-vision-tower",
        "--image-grid-pinpoints", "[[64, 32], [32, 64]]", "--mm-vision-select-layer", "-1"]))
    assert (cfg.out, cfg.learning_rate, cfg.micro_batch_size, cfg.grad_accum, cfg.template) == (
        "o", 1e-4, 2, 3, "vicuna_v1")
    assert cfg.lora_targets == ("q_proj", "v_proj") and cfg.report_to == () and cfg.adam_betas == (0.8, 0.99)
    assert cfg.resume == "auto" and cfg.progress is False and cfg.unfreeze_vision_tower is True
    assert [tuple(p) for p in cfg.image_grid_pinpoints] == [(64, 32), (32, 64)] and cfg.vision_feature_layer == -1
    defaults = config_from_args(parser.parse_args(["--stage", "finetune", "--data", "d", "--out", "o"]))
    assert defaults == TrainConfig(stage="finetune", data="d", out="o")
    # ... and back: `to_argv` writes the flags that parse to the same config (the recipe's card commands).
    from llava.dataclass_cli import to_argv

    written = dataclasses.replace(cfg, report_to=("tensorboard", "wandb"), progress=True, bf16=False, seed=7,
                                  image_aspect_ratio="anyres", max_grad_norm=0.5)
    assert config_from_args(parser.parse_args(to_argv(written))) == written
    assert to_argv(defaults) == ["--stage", "finetune", "--data", "d", "--out", "o"]
    assert not {"--stage", "--data", "--out"} & set(to_argv(written, skip={"stage", "data", "out"}))
    with pytest.raises(SystemExit):
        parser.parse_args(["--stage", "finetune", "--data", "d"])  # --out is required


def test_length_window_reaches_the_trainer_and_a_checkpoint_from_before_it_resumes():
    """The flag sets the config; an older saved config without the field reads as its default (1),
    so such a checkpoint or finished run still matches a run with the default."""
    from llava.train.cli import add_train_args, config_from_args

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    args = ["--stage", "finetune", "--data", "d.json", "--out", "o"]
    assert config_from_args(parser.parse_args(args + ["--length-window", "16"])).length_window == 16
    assert config_from_args(parser.parse_args(args)).length_window == 1
    saved = TrainConfig(stage="finetune", data="d.json", out="o").to_dict()
    del saved["length_window"]
    assert saved_value(TrainConfig, saved, "length_window") == 1
    assert saved_value(TrainConfig, saved, "seed") == saved["seed"]
    with pytest.raises(ValueError, match="length_window"):
        TrainConfig(stage="finetune", data="d.json", out="o", model="m", length_window=0).resolved()


def test_loss_normalisation_does_not_depend_on_the_split(src, data, tmp_path):
    """Micro 4 x accum 1 and micro 1 x accum 4: the same global batch gives the same weights."""
    kw = dict(model=src["llava"], learning_rate=1e-3, max_steps=2, group_by_modality_length=False)
    run("finetune", data["chat"], tmp_path / "a", data["folder"], micro_batch_size=4, global_batch_size=4, **kw)
    run("finetune", data["chat"], tmp_path / "b", data["folder"], micro_batch_size=1, global_batch_size=4, **kw)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_unpadded_rows_train_the_same_weights_as_padded_batches(src, data, tmp_path):
    """Each row alone, cut to its length (the CPU default for big models), is the same step as the
    padded micro-batch; mixed image and text-only rows keep their own images."""
    from llava.train.loop import _use_unpadded

    kw = dict(model=src["llava"], learning_rate=1e-3, max_steps=2, group_by_modality_length=False,
              micro_batch_size=4, global_batch_size=8)
    padded = run("finetune", data["chat"], tmp_path / "padded", data["folder"], unpadded=False, **kw)
    unpadded = run("finetune", data["chat"], tmp_path / "unpadded", data["folder"], unpadded=True, **kw)
    assert (padded.state["unpadded"], unpadded.state["unpadded"]) == (False, True)
    a, b = weights(tmp_path / "padded"), weights(tmp_path / "unpadded")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # Adam steps are ~1e-3: a wrong row shows
    assert losses(tmp_path / "padded") == pytest.approx(losses(tmp_path / "unpadded"), rel=1e-5)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _use_unpadded(None, cpu, 768) and not _use_unpadded(None, cpu, 64)
    assert not _use_unpadded(None, cuda, 4096) and _use_unpadded(True, cuda, 64)


def test_first_step_loss_equals_transformers_full_logit_loss(src, data, tmp_path):
    """The loop computes logits only where a target follows (`logits_to_keep`); the step's loss must
    still be the mean token loss transformers' own model gives over full logits, row by row."""
    from transformers import LlavaForConditionalGeneration

    from llava.checkpoint.build import image_processor_for
    from llava.train.data import SupervisedDataset
    from llava.train.loop import predicting_positions

    out = tmp_path / "one"
    run("finetune", data["chat"], out, data["folder"], model=src["llava"], learning_rate=1e-3, max_steps=1,
        micro_batch_size=4, global_batch_size=8, group_by_modality_length=False)
    ours = losses(out)[0]

    ckpt = load_checkpoint(src["llava"])
    hf = LlavaForConditionalGeneration.from_pretrained(src["llava"]).eval()
    ds = SupervisedDataset(data["chat"], ckpt.tokenizer, "vicuna_v1",
                           image_token_index=ckpt.model.config.image_token_index,
                           image_token_count=ckpt.model.image_token_count,
                           image_processor=image_processor_for(ckpt.model.config),
                           image_folder=data["folder"], convention="hf")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            row = ds[i]
            ids, labels = torch.as_tensor(row["input_ids"])[None], torch.as_tensor(row["labels"])[None]
            pixels = row["pixel_values"][0] if row["pixel_values"] else None
            full = hf(input_ids=ids, pixel_values=pixels).logits
            total += float(torch.nn.functional.cross_entropy(full[0, :-1], labels[0, 1:], ignore_index=-100,
                                                             reduction="sum"))
            count += int((labels[0, 1:] != -100).sum())
    assert count > 0 and abs(ours - total / count) < 1e-4 * max(1.0, total / count)

    # The kept positions are exactly those followed by a target in some row.
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    assert predicting_positions(labels).tolist() == [0, 1, 2]


# Configuration ---------------------------------------------------------------------------------------
def test_stage_recipes_are_the_v15_hyperparameters():
    def resolved(stage):
        return TrainConfig(stage=stage, data="d.json", out="o", model="m").resolved()

    pre, ft, lora, qlora = (resolved(s) for s in ("pretrain", "finetune", "lora", "qlora"))
    assert (pre.learning_rate, pre.global_batch_size, pre.template) == (1e-3, 256, "plain")
    assert pre.batch_plan(8) == (32, 1, 256) and pre.batch_plan(1) == (32, 8, 256)
    assert (ft.learning_rate, ft.global_batch_size, ft.group_by_modality_length) == (2e-5, 128, True)
    assert (lora.lora_r, lora.lora_alpha, lora.learning_rate, lora.mm_projector_lr) == (128, 256, 2e-4, 2e-5)
    for cfg in (pre, ft, lora, qlora):
        assert (cfg.warmup_ratio, cfg.lr_scheduler, cfg.weight_decay, cfg.model_max_length, cfg.epochs) == \
            (0.03, "cosine", 0.0, 2048, 1)
        assert cfg.gradient_checkpointing and cfg.max_grad_norm == 1.0
    assert STAGES["qlora"].quantize == "bnb-4bit" and STAGES["pretrain"].trains == ("projector",)
    assert TrainConfig(stage="finetune", data="d", out="o", model="m", learning_rate=1e-4).resolved().learning_rate \
        == 1e-4
    with pytest.raises(ValueError, match="no model"):
        TrainConfig(stage="finetune", data="d", out="o").resolved()
    with pytest.raises(ValueError, match="not a multiple"):
        TrainConfig(stage="finetune", data="d", out="o", model="m", global_batch_size=10,
                    micro_batch_size=4).resolved().batch_plan(1)


def test_no_weight_decay_on_norms_and_biases(src):
    from llava.train.build import build_model, prepare_for_stage

    cfg = TrainConfig(stage="finetune", data="d", out="o", model=src["llava"], weight_decay=0.1,
                      mm_projector_lr=1e-4).resolved()
    model = build_model(cfg).model
    prepare_for_stage(model, cfg)
    groups = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["group"]: (g["weight_decay"], g["lr"], [names[id(p)] for p in g["params"]]) for g in groups}
    decay, _, lm_decay = by_group["language_model"]
    assert decay == 0.1 and all("norm" not in n and not n.endswith("bias") for n in lm_decay)
    assert any("layernorm" in n for n in by_group["language_model/no_decay"][2])
    assert by_group["projector"][1] == 1e-4 and by_group["projector/no_decay"][0] == 0.0


def test_existing_run_needs_resume_or_overwrite(src, data, tmp_path):
    kw = dict(model=src["llava"], learning_rate=1e-3, max_steps=1)
    run("finetune", data["chat"], tmp_path, data["folder"], **kw)
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        run("finetune", data["chat"], tmp_path, data["folder"], **kw)
    run("finetune", data["chat"], tmp_path, data["folder"], overwrite=True, **kw)


# Entry points ----------------------------------------------------------------------------------------
PRETRAIN_SH = """--deepspeed ./scripts/zero2.json --model_name_or_path {lm} --version plain
 --data_path {data} --image_folder {folder} --vision_tower {tower} --mm_projector_type mlp2x_gelu
 --tune_mm_mlp_adapter True --mm_vision_select_layer -2 --mm_use_im_start_end False
 --mm_use_im_patch_token False --bf16 True --output_dir {out} --num_train_epochs 1
 --per_device_train_batch_size 32 --per_device_eval_batch_size 4 --gradient_accumulation_steps 1
 --evaluation_strategy no --save_strategy steps --save_steps 24000 --save_total_limit 1 --learning_rate 1e-3
 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --tf32 True
 --model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True
 --report_to wandb"""
FINETUNE_LORA_SH = """--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5
 --deepspeed ./scripts/zero3.json --model_name_or_path {lm} --version v1 --data_path {data}
 --image_folder {folder} --vision_tower {tower} --pretrain_mm_mlp_adapter {proj} --mm_projector_type mlp2x_gelu
 --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False
 --image_aspect_ratio pad --group_by_modality_length True --bf16 True --output_dir {out} --num_train_epochs 1
 --per_device_train_batch_size 16 --gradient_accumulation_steps 1 --learning_rate 2e-4 --weight_decay 0.
 --warmup_ratio 0.03 --lr_scheduler_type cosine --model_max_length 2048 --gradient_checkpointing True"""


def test_original_flags_map_onto_our_config(src, tmp_path):
    from llava.train.train import config_from_original

    paths = dict(lm=src["lm"], tower=src["tower"], data="d.json", folder="imgs", out=str(tmp_path / "o"),
                 proj="p/mm_projector.bin")
    cfg, notes = config_from_original(PRETRAIN_SH.format(**paths).split())
    assert (cfg.stage, cfg.template, cfg.language_model, cfg.vision_tower) == ("pretrain", "plain", src["lm"],
                                                                               src["tower"])
    assert (cfg.learning_rate, cfg.micro_batch_size, cfg.grad_accum, cfg.bf16, cfg.report_to) == \
        (1e-3, 32, 1, True, ("wandb",))
    assert (cfg.projector_type, cfg.vision_feature_layer, cfg.image_aspect_ratio, cfg.num_workers) == \
        ("mlp2x_gelu", -2, "square", 4)
    assert cfg.mm_patch_merge_type == "flat"  # the original's default for a fresh build
    assert (cfg.save_steps, cfg.save_total_limit, cfg.warmup_ratio, cfg.lr_scheduler) == (24000, 1, 0.03, "cosine")
    text = "\n".join(notes)
    assert "--deepspeed ./scripts/zero2.json: DeepSpeed is not used; run torchrun" in text and "--strategy ddp" in text
    assert "--lazy_preprocess" in text and "--tf32" in text and "--evaluation_strategy" in text
    cfg, notes = config_from_original(FINETUNE_LORA_SH.format(**paths).split())
    assert (cfg.stage, cfg.template, cfg.lora_r, cfg.lora_alpha, cfg.mm_projector_lr) == ("lora", "v1", 128, 256, 2e-5)
    assert cfg.group_by_modality_length and cfg.image_aspect_ratio == "pad" and cfg.pretrain_mm_mlp_adapter
    assert any("zero3.json" in n and "--strategy fsdp" in n for n in notes)
    cfg, _ = config_from_original(FINETUNE_LORA_SH.format(**paths).split() + ["--bits", "4"])
    assert cfg.stage == "qlora"
    cfg, _ = config_from_original(["--model_name_or_path", src["llava"], "--data_path", "d", "--output_dir", "o"])
    assert (cfg.stage, cfg.model, cfg.language_model, cfg.template) == ("finetune", src["llava"], None, "v0")
    # a checkpoint keeps its own aspect and merge (a LLaVA-1.6 one stays spatial_unpad) unless the flags are given
    assert cfg.image_aspect_ratio is None and cfg.mm_patch_merge_type is None
    with pytest.raises(ValueError, match="vision_tower"):
        config_from_original(["--model_name_or_path", src["lm"], "--data_path", "d", "--output_dir", "o"])


def test_original_entry_point_trains(src, data, tmp_path, capsys):
    from llava.train.train import main

    out = tmp_path / "llava-v1.5-tiny-pretrain"
    argv = (PRETRAIN_SH.format(lm=src["lm"], tower=src["tower"], data=data["plain"], folder=data["folder"], out=out,
                               proj="") + " --max_steps 2 --per_device_train_batch_size 4 --bf16 False"
            " --report_to none --dataloader_num_workers 0").split()
    assert main(argv) == 0
    assert "DeepSpeed is not used" in capsys.readouterr().err
    assert (out / "mm_projector.bin").exists() and load_checkpoint(out).layout == "hf"


def test_llava_train_command(src, data, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="llava")
    add_train_command(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli"
    args = parser.parse_args(["train", "--stage", "finetune", "--model", src["llava"], "--data", str(data["chat"]),
                              "--image-folder", str(data["folder"]), "--out", str(out), "--max-steps", "2",
                              "--micro-batch-size", "2", "--grad-accum", "2", "--lr", "1e-4", "--no-progress",
                              "--no-gradient-checkpointing", "--save-steps", "1", "--save-total-limit", "1"])
    assert args.func(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # the last step is the final model
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["micro_batch"], state["grad_accum"], state["global_batch"]) == (2, 2, 4)
    assert load_checkpoint(out).layout == "hf"


def test_bad_rows_are_named_before_training(src, data, tmp_path):
    with pytest.raises(ValueError, match="6 of 8 rows cannot be trained on.*\n  row img-0: the plain template"):
        run("pretrain", data["chat"], tmp_path / "o", data["folder"], model=src["llava"], max_steps=1)


def test_bad_row_names_the_row(src, tmp_path):
    bad = tmp_path / "bad.json"
    draw(tmp_path / "a.png", "red", "circle")
    bad.write_text(json.dumps([{"id": "row-7", "image": "missing.png",
                                "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                  {"from": "gpt", "value": "A."}]}]))
    with pytest.raises(ValueError, match="row row-7: image file not found"):
        run("finetune", bad, tmp_path / "o", tmp_path, model=src["llava"], max_steps=1, micro_batch_size=1,
            global_batch_size=1)
