"""DDP and FSDP2 (gloo, CPU, 2 processes under torchrun) against one process on the same global batches.

A worker script trains a tiny LLaVA (frozen vision tower) for a few AdamW steps with gradient
clipping; some ranks get text-only shards. Its loss is normalised over the *global* number of
target tokens, so every strategy computes the same gradient up to float summation order. The
worker also saves model + optimizer state mid-run, loads them into a freshly built model and
checks that the resumed last step equals the continued one.
"""

from __future__ import annotations

import runpy
import textwrap
from pathlib import Path

import pytest
import torch
from train_helpers import run_command, torchrun_command

# Weights after 3 steps (lr 1e-3: each moves up to 3e-3) vs one process, measured for DDP and FSDP2
# alike: max |diff| 1.9e-6, and only ~11 of 182k elements differ by more than 1e-7 (float32
# summation order, amplified by AdamW where a gradient is almost zero). A real mistake, e.g.
# normalising each rank's loss by its own token count, gives max 5.8e-3 and a 99.9th percentile
# of 2.6e-3. The bounds leave >10x headroom for other CPUs' rounding and still catch that.
MAX_TOL, Q999_TOL = 5e-5, 1e-6
TIMEOUT_S = 240

WORKER = textwrap.dedent('''
    import sys
    from datetime import timedelta

    import torch
    import torch.nn.functional as F

    STEPS, GLOBAL_BATCH, LR, MAX_NORM = 3, 4, 1e-3, 0.5
    FROZEN = ["tower", "embeddings"]  # what is frozen besides the vision tower: nothing, or the token embeddings
    # Per row: does it carry an image? Strided shards put rank 1 text-only in step 0, rank 0 in step 2.
    HAS_IMAGE = [True, False, True, False, True, True, False, True, False, True, False, True]


    def make_rows(model, tokenizer):
        g = torch.Generator().manual_seed(1)
        n_img = model.image_token_count((28, 28))
        rows = []
        for i, has_image in enumerate(HAS_IMAGE):
            prompt = torch.randint(4, 500, (3 + i % 3,), generator=g).tolist()
            answer = torch.randint(4, 500, (4 + i % 4,), generator=g).tolist()
            image = [model.config.image_token_index] * n_img if has_image else []
            ids = [tokenizer.bos_token_id] + image + prompt + answer
            labels = [-100] * (len(ids) - len(answer)) + answer
            pixels = torch.randn(1, 3, 28, 28, generator=g) if has_image else None
            rows.append((ids, labels, pixels))
        return rows


    def collate(rows, pad_id):
        width = max(len(ids) for ids, _, _ in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (row_ids, row_labels, _) in enumerate(rows):
            ids[r, :len(row_ids)] = torch.tensor(row_ids)
            labels[r, :len(row_labels)] = torch.tensor(row_labels)
            mask[r, :len(row_ids)] = 1
        pixels = [p for _, _, p in rows if p is not None]
        return ids, labels, mask, pixels or None


    def build(strategy, seed, frozen):
        from llava.tiny import tiny_model

        model, tokenizer = tiny_model("tiny", seed=seed)
        model.train()
        model.vision_tower.requires_grad_(False)
        if frozen == "embeddings":  # text-only shards then feed the decoder inputs that need no gradient
            model.input_embeddings().requires_grad_(False)
        wrapped = strategy.wrap(model)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim > 1]},  # two groups, like the loop's decay/no-decay
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=LR)
        return wrapped, optimizer, tokenizer


    def train_step(strategy, wrapped, optimizer, rows, step, pad_id):
        indices = list(range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH))
        ids, labels, mask, pixels = collate([rows[i] for i in strategy.shard(indices)], pad_id)
        targets = labels[:, 1:]
        n_global = strategy.all_reduce_sum((targets != -100).sum())
        logits = wrapped(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits[:, :-1].float()
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        # DDP/FSDP average gradients over ranks: scale by world_size to get the global mean.
        loss = loss_sum * strategy.world_size / n_global
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = strategy.clip_grad_norm(wrapped, MAX_NORM)
        optimizer.step()
        return [float(strategy.all_reduce_sum(loss_sum.detach()) / n_global), float(norm)]


    def resume(strategy, ckpt, rows, frozen, pad_id):
        """Build a differently initialised model, load the checkpoint, take the last step."""
        saved = torch.load(ckpt, weights_only=False) if strategy.is_main else {"model": {}, "optim": {}}
        wrapped, optimizer, _ = build(strategy, seed=1, frozen=frozen)
        strategy.load_full_state_dict(wrapped, saved["model"])
        strategy.load_optimizer_state_dict(wrapped, optimizer, saved["optim"])
        log = train_step(strategy, wrapped, optimizer, rows, STEPS - 1, pad_id)
        return strategy.full_state_dict(wrapped), log


    def run(strategy, out, ckpt, frozen, other_ckpt=None):
        wrapped, optimizer, tokenizer = build(strategy, seed=0, frozen=frozen)
        rows = make_rows(strategy.unwrap(wrapped), tokenizer)
        log = [train_step(strategy, wrapped, optimizer, rows, s, tokenizer.pad_token_id) for s in range(STEPS - 1)]
        saved = {"model": strategy.full_state_dict(wrapped),
                 "optim": strategy.optimizer_state_dict(wrapped, optimizer)}
        if strategy.is_main:
            torch.save(saved, ckpt)
        log.append(train_step(strategy, wrapped, optimizer, rows, STEPS - 1, tokenizer.pad_token_id))
        final = strategy.full_state_dict(wrapped)

        # Resume from the checkpoint: the last step must repeat. Also from one written by another
        # strategy (one process: integer-keyed optimizer state) when given.
        strategy.barrier()
        resumed, resumed_log = resume(strategy, ckpt, rows, frozen, tokenizer.pad_token_id)
        crossed = resume(strategy, other_ckpt, rows, frozen, tokenizer.pad_token_id)[0] if other_ckpt else None
        if strategy.is_main:
            torch.save({"final": final, "resumed": resumed, "log": log, "resumed_log": resumed_log,
                        "from_single": crossed}, out)


    if __name__ == "__main__":
        from llava.train.distributed import DDPStrategy, FSDPStrategy

        names, out_dir = sys.argv[1].split(","), sys.argv[2]
        # One launch for all strategies (saves a slow start-up); later ones reuse the first's group.
        strategies = []
        for name in names:
            strategies.append({"ddp": DDPStrategy, "fsdp": FSDPStrategy}[name](timeout=timedelta(seconds=90)))
            for frozen in FROZEN:
                run(strategies[-1], f"{out_dir}/{name}-{frozen}.pt", f"{out_dir}/{name}-{frozen}-ckpt.pt", frozen,
                    f"{out_dir}/single-{frozen}-ckpt.pt")
        for strategy in reversed(strategies):  # the first one created the group and destroys it
            strategy.close()  # not on failure: the barrier would wait for the failed rank; torchrun ends it
''')


