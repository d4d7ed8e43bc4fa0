"""llava-hf exports that transformers' whole stack can use: AutoProcessor, the chat template,
and generation that gives our pipeline's answers token for token."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jinja2
import PIL.Image
import pytest
import torch
from transformers import (AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration,
                          LlavaNextForConditionalGeneration)

import llava
from llava.checkpoint import convert, save_checkpoint
from llava.checkpoint.build import image_processor_for
from llava.checkpoint.hf import from_hf_config, hf_processor_kwargs, to_hf_config
from llava.checkpoint.loader import prepare_for_hf
from llava.errors import CheckpointError
from llava.processing.templates import TEMPLATES, get_template
from llava.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "llava" / "assets" / "tiny-llava"
EXAMPLES = ROOT / "examples"
NAMES = sorted({t.name for t in TEMPLATES.values()})  # every template once (aliases share objects)
SYSTEM = "Be brief. It's \"fine\" to say:\n<none> — über."


def _messages(turns: list[str], images: tuple[int, ...] = (1,), system: str | None = None) -> list[dict]:
    """llava-hf chat messages: user turn k gets images[k] image parts before its text."""
    out = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    for i, text in enumerate(turns):
        if i % 2:
            out.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
            continue
        n = images[i // 2] if i // 2 < len(images) else 0
        out.append({"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]})
    return out


def _our_turns(turns: list[str], images: tuple[int, ...] = (1,)) -> list[str]:
    """The same turns as llava.api builds them: image tags in front, one line each."""
    return [("<image>\n" * (images[i // 2] if i // 2 < len(images) else 0) if i % 2 == 0 else "") + t
            for i, t in enumerate(turns)]


CONVERSATIONS = [  # (turns, images per user turn, system)
    (["What is shown?"], (1,), None),
    (["Describe it."], (0,), None),
    (["Compare them."], (2,), None),
    (["What is shown?", "A red circle.", "And its size?"], (1, 0), None),
    (["Q1", "A1", "Q2", "A2", "Q3"], (1, 1, 0), None),
    (["What is shown?"], (1,), SYSTEM),
    (["Q1", "A1", "Q2"], (1,), SYSTEM),
    (["Q1", "A1"], (1,), None),  # a finished conversation, no generation prompt
    (["Q1", "A1", "Q2", "A2"], (1, 1), SYSTEM),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("name", NAMES)
def test_chat_template_renders_as_our_template(tok, name: str) -> None:
    template = get_template(name)
    jinja = template.chat_template()
    for turns, images, system in CONVERSATIONS:
        ours = template if system is None else template.with_system(system)
        open_turn = len(turns) % 2 == 1
        expected = ours.render(_our_turns(turns, images) + ([None] if open_turn else []))
        got = tok.apply_chat_template(_messages(turns, images, system), chat_template=jinja, tokenize=False,
                                      add_generation_prompt=open_turn)
        assert got == expected, (name, turns, system)
    # string contents are used as they are; a system message may be a plain string too
    assert tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "<image>\nQ"}],
                                   chat_template=jinja, tokenize=False, add_generation_prompt=True) \
        == template.with_system("S").render(["<image>\nQ", None])


def test_chatml_custom_system_keeps_its_header() -> None:
    t = get_template("chatml_direct").with_system("Be brief.")
    assert t.render(["Q", None]).startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nQ")
    assert get_template("vicuna_v1").with_system("S").render(["Q", None]) == "S USER: Q ASSISTANT:"


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "A"}],
    [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"}],
    [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"}],
], ids=["assistant-first", "two-users", "late-system"])
def test_chat_template_rejects_bad_role_order(tok, messages) -> None:
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        tok.apply_chat_template(messages, chat_template=get_template("vicuna_v1").chat_template(), tokenize=False)


def test_siglip_feature_strategy_round_trip() -> None:
    """transformers' "default" drops the first row, which SigLIP (no CLS) needs; so "full"."""
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=28, patch_size=14)
    model, _ = tiny_model("tiny", vision_config=vision)
    cfg = to_hf_config(model.config)
    assert cfg["vision_feature_select_strategy"] == "full"
    assert hf_processor_kwargs(model.config)["num_additional_image_tokens"] == 0
    assert from_hf_config(cfg).vision_feature_select == "patch"
    old_export = cfg | {"vision_feature_select_strategy": "default"}  # as we wrote SigLIP before
    assert from_hf_config(old_export).vision_feature_select == "patch"
    foreign = {k: v for k, v in old_export.items() if k != "llava_extra"}
    with pytest.raises(CheckpointError, match="SigLIP"):
        from_hf_config(foreign)


