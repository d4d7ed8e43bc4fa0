"""Issue 21 (checkpoint parts): corrupt, truncated and empty checkpoint files, hub names without a
network, and conversion outputs that are never half-written or written over the source.

Every file a load reads, in every layout, is corrupted in turn: `describe`, `load_checkpoint`
and `convert` must raise `CheckpointError` (never a library's own exception) naming the file.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from llava.checkpoint import convert, describe, load_checkpoint, save_checkpoint
from llava.checkpoint import keys
from llava.checkpoint.build import image_processor_for
from llava.checkpoint.original import to_original_config
from llava.checkpoint.tokenizer import load_tokenizer
from llava.errors import CheckpointError, CheckpointNotFound, OutputPathError
from llava.tiny import tiny_model
from test_tokenizers import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]


# A small world of checkpoints, built once and copied per case -------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """hf, original (sharded .bin), SentencePiece-only, projector-only and LoRA folders, with the
    plain LM base and the separate vision tower the last two need."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("world")
    model, tok = tiny_model("tiny", seed=3)
    proc = image_processor_for(model.config)
    save_checkpoint(copy.deepcopy(model), copy.deepcopy(tok), proc, root / "hf", layout="hf")
    save_checkpoint(model, tok, proc, root / "orig", layout="original", safe_serialization=False,
                    max_shard_bytes=40_000)
    model.vision_tower.save_pretrained(root / "tower")
    model.language_model.save_pretrained(root / "base")  # writes generation_config.json too
    tok.save_pretrained(root / "base")

    sp_tok = load_tokenizer(train_sentencepiece(root / "sp-train"))
    sp_model, sp_tok = tiny_model("tiny", seed=4, tokenizer=sp_tok)
    save_checkpoint(sp_model, sp_tok, image_processor_for(sp_model.config), root / "sp", layout="original")
    (root / "sp" / "tokenizer.json").unlink()  # as released: tokenizer.model only

    cfg = to_original_config(model.config) | {"mm_vision_tower": "nobody/tiny-tower"}  # tower passed explicitly
    (root / "projector").mkdir()
    (root / "projector" / "config.json").write_text(json.dumps(cfg))
    state = keys.to_original(model.state_dict())
    torch.save({k: v for k, v in state.items() if "mm_projector" in k}, root / "projector" / "mm_projector.bin")

    peft_lm = get_peft_model(copy.deepcopy(model.language_model), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_lm.save_pretrained(root / "lora")
    (root / "lora" / "config.json").write_text(json.dumps(cfg))
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in model.projector.state_dict().items()},
               root / "lora" / "non_lora_trainables.bin")
    return root


NEEDS_BASE = {"projector", "lora"}


def _load(folder: Path, kind: str, op: str, out: Path):
    extra = {"model_base": str(folder.parent / "base"), "vision_tower": str(folder.parent / "tower")} \
        if kind in NEEDS_BASE else {}
    if op == "describe":
        return describe(folder)
    if op == "load":
        return load_checkpoint(folder, **extra)
    return convert(folder, out, to="original", **extra)


def _shard(folder: Path) -> str:
    return sorted(p.name for p in folder.glob("pytorch_model-*.bin"))[0]


# (kind of checkpoint, file in it or in base/tower, whether `describe` reads it)
CASES = [
    ("hf", "config.json", True), ("hf", "model.safetensors", True), ("hf", "tokenizer.json", True),
    ("hf", "tokenizer_config.json", True), ("hf", "preprocessor_config.json", True),
    ("orig", "pytorch_model.bin.index.json", True), ("orig", "<shard>", True), ("orig", "config.json", True),
    ("sp", "tokenizer.model", True), ("sp", "model.safetensors", True),
    ("projector", "mm_projector.bin", True), ("projector", "../base/config.json", False),
    ("projector", "../base/model.safetensors", False), ("projector", "../tower/model.safetensors", False),
    ("projector", "../tower/config.json", False),
    ("lora", "adapter_config.json", True), ("lora", "adapter_model.safetensors", True),
    ("lora", "non_lora_trainables.bin", True), ("lora", "../base/tokenizer.json", False),
]


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # garbage at the start, same length
        junk = b"\xff\x00garbage{" * 8
        path.write_bytes(junk + data[len(junk):])


def _case(world: Path, tmp_path: Path, kind: str, name: str) -> tuple[Path, Path]:
    copied = tmp_path / "w"
    shutil.copytree(world, copied, ignore=shutil.ignore_patterns("sp-train"))
    folder = copied / kind
    target = folder / (_shard(folder) if name == "<shard>" else name)
    return folder, Path(os.path.normpath(target))


