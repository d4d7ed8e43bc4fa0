"""Loading materialises each weight once: a fresh process's peak memory while it loads a checkpoint
of a few hundred MB stays near the size of the model it gets (not checkpoint + model, nor an fp32
copy before quantizing), and an engine's first prefill, which fuses an int8 model's q/k/v and
gate/up into new buffers, leaves the resident size where it was. Outputs are unchanged:
test_checkpoints, test_quantize and test_hf_export compare loaded models against the models saved
and against transformers.

Peak memory is Linux's VmHWM, reset after the imports (so torch and transformers are not counted);
a memory bound, not a time bound.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
RATIO = 1.25  # peak rise <= RATIO x loaded model bytes + SLACK
SLACK = 64 * MiB  # tokenizer, configs, code paged in, heap slack (measured 10-60 MiB at this size)
ENGINE_SLACK = 24 * MiB  # an engine and its code paged in, over a loaded int8 model (10 MiB; 38 left unreturned)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK),
                                reason="peak RSS is read from Linux's /proc/self/status (VmHWM)")

# Runs in a fresh process: imports first, then the peak is reset and one checkpoint is loaded.
CHILD = r"""
import json, sys
import torch, transformers
from transformers import CLIPVisionModel, LlamaForCausalLM
from llava.checkpoint import load_checkpoint

folder, dtype, quantize = sys.argv[1], sys.argv[2], sys.argv[3] or None
if quantize in ("8bit", "4bit"):
    import bitsandbytes

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def model_bytes(model):
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for m in model.modules():
        weight = getattr(m, "weight", None)
        extras = [getattr(weight, "SCB", None)]
        state = getattr(weight, "quant_state", None)
        while state is not None:
            extras += list(vars(state).values())
            state = getattr(state, "state2", None)
        total += sum(t.numel() * t.element_size() for t in extras if isinstance(t, torch.Tensor))
    return total

base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
ckpt = load_checkpoint(folder, dtype=dtype, **({"quantize": quantize} if quantize else {}))
model = ckpt.model
loaded = {"base": base, "peak": status("VmHWM"), "model": model_bytes(model), "after": status("VmRSS")}
if quantize == "int8":  # an engine's first prefill fuses q/k/v and gate/up into new buffers
    from llava.generate import Engine, Request, SamplingParams
    Engine(model, ckpt.tokenizer, eos_token_ids=[]).generate([Request([1, 5, 9])], SamplingParams(max_new_tokens=2))
    loaded["engine"] = status("VmRSS")
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A ~126M-parameter LLaVA (4-layer 1024-wide Llama, vocab 32000; small CLIP tower) stored in fp16,
    as llava-hf safetensors and as the original layout's torch .bin (read through mmap)."""
    from llava.checkpoint import save_checkpoint
    from llava.checkpoint.build import image_processor_for
    from llava.config import preset
    from llava.model.llava import LlavaModel
    from llava.tiny import tiny_tokenizer

    config = preset("bench-200m")
    text = config.text_config.to_dict() | dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                                num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                                                vocab_size=32000)
    vision = config.vision_config.to_dict() | dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                                                    num_attention_heads=6)
    config = config.replace(text_config=text, vision_config=vision, image_token_index=511)
    with torch.device("meta"):
        model = LlavaModel(config)
    model = model.to_empty(device="cpu").to(torch.float16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02, generator=gen)
    root = tmp_path_factory.mktemp("load-memory")
    tok, proc = tiny_tokenizer(), image_processor_for(config)
    save_checkpoint(copy.deepcopy(model), copy.deepcopy(tok), proc, root / "hf", layout="hf")
    save_checkpoint(model, tok, proc, root / "original", layout="original", safe_serialization=False)
    return root


def _load_in_subprocess(folder: Path, dtype: str, quantize: str | None) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype, quantize or ""], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout, dtype, quantize", [
    ("hf", "fp32", None),  # fp16 file -> fp32 model: converted while read
    ("hf", "bf16", None),
    ("original", "bf16", None),  # torch .bin through mmap: pages dropped once copied
    ("hf", "fp32", "int8"),  # each linear quantized as it arrives
    ("hf", "bf16", "4bit"),
])
def test_peak_memory_stays_near_the_loaded_model_size(checkpoints, layout, dtype, quantize):
    if quantize == "4bit":
        pytest.importorskip("bitsandbytes")
    got = _load_in_subprocess(checkpoints / layout, dtype, quantize)
    rise, model = got["peak"] - got["base"], got["model"]
    assert model > 100 * MiB  # the model is big enough for the ratio to mean something
    assert rise <= RATIO * model + SLACK, (f"loading {layout} as {dtype}/{quantize} raised peak RSS by "
                                           f"{rise / MiB:.0f} MiB for a {model / MiB:.0f} MiB model "
                                           f"({rise / model:.2f}x; bound {RATIO}x + {SLACK / MiB:.0f} MiB)")
    if "engine" in got:  # the parts' old copies go back to the system, not to a heap that keeps them
        grown = got["engine"] - got["after"]
        assert grown <= ENGINE_SLACK, f"an engine's first prefill kept {grown / MiB:.0f} MiB more resident"
