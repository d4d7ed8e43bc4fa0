"""`llava_pkg`: this package's pipeline as an lmms-eval model (generation through our batched engine).

lmms-eval hands over `Instance`s whose `args` are, for `generate_until`,
`(context, gen_kwargs, doc_to_visual, doc_id, task, split)` and, for `loglikelihood`,
`(context, continuation, doc_to_visual, doc_id, task, split)` (the continuation may be the
task's `doc_to_target` function). Images come from `doc_to_visual(self.task_dict[task][split][doc_id])`
as PIL images; the context is the user's message, rendered with the checkpoint's template by
`pipe.prepare` exactly as `llava.eval` does, so scores match our own scorers.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Sequence

import PIL.Image
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from loguru import logger
from tqdm import tqdm

from llava.generate.sampling import SamplingParams

AUTO_BATCH_SIZE = 16  # what `--batch_size auto` means here (the engine has no memory probe)
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's usual default when a task sets none


def _batch_size(value: int | str) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return AUTO_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {value}")
    return size


class LlavaPkg(lmms):
    """lmms-eval model backed by `llava.load(pretrained)`; `is_simple`: it takes a context string."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, batch_size: int | str = 1, conv_template: str | None = None,
                 conv_mode: str | None = None, device: str | None = None, dtype: str | None = None,
                 model_base: str | None = None, quantize: str | None = None, max_batch_size: int | None = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"llava_pkg got unknown model_args {sorted(unknown)}; valid: pretrained, batch_size, "
                            "conv_template (or conv_mode), device, dtype, model_base, quantize")
        if conv_template and conv_mode and conv_template != conv_mode:
            raise ValueError(f"conv_template={conv_template!r} and conv_mode={conv_mode!r} disagree; give one")
        from llava.api import load

        self.batch_size_per_gpu = _batch_size(batch_size)
        # `accelerate launch -m lmms_eval ...`: one shard of the requests per process (single-process
        # runs get no accelerator here; lmms-eval then makes its own, as for its other models).
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            if device is None and torch.cuda.is_available():
                device = f"cuda:{self.accelerator.local_process_index}"
        self.pipe = load(pretrained or None, model_base=model_base, device=device, dtype=dtype,
                         template=conv_template or conv_mode, quantize=quantize)
        logger.info(f"llava_pkg: {self.pipe.name} on {self.pipe.model.device}, template {self.pipe.template.name}, "
                    f"batch size {self.batch_size_per_gpu}")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LlavaPkg":
        """As lmms' own, but `--model_args batch_size=8` wins over the CLI's `--batch_size` (default 1)
        instead of failing with "got multiple values for keyword argument 'batch_size'"."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.pipe.model.device

    # Helpers ----------------------------------------------------------------------------------
    def _visuals(self, request: Instance) -> list[PIL.Image.Image]:
        doc_to_visual, doc_id, task, split = request.args[2:6]
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        flat = [v for item in visuals for v in (item if isinstance(item, (list, tuple)) else [item])]
        for v in flat:
            if not isinstance(v, PIL.Image.Image):
                raise NotImplementedError(f"llava_pkg takes images only; task {task!r} gave a {type(v).__name__} "
                                          "(video and audio inputs are not supported)")
        return [v.convert("RGB") for v in flat]

    def _sampling(self, gen_kwargs: dict) -> SamplingParams:
        """lmms-eval gen_kwargs -> our SamplingParams (the template's stop string is always kept)."""
        gen = dict(gen_kwargs)
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if self.pipe.template.stop_str and self.pipe.template.stop_str not in until:
            until.append(self.pipe.template.stop_str)
        if int(gen.get("num_beams") or 1) != 1:
            raise NotImplementedError("llava_pkg does not do beam search; set num_beams: 1 in the task's "
                                      "generation_kwargs (or --gen_kwargs num_beams=1)")
        temperature = float(gen.get("temperature") or 0.0)
        do_sample = gen.get("do_sample")
        sample = temperature > 0 if do_sample is None else bool(do_sample)
        if sample and temperature <= 0:
            temperature = 1.0  # transformers' meaning of do_sample=True without a temperature
        top_p = gen.get("top_p")
        return self.pipe.sampling(temperature=temperature if sample else 0.0,
                                  top_p=float(top_p) if sample and top_p else 1.0,
                                  max_new_tokens=int(gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                                  stop=[s for s in until if s])

    # The lmms interface -------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer every request, in batches of `batch_size` among requests with equal gen_kwargs."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        answers: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="llava_pkg responding")
        for indices in groups.values():
            params = self._sampling(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                prepared = [self.pipe.prepare(requests[i].args[0], images=self._visuals(requests[i]), encode=False)
                            for i in batch]
                completions = self.pipe.engine.generate([p.request for p in prepared], params)
                for i, completion in zip(batch, completions):
                    answers[i] = completion.text.strip()
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], answers[i])
                bar.update(len(batch))
        bar.close()
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log P(continuation | context, images) under the template, and whether greedy decoding gives it.

        One forward per request (the context is rendered as the user's turn; the continuation is
        scored as the start of the assistant's answer).
        """
        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="llava_pkg scoring"):
            context, continuation, doc_to_visual, doc_id, task, split = request.args[:6]
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            out.append(self._score(context, str(continuation), self._visuals(request)))
        return out

    def _score(self, context: str, continuation: str, images: Sequence[PIL.Image.Image]) -> tuple[float, bool]:
        ctx = self.pipe.prepare(context, images=list(images), encode=False)
        full = self.pipe.prepare(ctx.prompt + continuation, images=list(images), raw=True).request
        ids, ctx_ids = full.input_ids, ctx.request.input_ids
        start = next((k for k, (a, b) in enumerate(zip(ids, ctx_ids)) if a != b), min(len(ids), len(ctx_ids)))
        start = max(start, 1)  # the first token has no prediction
        if start >= len(ids):
            return 0.0, True
        limit = self.pipe.model.config.context_length
        if limit and len(ids) > limit:
            raise ValueError(f"context + continuation is {len(ids)} tokens, more than the model's {limit}")
        input_ids = torch.tensor([ids], device=self.device)
        logits = self.pipe.model(input_ids, image_features=full.image_features or None).logits[0].float()
        logprobs = torch.log_softmax(logits[start - 1:-1], dim=-1)
        target = input_ids[0, start:]
        total = logprobs.gather(-1, target[:, None]).sum().item()
        greedy = bool((logprobs.argmax(-1) == target).all().item())
        return float(total), greedy

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("llava_pkg does not implement generate_until_multi_round (multi-round tasks "
                                  "such as MMSearch); use generate_until or loglikelihood tasks")

