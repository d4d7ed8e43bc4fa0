"""Tiny training fixtures shared by test_train.py and test_resume.py: model folders and data."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from safetensors.torch import load_file

from llava.checkpoint import save_checkpoint
from llava.checkpoint.build import image_processor_for
from llava.tiny import tiny_model

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def draw(path: Path, color: str, shape: str, size: tuple[int, int] = (28, 28)) -> None:
    img = PIL.Image.new("RGB", size, (255, 255, 255))
    d = PIL.ImageDraw.Draw(img)
    w, h = size
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
    img.save(path)


def write_data(folder: Path, *, n_image: int = 8, n_text: int = 0, plain: bool = False,
               sizes: tuple[tuple[int, int], ...] = ((28, 28),), name: str = "data.json") -> Path:
    """LLaVA JSON with `n_image` image rows (PNG files drawn with PIL) and `n_text` text-only rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_image):
        color, shape = list(COLORS)[i % len(COLORS)], SHAPES[(i // len(COLORS)) % 2]
        size = sizes[i % len(sizes)]
        file = f"img{i}.png"
        draw(folder / file, color, shape, size)
        if plain:
            conv = [{"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": f"A {color} {shape}."}]
        else:
            conv = [{"from": "human", "value": "<image>\nWhat color is the shape?"},
                    {"from": "gpt", "value": f"The shape is {color}."},
                    {"from": "human", "value": "What shape is it?"},
                    {"from": "gpt", "value": f"It is a {shape}."}]
        rows.append({"id": f"img-{i}", "image": file, "conversations": conv})
    for i in range(n_text):
        rows.append({"id": f"text-{i}", "conversations": [
            {"from": "human", "value": f"Count to {['two', 'three', 'four'][i % 3]}."},
            {"from": "gpt", "value": ["one two", "one two three", "one two three four"][i % 3]}]})
    path = folder / name
    path.write_text(json.dumps(rows))
    return path


def make_sources(root: Path, preset: str = "tiny", seed: int = 0) -> dict[str, str]:
    """A plain LM folder, a CLIP tower folder and a llava-hf checkpoint of the same tiny model."""
    model, tok = tiny_model(preset, seed=seed)
    lm, tower, llava = root / "lm", root / "tower", root / "llava"
    model.language_model.save_pretrained(lm)
    tok.save_pretrained(lm)
    model.vision_tower.save_pretrained(tower)
    save_checkpoint(copy.deepcopy(model), copy.deepcopy(tok), image_processor_for(model.config), llava, layout="hf")
    return {"lm": str(lm), "tower": str(tower), "llava": str(llava)}


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


# -- processes: `torchrun` and CLI runs that must never hang the suite ---------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(cmd: list[str], timeout: float) -> str:
    """Run a command in its own process group (one thread per process, offline); kill the whole group
    if it overruns; fail with the output's tail on timeout or a non-zero exit. Returns the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... timed out after {timeout}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexited {proc.returncode}:\n{output[-4000:]}"
    return output


def torchrun_command(args: list[str], nproc: int = 2) -> list[str]:
    """`torchrun --nproc_per_node N args...` on loopback with a free port, via this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *args]