def _torchrun(args: list[str], timeout: float = TIMEOUT_S) -> str:
    return run_command(torchrun_command(args), timeout)


def _abs_diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    assert a.keys() == b.keys()
    return torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(_abs_diffs(a, b).max())


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "worker.py"
    path.write_text(WORKER)
    return path


@pytest.fixture(scope="module")
def reference(worker: Path) -> dict[str, dict]:
    """The same runs in this process with the single-process Strategy, per frozen set."""
    from llava.train.strategy import Strategy

    module = runpy.run_path(str(worker))
    results = {}
    for frozen in module["FROZEN"]:
        out, ckpt = worker.parent / f"single-{frozen}.pt", worker.parent / f"single-{frozen}-ckpt.pt"
        module["run"](Strategy("cpu"), str(out), str(ckpt), frozen)
        results[frozen] = torch.load(out, weights_only=False)
    return results


def test_needs_torchrun(monkeypatch):
    import torch.distributed as dist

    from llava.train.strategy import make_strategy

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in ("ddp", "fsdp"):
        with pytest.raises(RuntimeError, match="torchrun"):
            make_strategy(name)


def test_decoder_layers_found():
    from llava.tiny import tiny_model
    from llava.train.distributed import decoder_layers

    model, _ = tiny_model("tiny")
    layers = decoder_layers(model)
    assert len(layers) == model.config.text_config.num_hidden_layers
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in layers)


