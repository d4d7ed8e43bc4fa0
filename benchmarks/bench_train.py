"""Training throughput: our loop (`llava.train.loop.train`) vs a plain transformers baseline.

    python benchmarks/bench_train.py --quick      # stage 2 only, 2 steps: ~6-7 min on 2 busy CPU cores
    python benchmarks/bench_train.py              # all stages, micro 16 x accum 1, 3 steps (~35 min on 2 cores)

Model: the "bench-200m" preset (CLIP ViT-B/16 224 px + 12-layer 768-wide Llama with the
preset's 32064-row vocabulary, ~220M parameters), random weights, the tiny tokenizer (its 512
ids are the first rows of the vocabulary; the LM head costs what a Llama tokenizer's would),
saved once as a llava-hf folder that both sides load (ours with `--model`, the baseline with
`transformers.LlavaForConditionalGeneration.from_pretrained`).

Data: synthetic conversations, one 224-px PNG per row, answers of variable length (32-256 text
tokens), identical rows for both sides (the baseline tokenises them with our `SupervisedDataset`,
so the input ids, labels and pixels are the same).

Per stage (pretrain: projector; finetune: LM + projector; lora: peft LoRA r=128 on the LM's
linear layers + projector) both sides train the same parameters with AdamW, fp32, no gradient
checkpointing, the same micro batch x accumulation. Both sides train the same global batches
(the rows of ours' `group_by_modality_length` order, the stage-2 recipe default; forced on for
stage 1 too), so every measured step sees the same rows and tokens. Ours runs with its defaults:
rows sorted by length within a global batch, each row of a micro batch run alone and unpadded
(the CPU default for this model size), LM head only where a target follows, fused AdamW. The
baseline takes a global batch's rows in a seeded random order (what a random sampler gives),
right-padded, the vision tower run (frozen) in every forward, logits and loss by the model's own
`labels=` path, `torch.optim.AdamW` with its defaults.

Throughput is per optimizer step (data loading included), the median over the measured steps
after the first (warm-up) one. tokens/s counts non-pad tokens (attention mask), image
placeholder tokens included. Peak memory is the process's RSS high-water mark
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), each configuration in a fresh subprocess, so it
includes model loading and the Python runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llava.config import preset

STAGES = ("pretrain", "finetune", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R, LORA_ALPHA, LORA_DROPOUT = 128, 256, 0.05
LR = {"pretrain": 1e-3, "finetune": 2e-5, "lora": 2e-4}
VOCAB = preset("bench-200m").text_config.vocab_size  # 32064
WORDS = ("red green blue yellow circle square triangle star the a is on of and in image shows picture left right "
         "top bottom small large two three four color shape white background above below next to").split()


def _peak_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


# Setup (parent process) ------------------------------------------------------------------------------
def prepare(root: Path, n_rows: int, seed: int = 0) -> dict[str, str]:
    import PIL.Image
    import numpy as np

    from llava.checkpoint import save_checkpoint
    from llava.checkpoint.build import image_processor_for
    from llava.tiny import tiny_model

    model, tok = tiny_model("bench-200m", seed=seed, vocab_size=VOCAB)
    folder = root / "model"
    save_checkpoint(model, tok, image_processor_for(model.config), folder, layout="hf")
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(n_rows):
        arr = np.random.default_rng(seed + i).integers(0, 256, (224, 224, 3), dtype=np.uint8)
        PIL.Image.fromarray(arr).save(images / f"{i}.png")
        target = rng.randint(32, 256)  # text tokens of the answer, roughly (the tokenizer decides exactly)
        words: list[str] = []
        while len(tok(" ".join(words), add_special_tokens=False).input_ids) < target:
            words.append(rng.choice(WORDS))
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": " ".join(words)}]})
    data = root / "data.json"
    data.write_text(json.dumps(rows))
    return {"model": str(folder), "data": str(data), "images": str(images)}


# Workers (one fresh process per configuration) -----------------------------------------------------
def run_ours(stage: str, paths: dict[str, str], micro: int, accum: int, steps: int, out: str) -> dict:
    from llava.train.config import TrainConfig
    from llava.train.loop import train

    cfg = TrainConfig(stage=stage, model=paths["model"], data=paths["data"], image_folder=paths["images"], out=out,
                      micro_batch_size=micro, grad_accum=accum, max_steps=steps, learning_rate=LR[stage],
                      mm_projector_lr=LR[stage], lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                      group_by_modality_length=True, gradient_checkpointing=False, bf16=False, device="cpu",
                      progress=False, seed=0, overwrite=True)
    train(cfg)
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    measured = lines[1:] or lines
    secs = [r["step_time_s"] for r in measured]
    tokens = [r["tokens_per_s"] * r["step_time_s"] for r in measured]
    return {"step_s": secs, "tokens": tokens, "samples": micro * accum}


def run_baseline(stage: str, paths: dict[str, str], micro: int, accum: int, steps: int, out: str) -> dict:
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from llava.checkpoint.build import image_processor_for
    from llava.checkpoint.hf import read_hf
    from llava.train.build import DEFAULT_TEMPLATE
    from llava.train.data import SupervisedDataset, collate
    from llava.train.sampler import epoch_batches

    model = LlavaForConditionalGeneration.from_pretrained(paths["model"], dtype=torch.float32)
    model.train()
    model.config.use_cache = False
    model.requires_grad_(False)
    if stage == "finetune":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    elif stage == "lora":
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(model.model.language_model, LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(LORA_TARGETS)))
        model.model.language_model = lm
    model.model.multi_modal_projector.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR[stage], weight_decay=0.0)

    config, _ = read_hf(paths["model"])
    tok = AutoTokenizer.from_pretrained(paths["model"])
    template = "plain" if stage == "pretrain" else config.template or DEFAULT_TEMPLATE  # as our build_model does
    vc = model.config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2  # patch features, CLS dropped ("default" select strategy)
    ds = SupervisedDataset(paths["data"], tok, template, image_token_index=config.image_token_index,
                           image_token_count=lambda size: n_img, image_processor=image_processor_for(config),
                           image_folder=paths["images"], convention="hf", max_length=2048)
    # The global batches ours trains (same seed, lengths and size), each in a random order.
    shuffle = random.Random(0)
    global_batches = [shuffle.sample(b, len(b)) for b in
                      epoch_batches(len(ds), micro * accum, seed=0, epoch=0, modality_lengths=ds.modality_lengths)]
    secs, tokens = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        n_tok = 0
        for k in range(accum):
            idx = global_batches[step % len(global_batches)][k * micro:(k + 1) * micro]
            b = collate([ds[i] for i in idx], pad_token_id=tok.pad_token_id)
            n_tok += int(b["attention_mask"].sum())
            pv = b["pixel_values"]
            pv = torch.stack(pv) if pv[0].dim() == 3 else torch.cat(pv)
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pv,
                         labels=b["labels"], use_cache=False).loss
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        secs.append(time.perf_counter() - t0)
        tokens.append(n_tok)
    return {"step_s": secs[1:] or secs, "tokens": tokens[1:] or tokens, "samples": micro * accum}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    paths = json.loads(args.paths)
    fn = run_ours if args.impl == "ours" else run_baseline
    res = fn(args.stage, paths, args.micro, args.accum, args.steps, args.out)
    res["peak_mb"] = _peak_mb()
    print("RESULT " + json.dumps(res), flush=True)


# Driver ---------------------------------------------------------------------------------------------
def summarize(res: dict) -> dict:
    step = statistics.median(res["step_s"])
    tok = statistics.median(t / s for t, s in zip(res["tokens"], res["step_s"]))
    return {"samples_s": res["samples"] / step, "tokens_s": tok, "peak_mb": res["peak_mb"], "step_s": step}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="stage 2 (finetune) only, 2 steps of micro 2 x accumulation 2 (~8 min on 2 busy cores)")
    p.add_argument("--stages", default=None, help=f"comma-separated of {','.join(STAGES)} (default: all; "
                   "--quick: finetune)")
    p.add_argument("--micro", type=int, default=None)
    p.add_argument("--accum", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps, the first one not measured")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--json", default=None, help="also write the results here")
    # internal: one configuration in this (fresh) process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    # Full runs use the original's per-device batch of stage 2 and LoRA, 16, for every stage (its stage 1
    # used 32; at 16 the padded baseline's LoRA run already peaks at 22.5 GB of a 24 GB machine).
    micro = args.micro or 2 if args.quick else args.micro or 16
    accum = args.accum or 2 if args.quick else args.accum or 1
    steps = args.steps or (2 if args.quick else 3)
    stages = (args.stages or ("finetune" if args.quick else ",".join(STAGES))).split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = prepare(root, n_rows=micro * accum * steps)
        print(f"# bench-200m (vocab {VOCAB}), {micro * accum * steps} rows, micro {micro} x accum {accum}, "
              f"{steps} steps (first not measured), {args.threads} threads; setup {time.perf_counter() - t0:.0f}s", flush=True)
        for stage in stages:
            for impl in ("ours", "baseline"):
                cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--stage", stage, "--paths",
                       json.dumps(paths), "--out", str(root / f"out-{impl}-{stage}"), "--micro", str(micro),
                       "--accum", str(accum), "--steps", str(steps), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    sys.exit(f"{impl} {stage} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
                results[(stage, impl)] = summarize(json.loads(line[-1][7:]))
                print(f"  {stage:8s} {impl:8s} {results[(stage, impl)]}", file=sys.stderr, flush=True)
    print("\n| config | ours samples/s | base samples/s | ours tokens/s | base tokens/s | tokens/s ratio "
          "| ours peak MB | base peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in stages:
        o, b = results[(stage, "ours")], results[(stage, "baseline")]
        print(f"| {stage} | {o['samples_s']:.3f} | {b['samples_s']:.3f} | {o['tokens_s']:.0f} | {b['tokens_s']:.0f} "
              f"| {o['tokens_s'] / b['tokens_s']:.2f}x | {o['peak_mb']:.0f} | {b['peak_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s}/{i}": v for (s, i), v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
