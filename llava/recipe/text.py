"""Stage 0c: a tiny Llama-style causal LM pretrained on the dataset's text.

The corpus is every caption and chat rendered with the stage-2 template (images removed),
packed into fixed-length blocks; the result is a plain `LlamaForCausalLM` folder with its
tokenizer, i.e. what `llava train --language-model` expects (like lmsys/vicuna-7b).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from llava.recipe.common import JsonlLog, cosine_lr, seed_everything


@dataclass
class LMSpec:
    width: int = 192
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 1024


def lm_config(spec: LMSpec, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.width, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                       max_position_embeddings=spec.max_positions, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5)


def pack(tokenizer: PreTrainedTokenizerBase, texts: list[str], block: int) -> torch.Tensor:
    """Concatenate `<s> text </s>` for every text and cut into (N, block) rows (the tail is dropped)."""
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids.extend(row + [tokenizer.eos_token_id])
    n = max(1, len(ids) // block)
    ids = (ids * (1 + block // max(1, len(ids))))[: n * block]  # tiny corpora: repeat to one block
    return torch.tensor(ids).view(n, block)


def pretrain_lm(texts: list[str], tokenizer: PreTrainedTokenizerBase, out_dir: str, spec: LMSpec | None = None,
                steps: int = 300, batch_size: int = 16, block: int = 256, lr: float = 2e-3, seed: int = 0,
                log_every: int = 10) -> dict:
    """Next-token pretraining; saves model + tokenizer to `out_dir`; returns a summary."""
    spec = spec or LMSpec()
    seed_everything(seed)
    t0 = time.perf_counter()
    data = pack(tokenizer, texts, block)
    model = LlamaForCausalLM(lm_config(spec, tokenizer)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    log = JsonlLog(os.path.join(out_dir, "metrics.jsonl"))
    gen = torch.Generator().manual_seed(seed)
    n, order, pos = len(data), torch.randperm(len(data), generator=gen), 0
    batch_size = min(batch_size, n)
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        batch = data[order[pos:pos + batch_size]]
        pos += batch_size
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, max(1, steps // 20))
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            log.write(step=step + 1, loss=round(loss.item(), 5), lr=opt.param_groups[0]["lr"],
                      seconds=round(time.perf_counter() - t0, 2))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"steps": steps, "first_loss": log.rows[0]["loss"], "final_loss": log.rows[-1]["loss"],
            "seconds": time.perf_counter() - t0, "blocks": n, "tokens": n * block}