@pytest.mark.parametrize("kind, name, described", CASES, ids=[f"{k}:{n}" for k, n, _ in CASES])
@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_corrupt_file_is_named(world, tmp_path, kind, name, described, how):
    folder, target = _case(world, tmp_path, kind, name)
    _corrupt(target, how)
    ops = ["load", "describe", "convert"] if how == "truncated" else ["load"]
    for op in ops:
        if op == "describe" and not described:
            describe(folder)  # files it has no need to read do not stop it
            continue
        with pytest.raises(CheckpointError) as err:
            _load(folder, kind, op, tmp_path / "out")
        message = str(err.value)
        assert str(target) in message and "\n" not in message, (op, message)
        assert not (tmp_path / "out").exists()


def test_intact_world_loads(world, tmp_path):
    """The baseline of the corruption cases: every kind loads, describes and converts untouched."""
    for kind in ("hf", "orig", "sp", "projector", "lora"):
        for op in ("load", "describe", "convert"):
            _load(world / kind, kind, op, tmp_path / f"{kind}-out")


def test_unread_generation_config_is_ignored(world, tmp_path):
    folder, target = _case(world, tmp_path, "lora", "../base/generation_config.json")
    _corrupt(target, "truncated")
    _load(folder, "lora", "load", tmp_path / "out")  # transformers' generation defaults are not read


def test_invalid_config_json_message(world, tmp_path):
    folder, target = _case(world, tmp_path, "hf", "config.json")
    text = target.read_text().replace('"image_token_index": ', '"image_token_index": ,', 1)
    target.write_text(text)
    at = text.index('"image_token_index": ,') + len('"image_token_index": ')
    line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(target))} is not valid JSON \(line {line} column {column}: "
                                              r"Expecting value\)"):
        describe(folder)
    target.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(target))} holds a JSON list, not an object"):
        load_checkpoint(folder)


def test_index_naming_a_missing_shard(world, tmp_path):
    folder, target = _case(world, tmp_path, "orig", "<shard>")
    target.unlink()
    with pytest.raises(CheckpointNotFound, match=rf"pytorch_model\.bin\.index\.json names 1 shard.*{re.escape(target.name)}"):
        load_checkpoint(folder)