def test_optimizer_state_rekeyed_by_name():
    """A one-process optimizer state (integer ids) maps onto parameter names by position; a misfit is refused."""
    from llava.train.distributed import _keyed_by_name

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}])
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    state = _keyed_by_name(opt.state_dict(), opt, names)
    assert [g["params"] for g in state["param_groups"]] == [["0.weight"], ["0.bias", "1.weight", "1.bias"]]
    assert torch.equal(state["state"]["1.bias"]["exp_avg"], opt.state[params[3]]["exp_avg"])
    assert _keyed_by_name(state, opt, names) is state  # already by name: unchanged
    with pytest.raises(ValueError, match="4 parameters in 2 groups"):
        _keyed_by_name(opt.state_dict(), torch.optim.AdamW(params[:2]), names)
    with pytest.raises(ValueError, match="does not have"):
        _keyed_by_name({"state": {"x.weight": {}}, "param_groups": [{"params": ["x.weight"]}]}, opt, names)


def test_single_process_resume(reference):
    for result in reference.values():
        assert _max_diff(result["final"], result["resumed"]) == 0.0


@pytest.fixture(scope="module")
def distributed(worker: Path, reference: dict[str, dict]) -> Path:
    """Both strategies, trained by one `torchrun --nproc_per_node 2` launch; returns the results' folder.

    Needs `reference` first: the workers also resume from its (one-process) checkpoints."""
    _torchrun([str(worker), "ddp,fsdp", str(worker.parent)])
    return worker.parent


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_matches_single_process(name, distributed, reference):
    for frozen, expected in reference.items():
        result = torch.load(distributed / f"{name}-{frozen}.pt", weights_only=False)
        diffs = _abs_diffs(result["final"], expected["final"])
        worst, q999 = float(diffs.max()), float(diffs.quantile(0.999))
        print(f"{name}, frozen {frozen}: |weight diff| vs one process: max {worst:.3g}, 99.9% {q999:.3g}")
        assert worst <= MAX_TOL and q999 <= Q999_TOL, frozen
        # Resumed from the one-process checkpoint (optimizer state keyed by integer ids).
        diffs = _abs_diffs(result["from_single"], expected["final"])
        assert float(diffs.max()) <= MAX_TOL and float(diffs.quantile(0.999)) <= Q999_TOL, frozen
        # Clipping was active and saw the same global norm (catches a missing x world_size,
        # which AdamW + clipping would hide in the weights) and the same loss.
        assert all(norm > 0.5 for _, norm in expected["log"])
        torch.testing.assert_close(torch.tensor(result["log"]), torch.tensor(expected["log"]), rtol=1e-5, atol=1e-6)
        # Model + optimizer state round trip: the resumed last step repeats the continued one.
        assert _max_diff(result["resumed"], result["final"]) <= 1e-7, frozen
        assert result["resumed_log"] == pytest.approx(result["log"][-1], rel=1e-6)
        # What was frozen did not move.
        prefixes = ("vision_tower.",) + (("language_model.model.embed_tokens.",) if frozen == "embeddings" else ())
        fixed = [k for k in result["final"] if k.startswith(prefixes)]
        assert fixed and all(torch.equal(result["final"][k], expected["final"][k]) for k in fixed)
