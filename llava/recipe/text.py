"""Stage 0c: a tiny Llama-style causal LM pretrained on the dataset's text.

The corpus is every caption and chat rendered with the stage-2 template, each image replaced
by its scene description in words (`llava.recipe.tokenizer.grounded_docs`), packed into
fixed-length blocks; the result is a plain `LlamaForCausalLM` folder with its
tokenizer, i.e. what `llava train --language-model` expects (like lmsys/vicuna-7b).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from llava.recipe.common import JsonlLog, seed_everything, train_loop
from llava.recipe.tokenizer import Doc


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


def pack(tokenizer: PreTrainedTokenizerBase, docs: list[Doc], block: int, all_tokens: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate `<s> text` for every doc and cut into (N, block) rows of ids and labels.

    With `all_tokens=False` labels keep only the tokens inside each doc's target spans (the
    assistant's turns, as stage 2 masks them), everything else is -100; by default every token
    is a target (plain LM pretraining). The tail is dropped; a corpus shorter than one block
    is repeated.
    """
    ids: list[int] = []
    labels: list[int] = []
    enc = tokenizer([text for text, _ in docs], return_offsets_mapping=True)
    for (_, spans), row, offsets in zip(docs, enc["input_ids"], enc["offset_mapping"]):
        ids.extend(row)
        if all_tokens:
            labels.extend(row)
        else:
            labels.extend(t if e > s and any(a <= s < b for a, b in spans) else -100
                          for t, (s, e) in zip(row, offsets))
    n = max(1, len(ids) // block)
    reps = 1 + block // max(1, len(ids))
    ids, labels = (ids * reps)[: n * block], (labels * reps)[: n * block]
    return torch.tensor(ids).view(n, block), torch.tensor(labels).view(n, block)


def pretrain_lm(docs: list[Doc], tokenizer: PreTrainedTokenizerBase, out_dir: str, spec: LMSpec | None = None,
                steps: int = 300, batch_size: int = 16, block: int = 256, lr: float = 2e-3, seed: int = 0,
                log_every: int = 10, device: str = "cpu", save_every: int = 0, all_tokens: bool = True,
                check_dir: str | None = None) -> dict:
    """Next-token pretraining (on every token, or only the docs' target spans with `all_tokens=False`:
    measured worse here); saves model + tokenizer to `out_dir`; returns a summary.

    `check_dir`: a held-out set (`eval.jsonl` + `scenes.jsonl`) the trained LM then answers from
    the scenes' descriptions in words (`text_answer_accuracy`), logged as `text_answers`."""
    spec = spec or LMSpec()
    seed_everything(seed)
    t0 = time.perf_counter()
    data, targets = pack(tokenizer, docs, block, all_tokens)
    model = LlamaForCausalLM(lm_config(spec, tokenizer)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    log = JsonlLog(os.path.join(out_dir, "metrics.jsonl"))

    def save_snapshot(step: int) -> None:
        if save_every and step % save_every == 0 and step < steps:
            model.save_pretrained(os.path.join(out_dir, f"step-{step}"))
            tokenizer.save_pretrained(os.path.join(out_dir, f"step-{step}"))

    train_loop(model, opt, len(data), steps, batch_size, lr, seed, log,
               lambda idx: model(input_ids=data[idx].to(device), labels=targets[idx].to(device)).loss,
               log_every, save_snapshot, t0=t0)
    answers = text_answer_accuracy(model, tokenizer, check_dir, device) if check_dir else {}
    if answers:
        log.write(step=steps, text_answers=answers)
    model.cpu().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    losses = [r["loss"] for r in log.rows if "loss" in r]
    return {"steps": steps, "first_loss": losses[0], "final_loss": losses[-1], "seconds": time.perf_counter() - t0,
            "blocks": len(data), "tokens": len(data) * block, "text_answers_heldout": answers}


@torch.no_grad()
def text_answer_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, eval_dir: str,
                         device: str = "cpu", batch_size: int = 50, template: str = "vicuna_v1") -> dict[str, float]:
    """Per-category accuracy (%) of the LM alone on held-out questions, each image replaced by its
    scene's description in words, as in its pretraining docs.

    The LM's half of what the VLM must do: if it cannot answer "What color is the star?" after
    "... a large red star ...", stage 2 has to teach that lookup from scratch over image tokens.
    """
    from llava.data.synth import load_scenes
    from llava.data.synth_text import description
    from llava.eval.synth import load_questions, score
    from llava.processing.templates import get_template

    scenes = load_scenes(eval_dir)
    questions = load_questions(os.path.join(eval_dir, "eval.jsonl"))
    tmpl = get_template(template)
    prompts = [tmpl.render([f"{description(scenes[q['image']])}\n{q['text']}", None]) for q in questions]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    was_training = model.training
    model.eval()
    answers: dict[int, str] = {}
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            answers.update((q["question_id"], text) for q, text in zip(questions[i:i + batch_size], texts))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return {c: round(a, 1) for c, a in score(questions, answers)["accuracy"].items()}  # the evaluator's own rules
