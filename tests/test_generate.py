"""The generation engine against transformers' own greedy decoding, and its batching/stop/stream rules."""

from __future__ import annotations

import copy

import pytest
import torch

from llava.generate import ContextTooLong, Engine, Request, SamplingParams
from llava.generate.detokenize import RowText
from llava.generate.sampling import filter_logits

N = 12  # new tokens per comparison: long enough to diverge if anything is off


@pytest.fixture(scope="module")
def tiny(tiny_tok):
    from llava.tiny import tiny_model

    model, tok = tiny_model("tiny", tokenizer=tiny_tok)
    return model, tok


def _prompt(model, n_text: int, n_images: int, seed: int) -> tuple[Request, list[torch.Tensor]]:
    """bos, then each image's placeholders followed by text ids; returns the request and its pixels."""
    g = torch.Generator().manual_seed(seed)
    pixels = [torch.randn(1, 3, 28, 28, generator=g) for _ in range(n_images)]
    ids = [1]
    for _ in range(n_images):
        ids += [model.config.image_token_index] * model.image_token_count((28, 28))
        ids += torch.randint(10, 500, (3,), generator=g).tolist()
    ids += torch.randint(10, 500, (n_text,), generator=g).tolist()
    with torch.inference_mode():
        feats = model.encode_images(pixels, [(28, 28)] * n_images)
    return Request(ids, feats), pixels


def _greedy(engine: Engine, requests, n: int = N, **kw) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(requests, SamplingParams(max_new_tokens=n, **kw))]


def test_greedy_matches_transformers(tiny, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from llava.checkpoint.hf import save_hf

    model, tok = tiny
    save_hf(model.state_dict(), model.config, tmp_path)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    req, pixels = _prompt(model, 20, 1, seed=1)
    ids = torch.tensor([req.input_ids])
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, pixel_values=pixels[0], attention_mask=torch.ones_like(ids),
                          do_sample=False, max_new_tokens=N, min_new_tokens=N)
    ours = _greedy(Engine(model, tok, eos_token_ids=[]), [req])[0]
    assert ours == out[0, ids.shape[1]:].tolist()


def test_left_padded_batch_equals_each_alone(tiny):
    model, tok = tiny
    reqs = [_prompt(model, 20, 1, seed=2)[0], _prompt(model, 4, 0, seed=3)[0], _prompt(model, 9, 2, seed=4)[0]]
    assert len({len(r.input_ids) for r in reqs}) == 3
    engine = Engine(model, tok, eos_token_ids=[])
    assert _greedy(engine, reqs) == [_greedy(engine, [r])[0] for r in reqs]
    static = Engine(model, tok, eos_token_ids=[], cache="static")
    assert _greedy(static, reqs) == _greedy(engine, reqs)


def test_prefill_in_chunks_under_a_token_budget_gives_the_same_answers(tiny, monkeypatch):
    """On a CPU a big batch is prefilled (tower and language model) in row chunks that fit a token
    budget; with a budget of a few prompts' size every chunk boundary is crossed, answers unchanged."""
    import llava.generate.engine as engine_module

    model, tok = tiny
    prompts = [_prompt(model, n, k, seed=10 + i) for i, (n, k) in enumerate([(20, 1), (4, 0), (9, 2), (15, 1), (2, 1)])]

    def requests() -> list[Request]:  # pixels, so the engine's own tower pass runs (and is chunked)
        return [Request(r.input_ids, pixel_values=pixels, image_sizes=[(28, 28)] * len(pixels)) for r, pixels in prompts]

    engine = Engine(model, tok, eos_token_ids=[])
    monkeypatch.setattr(engine_module, "PREFILL_TOKEN_BUDGET", {})
    whole = _greedy(engine, requests())
    longest = max(len(r.input_ids) for r, _ in prompts)
    monkeypatch.setattr(engine_module, "PREFILL_TOKEN_BUDGET", {"cpu": 2 * longest})
    assert engine._prefill_chunks(5, longest) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert _greedy(engine, requests()) == whole
    # A budget of two image crops (5 tokens each): one prompt per forward, the tower in groups.
    encoded: list[int] = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda pixels, sizes: encoded.append(len(pixels)) or original(pixels, sizes))
    monkeypatch.setattr(engine_module, "PREFILL_TOKEN_BUDGET", {"cpu": 10})
    assert _greedy(engine, requests()) == whole == [_greedy(engine, [r])[0] for r in requests()]
    assert encoded[:3] == [1, 2, 2]  # crops per pass (requests have 1, 0, 2, 1, 1): groups never split a request


def test_rows_that_finish_early_leave_the_batch(tiny):
    model, tok = tiny
    reqs = [_prompt(model, 20, 1, seed=5)[0], _prompt(model, 3, 0, seed=6)[0], _prompt(model, 8, 1, seed=7)[0]]
    # The context cap gives the long prompt 3 new tokens and the others more, so rows finish at different steps.
    engine = Engine(model, tok, eos_token_ids=[], context_length=len(reqs[0].input_ids) + 3)
    done = engine.generate(reqs, SamplingParams(max_new_tokens=N))
    assert [len(c.token_ids) for c in done] == [3, N, N] and {c.finish_reason for c in done} == {"length"}
    assert [c.token_ids for c in done] == [_greedy(engine, [r])[0] for r in reqs]


