"""The Python API, the `llava` CLI and the original-compatible entry points, on a tiny checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llava
from llava.checkpoint import save_checkpoint
from llava.generate.engine import ContextTooLong
from llava.processing.image import ImageError, ImageProcessor
from llava.processing.tokenize import PromptError
from llava.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "examples" / "shapes.png")
IMAGE2 = str(ROOT / "examples" / "two_circles.png")
GREEDY = dict(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    model, tok = tiny_model("tiny", seed=3)
    path = tmp_path_factory.mktemp("tiny-llava-v1")  # "v1" in the name: template chosen like the original would
    save_checkpoint(model, tok, ImageProcessor(crop_size=28), path, layout="hf")
    return str(path)


@pytest.fixture(scope="module")
def pipe(ckpt_dir):
    return llava.load(ckpt_dir, device="cpu")


def _cli(*args, stdin=None, module="llava.cli"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, input=stdin,
                          env=env, timeout=180, cwd=ROOT)


def test_generate_one_and_batch_agree(pipe):
    one = pipe.generate("What is shown?", images=IMAGE, **GREEDY)
    assert isinstance(one, str)
    batch = pipe.generate(["What is shown?", "Say hi.", "Count them."], images=[IMAGE, None, [IMAGE2]], **GREEDY)
    assert batch[0] == one
    assert batch[1] == pipe.generate("Say hi.", **GREEDY)
    assert batch[2] == pipe.generate("Count them.", images=IMAGE2, **GREEDY)


def test_chat_multi_turn_and_stream(pipe):
    messages = [{"role": "user", "content": "Describe it.", "images": [IMAGE]}]
    first = pipe.chat(messages, **GREEDY)
    assert "".join(pipe.stream(messages, **GREEDY)).strip() == first
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And the colour?"}]
    prepared = pipe.prepare_chat(messages)
    assert prepared.prompt.count("<image>") == 1
    assert prepared.prompt.endswith("USER: And the colour? ASSISTANT:")
    assert isinstance(pipe.chat(messages, **GREEDY), str)


def test_bad_inputs_give_clear_errors(pipe, tmp_path):
    with pytest.raises(ImageError, match="missing.png"):
        pipe.generate("What?", images=str(tmp_path / "missing.png"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError, match="corrupt.png"):
        pipe.generate("What?", images=str(corrupt))
    with pytest.raises(PromptError, match="2 <image> tag"):
        pipe.generate("<image> and <image>", images=IMAGE, raw=True)
    with pytest.raises(PromptError, match="0 <image> tag"):
        pipe.generate("no tags here", images=IMAGE, raw=True)
    with pytest.raises(ContextTooLong):
        pipe.generate("word " * 2000, **GREEDY)
    with pytest.raises(ValueError, match="valid"):
        llava.api.LlavaPipeline(pipe.checkpoint, template="nope")
    with pytest.raises(TypeError, match="unknown sampling argument"):
        pipe.generate("hi", temprature=0.1)


def test_cli_run_prints_only_the_answer(ckpt_dir, pipe):
    out = _cli("run", "--model", ckpt_dir, "--image", IMAGE, "--query", "What is shown?", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == pipe.generate("What is shown?", images=IMAGE, **GREEDY)


def test_cli_errors_name_the_problem(ckpt_dir):
    out = _cli("run", "--model", ckpt_dir, "--image", "nowhere.png", "--query", "hi")
    assert out.returncode == 2
    assert "nowhere.png" in out.stderr and "Traceback" not in out.stderr
    out = _cli("run", "--model", "/no/such/model", "--query", "hi")
    assert out.returncode == 2 and "/no/such/model" in out.stderr


def test_cli_chat_streams_and_exits(ckpt_dir):
    out = _cli("chat", "--model", ckpt_dir, "--image", IMAGE, "--temperature", "0", "--max-new-tokens", "4",
               stdin="What is it?\nAnd now?\n\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ASSISTANT:") == 2 and out.stdout.rstrip().endswith("exit...")


def test_cli_info_and_convert_round_trip(ckpt_dir, pipe, tmp_path):
    out = _cli("info", ckpt_dir, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["layout"] == "hf"
    original = tmp_path / "llava-v1-original"
    assert _cli("convert", ckpt_dir, str(original), "--to", "original").returncode == 0
    # the original-layout copy answers the same through the original's quick-start entry point
    out = _cli("--model-path", str(original), "--image-file", IMAGE, "--query", "What is shown?",
               "--temperature", "0", "--max_new_tokens", "8", module="llava.eval.run_llava")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == pipe.generate("What is shown?", images=IMAGE, **GREEDY)


def test_load_pretrained_model_signature(ckpt_dir):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, context_len = load_pretrained_model(ckpt_dir, None, "tiny-llava-v1", device="cpu")
    assert context_len == model.config.context_length
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    assert image_processor.crop_size == 28
    assert isinstance(next(model.parameters()), torch.Tensor)


def test_im_start_end_checkpoints_wrap_each_image(ckpt_dir):
    from llava.api import wrap_image_tags
    from llava.checkpoint.build import resize_vocab
    from llava.checkpoint.loader import _original_tokens
    from llava.checkpoint.tokenizer import add_special_tokens

    assert wrap_image_tags("<image>\nA <im_start><image><im_end> B") == (
        "<im_start><image><im_end>\nA <im_start><image><im_end> B")
    pipe = llava.load(ckpt_dir, device="cpu")
    pipe.model.config.extra["mm_use_im_start_end"] = True  # as an original v1-era config sets it
    add_special_tokens(pipe.tokenizer, _original_tokens(pipe.model.config))  # as the loader does
    resize_vocab(pipe.model, len(pipe.tokenizer))
    start, end = pipe.tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    ids = pipe.prepare("What is shown?", images=IMAGE).request.input_ids
    image = pipe.model.config.image_token_index
    first, last = ids.index(image), len(ids) - 1 - ids[::-1].index(image)
    assert ids[first - 1] == start and ids[last + 1] == end
    assert isinstance(pipe.generate("What is shown?", images=IMAGE, **GREEDY), str)


def test_chat_loop_debug_prints_prompt_and_outputs(pipe):
    from llava.serve.cli import chat_loop

    inputs, written = iter(["What is shown?", ""]), []
    chat_loop(pipe, [IMAGE], dict(GREEDY), read=lambda _: next(inputs), write=written.append, debug=True)
    text = "".join(written)
    assert "{'prompt': " in text and "'outputs': " in text and r"USER: <image>\nWhat is shown? ASSISTANT:" in text
    assert text.rstrip().endswith("exit...")