# Hub names ----------------------------------------------------------------------------------------
def test_unknown_hub_name_offline_fails_fast():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest
    start = time.perf_counter()
    with pytest.raises(CheckpointNotFound, match=r"'nobody/no-such-llava' is not a local folder, and not in the "
                                                 r"Hugging Face cache \(offline: HF_HUB_OFFLINE is set\)"):
        load_checkpoint("nobody/no-such-llava")
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("path", ["./nobody/no-such-llava", "~/no/such/llava", "a/b/c", "tests/no-such-llava"])
def test_local_looking_path_is_not_looked_up(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # `tests/...` starts with a folder that exists: a mistyped local path, not a repo
    with pytest.raises(CheckpointNotFound, match=r"^checkpoint folder not found: "):
        describe(path)


def test_cached_hub_snapshot_is_used_offline(world, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-llava"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(world / "hf", repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    info = describe("someone/tiny-llava")
    assert info["name"] == "tiny-llava" and info["path"] == str(repo / "snapshots" / commit)


_NO_NETWORK_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from llava.checkpoint import describe
    from llava.checkpoint.original import resolve_vision_config
    out = {}
    for key, call in (("model", lambda: describe("nobody/no-such-llava")),
                      ("tower", lambda: resolve_vision_config({"mm_vision_tower": "nobody/no-such-tower"}))):
        start = time.perf_counter()
        try:
            call()
            out[key] = ["no error", 0.0]
        except Exception as err:
            out[key] = [f"{type(err).__name__}: {err}", time.perf_counter() - start]
    print(json.dumps(out))
""")


def test_unknown_hub_name_without_offline_flag_fails_fast(tmp_path):
    """No HF_HUB_OFFLINE and no network (this sandbox): one unretried request, then the cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_ETAG_TIMEOUT="2", TRANSFORMERS_VERBOSITY="error")
    run = subprocess.run([sys.executable, "-c", _NO_NETWORK_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    message, seconds = out["model"]
    assert message.startswith("CheckpointNotFound: 'nobody/no-such-llava' is not a local folder, and not in the "
                              "Hugging Face cache (") and seconds < 2.5, out
    assert "could not reach the hub" in message or "no such repo on the hub" in message
    message, seconds = out["tower"]
    assert message.startswith("CheckpointNotFound: ") and "nobody/no-such-tower" in message and seconds < 2.5, out


# Saved files ----------------------------------------------------------------------------------------
def test_saved_files_honour_the_umask(world, tmp_path):
    old = os.umask(0o002)
    try:
        convert(world / "hf", tmp_path / "out", to="original")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o664}, modes
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o775


def test_original_layout_round_trip_has_no_model_type_warning(world, tmp_path):
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = hf_logging.get_logger()
    level = hf_logger.level
    hf_logger.addHandler(handler)
    hf_logger.setLevel(logging.WARNING)
    try:
        convert(world / "hf", tmp_path / "orig", to="original")
        convert(tmp_path / "orig", tmp_path / "hf", to="hf")
        load_checkpoint(tmp_path / "orig")
    finally:
        hf_logger.removeHandler(handler)
        hf_logger.setLevel(level)
    assert not [r for r in records if "to instantiate a model of type" in r.getMessage()]


def test_info_shows_an_embedded_tower_not_its_build_path():
    bundled = ROOT / "llava" / "assets" / "tiny-llava"
    side = json.loads((bundled / "config.json").read_text())["vision_config"]["image_size"]
    info = describe(bundled)
    assert info["vision_tower"] == (f"CLIP ViT: hidden 128, 4 layers, {side}x{side} px, patch 16 "
                                    "(weights in the checkpoint)")


# Conversion outputs ---------------------------------------------------------------------------------
def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_convert_refuses_unsafe_destinations(world, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(world / "hf", src)
    before = _listing(src)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    (tmp_path / "a-file").write_text("x")
    refusals = [
        (tmp_path / "full", False, r"full exists and is not empty; pass --overwrite"),
        (src, True, r"src is the source folder"),
        (src / "sub", True, r"sub is inside the source folder"),
        (tmp_path, True, r"contains the source folder"),
        (tmp_path / "a-file" / "out", False, r"cannot create .*out: .*a-file is a file"),
        (tmp_path / "a-file", True, r"a-file exists and is a file"),
    ]
    for dst, overwrite, message in refusals:
        with pytest.raises(OutputPathError, match=message):
            convert(src, dst, overwrite=overwrite)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    (tmp_path / "home" / "photos").mkdir()
    with pytest.raises(OutputPathError, match="not a checkpoint folder"):
        convert(src, tmp_path / "home", overwrite=True)
    assert _listing(src) == before and (tmp_path / "home" / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.old-*"))


def test_convert_overwrites_only_when_complete(world, tmp_path, monkeypatch):
    import llava.checkpoint.loader as loader

    (tmp_path / "empty").mkdir()
    convert(world / "hf", tmp_path / "empty", to="original")  # an empty folder may be written into
    dst = tmp_path / "dst"
    convert(world / "orig", dst, to="hf")
    old = _listing(dst)

    def fail_midway(model, tokenizer, processor, path, layout):
        Path(path, "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(loader, "save_checkpoint", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(world / "hf", dst, to="original", overwrite=True)
    assert _listing(dst) == old
    with pytest.raises(RuntimeError, match="disk full"):
        convert(world / "hf", tmp_path / "new", to="original")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    convert(world / "hf", dst, to="original", overwrite=True)
    assert load_checkpoint(dst).layout == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "empty"]


# The child converts with safetensors writes slowed down, so the kill lands mid-write every time.
_KILLED_SCRIPT = textwrap.dedent("""
    import sys, time
    import llava.checkpoint.io as io
    real = io.save_file
    def slow(*args, **kwargs):
        real(*args, **kwargs)
        print("WROTE", flush=True)
        time.sleep(120)
    io.save_file = slow
    src, dst, overwrite = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if overwrite:
        from llava.checkpoint import convert
        convert(src, dst, to="hf", overwrite=True)
    else:
        from llava.cli import main
        sys.exit(main(["convert", src, dst, "--to", "hf"]))
""")


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-dst", "overwrite"])
def test_convert_killed_mid_write_leaves_no_partial_destination(world, tmp_path, overwrite):
    dst = tmp_path / "dst"
    if overwrite:
        shutil.copytree(world / "hf", dst)
    before = _listing(dst) if overwrite else None
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SCRIPT, str(world / "orig"), str(dst), str(int(overwrite))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "WROTE", child.stderr.read()[-2000:]
        temps = list(tmp_path.glob("dst.tmp-*"))
        assert len(temps) == 1 and (temps[0] / "model.safetensors").is_file()  # a half-written checkpoint...
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    if overwrite:
        assert _listing(dst) == before  # ...never under DST's name
    else:
        assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "dst"] == [temps[0].name]