def test_kv_cached_decoding_equals_full_recompute(tiny):
    model, tok = tiny
    req, _ = _prompt(model, 10, 1, seed=8)
    ids = list(req.input_ids)
    with torch.inference_mode():
        for _ in range(N):
            embeds = model.embed(torch.tensor([ids]), req.image_features)
            ids.append(int(model.language_model(inputs_embeds=embeds).logits[0, -1].argmax()))
    assert _greedy(Engine(model, tok, eos_token_ids=[]), [req])[0] == ids[len(req.input_ids):]


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    model, tok = tiny
    reqs = [_prompt(model, 6, 1, seed=9)[0], _prompt(model, 2, 0, seed=10)[0]]
    engine = Engine(model, tok, eos_token_ids=[])
    params = dict(max_new_tokens=N, temperature=1.0, top_p=0.9, seed=123)
    first = [c.token_ids for c in engine.generate(reqs, SamplingParams(**params))]
    assert first == [c.token_ids for c in engine.generate(reqs, SamplingParams(**params))]
    assert first != [c.token_ids for c in engine.generate(reqs, SamplingParams(**{**params, "seed": 7}))]
    top1 = [c.token_ids for c in engine.generate(reqs, SamplingParams(max_new_tokens=N, temperature=0.8, top_k=1))]
    assert top1 == _greedy(engine, reqs)


def test_filter_logits_keeps_top_k_and_nucleus():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    peaked = torch.tensor([[0.0, 0.0, 10.0, 9.0]])  # probabilities ~[0, 0, 0.73, 0.27]
    assert torch.isfinite(filter_logits(peaked, top_p=0.5)).tolist() == [[False, False, True, False]]
    assert torch.isfinite(filter_logits(peaked, top_p=0.9)).tolist() == [[False, False, True, True]]


def test_stop_string_trims_and_eos_and_length_reasons(tiny):
    model, tok = tiny
    req, _ = _prompt(model, 5, 1, seed=11)
    engine = Engine(model, tok, eos_token_ids=[])
    full = engine.generate([req], SamplingParams(max_new_tokens=24))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    stop = next(full.text[i:i + 2] for i in range(6, len(full.text) - 2) if "\ufffd" not in full.text[i:i + 2])
    cut = engine.generate([req], SamplingParams(max_new_tokens=24, stop=["@@never@@", stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    streamed = list(engine.stream(req, SamplingParams(max_new_tokens=24, stop=[stop])))
    assert "".join(streamed) == cut.text and not any(stop in d for d in streamed)

    eos = full.token_ids[3]
    first = full.token_ids.index(eos)
    ended = Engine(model, tok, eos_token_ids=[eos]).generate([req], SamplingParams(max_new_tokens=24))[0]
    assert ended.finish_reason == "eos" and ended.token_ids == full.token_ids[:first]


def test_stream_concatenates_to_the_final_text(tiny):
    model, tok = tiny
    req, _ = _prompt(model, 7, 1, seed=12)
    engine = Engine(model, tok, eos_token_ids=[])
    params = SamplingParams(max_new_tokens=20, temperature=0.9, seed=3)
    pieces = list(engine.stream(req, params))
    seen: dict[int, str] = {}
    done = engine.generate([req], params, on_text=lambda i, d: seen.__setitem__(i, seen.get(i, "") + d))
    assert "".join(pieces) == done[0].text == seen.get(0, "")


def test_incremental_text_never_splits_a_character_and_holds_back_stop_prefixes(tiny_tok):
    ids = tiny_tok("héllo €", add_special_tokens=False).input_ids
    row = RowText(tiny_tok)
    deltas = []
    for t in ids:
        row.add(t)
        deltas.append(row.delta())
    assert "".join(deltas) == "héllo €" and not any("\ufffd" in d for d in deltas)

    row = RowText(tiny_tok, stop=["###"])
    emitted = ""
    for t in tiny_tok("ab##c#", add_special_tokens=False).input_ids:
        row.add(t)
        emitted += row.delta()
        assert not emitted.endswith("#")  # a trailing "#" or "##" may still become "###"
    row.flush()
    assert emitted + row.delta(final=True) == "ab##c#" and not row.stopped


def test_context_too_long_is_raised_before_any_compute(tiny):
    model, tok = tiny
    req, _ = _prompt(model, 30, 1, seed=13)

    def forbid(*_):
        raise AssertionError("the model ran")

    engine = Engine(model, tok, context_length=len(req.input_ids))
    handle = model.language_model.register_forward_pre_hook(forbid)
    try:
        with pytest.raises(ContextTooLong, match=r"4 of them image tokens"):
            engine.generate([_prompt(model, 1, 0, seed=14)[0], req])
    finally:
        handle.remove()
    # One token of room: max_new_tokens is capped by the context.
    done = Engine(model, tok, context_length=len(req.input_ids) + 1, eos_token_ids=[]).generate([req])
    assert len(done[0].token_ids) == 1 and done[0].finish_reason == "length"


def test_bf16_on_cpu_runs(tiny):
    model, tok = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    req, _ = _prompt(model, 6, 1, seed=15)
    req.image_features = [f.to(torch.bfloat16) for f in req.image_features]
    done = Engine(bf16, tok, eos_token_ids=[]).generate([req, _prompt(model, 2, 0, seed=16)[0]],
                                                       SamplingParams(max_new_tokens=5, temperature=0.7, seed=0))
    assert [len(c.token_ids) for c in done] == [5, 5]


@pytest.mark.slow
def test_compiled_static_decode_matches_eager(tiny):
    """torch.compile of transformers' decode step (static cache) gives the same greedy tokens, padding
    included (the lean forward's compiled step: tests/test_compiled_decode.py)."""
    model, tok = tiny
    reqs = [_prompt(model, 6, 1, seed=17)[0], _prompt(model, 2, 0, seed=18)[0]]
    compiled = Engine(model, tok, eos_token_ids=[], compile=True, forward="transformers")
    assert compiled.lean is None
    assert _greedy(compiled, reqs, n=6) == _greedy(Engine(model, tok, eos_token_ids=[]), reqs, n=6)