# The whole transformers stack ------------------------------------------------------------------
def _transformers_answer(folder: Path, model_class, messages: list[dict], images: list[PIL.Image.Image],
                         max_new_tokens: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(prompt ids, greedy new ids without EOS, pixel values) from AutoProcessor + model.generate."""
    processor = AutoProcessor.from_pretrained(folder)
    model = model_class.from_pretrained(folder).eval()
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    return inputs["input_ids"][0].tolist(), new[:new.index(eos)] if eos in new else new, inputs["pixel_values"]


def _our_answer(folder: Path, turns: list[str], images: tuple[int, ...], system: str | None,
                pil: list[PIL.Image.Image], max_new_tokens: int):
    """(pipeline, prompt ids, greedy new ids) from `llava.load` with llava.api's messages."""
    pipe = llava.load(folder, device="cpu")
    chat = [] if system is None else [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        if i % 2:
            chat.append({"role": "assistant", "content": text})
            continue
        n = images[i // 2] if i // 2 < len(images) else 0
        chat.append({"role": "user", "content": text, "images": pil[:n]})
        pil = pil[n:]
    prepared = pipe.prepare_chat(chat)
    completion = pipe.complete([prepared], temperature=0, max_new_tokens=max_new_tokens)[0]
    return pipe, prepared.request.input_ids, completion.token_ids


@pytest.fixture(scope="module")
def bundled_hf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "tiny-llava-hf"
    convert(BUNDLED, folder, to="hf")
    return folder


def test_converted_folder_has_complete_processor_files(bundled_hf: Path) -> None:
    processor = json.loads((bundled_hf / "processor_config.json").read_text())
    nested = processor.pop("image_processor")
    assert processor == {"processor_class": "LlavaProcessor", "patch_size": 16, "vision_feature_select_strategy":
                         "default", "num_additional_image_tokens": 1, "image_token": "<image>"}
    preprocessor = json.loads((bundled_hf / "preprocessor_config.json").read_text())
    assert {k: nested[k] for k in preprocessor} == preprocessor  # one image processor, described twice
    side = json.loads((BUNDLED / "config.json").read_text())["vision_config"]["image_size"]
    assert preprocessor["crop_size"] == {"height": side, "width": side}
    jinja = get_template("vicuna_v1").chat_template()
    assert (bundled_hf / "chat_template.jinja").read_text() == jinja
    assert AutoTokenizer.from_pretrained(bundled_hf).chat_template == jinja
    assert json.loads((bundled_hf / "config.json").read_text())["llava_extra"]["template"] == "vicuna_v1"


@pytest.mark.parametrize("turns,images,system,files", [
    (["What color is the circle?"], (1,), None, ["color.png"]),
    (["How many circles are there?", "There are two circles.", "What shape is red?"], (1, 1),
     "A chat about shapes.", ["two_circles.png", "shapes.png"]),
], ids=["one-image", "two-turns-system"])
def test_transformers_generate_equals_ours_on_bundled_model(bundled_hf: Path, turns, images, system, files) -> None:
    pil = [PIL.Image.open(EXAMPLES / name).convert("RGB") for name in files]
    messages = _messages(turns, images, system)
    hf_ids, hf_new, hf_pixels = _transformers_answer(bundled_hf, LlavaForConditionalGeneration, messages, pil, 12)
    pipe, our_ids, our_new = _our_answer(bundled_hf, turns, images, system, pil, 12)
    assert hf_ids == our_ids
    side = pipe.model.config.vision_config.image_size
    assert hf_pixels.shape == (len(pil), 3, side, side)
    assert torch.equal(hf_pixels, torch.cat(pipe.image_processor(pil)[0]))
    assert len(hf_new) > 0 and hf_new == our_new
    if len(turns) == 1:  # what `llava run` / `generate` answers is the same text
        answer = pipe.generate(turns[0], images=pil[0], temperature=0, max_new_tokens=12)
        assert answer == pipe.tokenizer.decode(hf_new, skip_special_tokens=True).strip()


def test_transformers_pipeline_answers_as_we_do(bundled_hf: Path) -> None:
    from transformers import pipeline

    image = PIL.Image.open(EXAMPLES / "shape.png").convert("RGB")
    pipe = pipeline("image-text-to-text", model=str(bundled_hf), device="cpu")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What shape is red?"}]}]
    out = pipe(text=messages, max_new_tokens=12, return_full_text=False, generate_kwargs={"do_sample": False})
    ours = llava.load(bundled_hf, device="cpu").generate("What shape is red?", images=image, temperature=0,
                                                         max_new_tokens=12)
    assert out[0]["generated_text"].strip() == ours


def test_trainer_output_loads_in_transformers(tmp_path: Path) -> None:
    from llava.train.checkpointing import write_full

    model, tok = tiny_model("tiny", seed=1)
    model.config.template = "llava_v1"
    prepare_for_hf(model, tok)
    write_full(model, model.state_dict(), tok, image_processor_for(model.config), str(tmp_path), layout="hf")
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert (processor.patch_size, processor.num_additional_image_tokens) == (14, 1)
    assert processor.chat_template == get_template("llava_v1").chat_template()
    LlavaForConditionalGeneration.from_pretrained(tmp_path)


def test_transformers_generate_equals_ours_on_anyres_model(tmp_path: Path) -> None:
    model, tok = tiny_model("tiny-anyres", seed=4, anyres_rounding="hf")
    assert model.image_newline is not None
    save_checkpoint(model, tok, image_processor_for(model.config), tmp_path, layout="hf")
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "LlavaNextProcessor"
    hf_ids, hf_new, our_ids, our_new = _next_answers(tmp_path, ["Describe the picture in detail.", "A red square.",
                                                                "Where is the square?"])
    assert hf_ids == our_ids
    assert len(hf_new) == 8 and hf_new == our_new


def _next_answers(folder: Path, turns: list[str]) -> tuple[list[int], list[int], list[int], list[int]]:
    """transformers' LlavaNext and ours, greedy, 8 new tokens, on a wide and a square picture:
    (their prompt ids, their new ids, our prompt ids, our new ids)."""
    pil = [PIL.Image.open(EXAMPLES / name).convert("RGB") for name in ("red_square_wide.png", "shapes.png")]
    hf_ids, hf_new, _ = _transformers_answer(folder, LlavaNextForConditionalGeneration, _messages(turns, (1, 1)),
                                             pil, 8)
    _, our_ids, our_new = _our_answer(folder, turns, (1, 1), None, pil, 8)
    return hf_ids, hf_new, our_ids, our_new


def test_a_model_turned_anyres_by_the_trainer_answers_in_transformers_as_ours(tmp_path: Path) -> None:
    """`llava train --model <1.5-style checkpoint> --image-aspect-ratio anyres` (LLaVA-NeXT's path) writes
    a llava_next folder that transformers' processor and generate read exactly as we do, wide pictures too."""
    from llava.train.build import build_model
    from llava.train.checkpointing import write_full
    from llava.train.config import TrainConfig

    model, tok = tiny_model("tiny", seed=2)
    assert model.config.image_aspect_ratio != "anyres"
    save_checkpoint(model, tok, image_processor_for(model.config), tmp_path / "v15", layout="hf")
    side = model.config.vision_config.image_size
    cfg = TrainConfig(stage="finetune", data="unused.json", out=str(tmp_path), model=str(tmp_path / "v15"),
                      image_aspect_ratio="anyres", image_grid_pinpoints=[(side, side), (side, 2 * side),
                                                                         (2 * side, side), (2 * side, 2 * side)])
    built = build_model(cfg.resolved())
    write_full(built.model, built.model.state_dict(), built.tokenizer, built.image_processor, str(tmp_path),
               layout=built.save_layout)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_next"
    hf_ids, hf_new, our_ids, our_new = _next_answers(tmp_path, ["What color is the square?", "Red.",
                                                                "What shape is in the picture?"])
    tokens_per_crop = (side // model.config.vision_config.patch_size) ** 2
    assert hf_ids == our_ids and len(our_ids) > 2 * 2 * tokens_per_crop  # every picture as the whole plus tiles
    assert len(hf_new) > 0 and hf_new == our_new


def test_a_model_trained_at_another_image_size_answers_in_transformers_as_ours(tmp_path: Path) -> None:
    """`llava train --model M --image-size N` goes on at N px: the tower's position embeddings resampled to the new
    patch grid, and the config, image processor and image token count saying so, so that transformers' processor
    and generate read the written folder as we do. Sizes the tower or the aspect mode cannot take are refused."""
    from llava.errors import InputError
    from llava.train.build import build_model
    from llava.train.checkpointing import write_full
    from llava.train.config import TrainConfig

    model, tok = tiny_model("tiny", seed=3)
    save_checkpoint(model, tok, image_processor_for(model.config), tmp_path / "low", layout="hf")
    side, patch = model.config.vision_config.image_size, model.config.vision_config.patch_size
    cfg = TrainConfig(stage="finetune", data="unused.json", out=str(tmp_path), model=str(tmp_path / "low"),
                      image_size=2 * side).resolved()
    built = build_model(cfg)
    write_full(built.model, built.model.state_dict(), built.tokenizer, built.image_processor, str(tmp_path),
               layout=built.save_layout)
    saved = json.loads((tmp_path / "config.json").read_text())
    grid = 2 * side // patch
    assert saved["vision_config"]["image_size"] == 2 * side and saved["image_seq_length"] == grid * grid
    assert built.image_processor.crop_size == 2 * side
    pil = [PIL.Image.open(EXAMPLES / "shapes.png").convert("RGB")]
    messages = _messages(["What shape is in the picture?"])
    hf_ids, hf_new, hf_pixels = _transformers_answer(tmp_path, LlavaForConditionalGeneration, messages, pil, 8)
    pipe, our_ids, our_new = _our_answer(tmp_path, ["What shape is in the picture?"], (1,), None, pil, 8)
    assert hf_pixels.shape[-1] == 2 * side and hf_ids.count(saved["image_token_index"]) == grid * grid
    assert hf_ids == our_ids and hf_new == our_new and len(hf_new) > 0
    with pytest.raises(InputError, match="not a multiple of the tower's patch size"):
        build_model(dataclasses.replace(cfg, image_size=2 * side + 1))
    with pytest.raises(InputError, match="must be a positive number of pixels"):
        build_model(dataclasses.replace(cfg, image_size=0))
    with pytest.raises(InputError, match="in units of the tower.s side"):
        build_model(dataclasses.replace(cfg, image_aspect_ratio="anyres"))


def test_a_checkpoint_goes_on_with_another_tower_of_its_kind(tmp_path: Path) -> None:
    """`llava train --model M --vision-tower T`: M's tower replaced by T (the same tower trained further, here at
    twice the side, as the tiny recipe's stage 0 goes on at a higher resolution); the projector kept, the image
    processor and config taking T's side, so transformers reads the written folder as we do. A tower of another
    width, or a folder that is no tower, is one clear error."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llava.errors import InputError
    from llava.model.vision import resize_tower_input
    from llava.train.build import build_model
    from llava.train.checkpointing import write_full
    from llava.train.config import TrainConfig

    model, tok = tiny_model("tiny", seed=3)
    save_checkpoint(model, tok, image_processor_for(model.config), tmp_path / "low", layout="hf")
    side = model.config.vision_config.image_size
    tower = model.vision_tower
    resize_tower_input(tower, 2 * side)
    with torch.no_grad():
        next(p for name, p in tower.named_parameters() if name.endswith("fc1.weight")).add_(0.01)
    tower.save_pretrained(tmp_path / "tower")
    cfg = TrainConfig(stage="finetune", data="unused.json", out=str(tmp_path / "out"), model=str(tmp_path / "low"),
                      vision_tower=str(tmp_path / "tower")).resolved()
    built = build_model(cfg)
    theirs = CLIPVisionModel.from_pretrained(tmp_path / "tower").state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in built.model.vision_tower.state_dict().items())
    kept = model.projector.state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in built.model.projector.state_dict().items())
    assert built.image_processor.crop_size == 2 * side and built.model.config.vision_config.image_size == 2 * side
    write_full(built.model, built.model.state_dict(), built.tokenizer, built.image_processor, str(tmp_path / "out"),
               layout=built.save_layout)
    pil = [PIL.Image.open(EXAMPLES / "shapes.png").convert("RGB")]
    hf_ids, hf_new, hf_pixels = _transformers_answer(tmp_path / "out", LlavaForConditionalGeneration,
                                                     _messages(["What shape is in the picture?"]), pil, 8)
    _, our_ids, our_new = _our_answer(tmp_path / "out", ["What shape is in the picture?"], (1,), None, pil, 8)
    assert hf_pixels.shape[-1] == 2 * side and hf_ids == our_ids and hf_new == our_new and len(hf_new) > 0

    wide = CLIPVisionConfig(**{**tower.config.to_dict(), "hidden_size": 2 * tower.config.hidden_size})
    CLIPVisionModel(wide).save_pretrained(tmp_path / "wide")
    with pytest.raises(InputError, match="is not the checkpoint's"):
        build_model(dataclasses.replace(cfg, vision_tower=str(tmp_path / "wide")))
    with pytest.raises(InputError, match="--vision-tower"):
        build_model(dataclasses.replace(cfg, vision_tower=str(tmp_path / "nothing")))
