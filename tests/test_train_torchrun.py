"""The real entry point under torchrun: `python -m torch.distributed.run ... -m llava.train`.

tests/test_distributed.py checks the strategies with a hand-written worker; this runs what a
user runs: the CLI, the JSON dataset (image rows and text-only rows), the sampler, the loop
and the saved checkpoint, with 2 processes (DDP, then FSDP2, gloo on CPU) and with one
process on the same global batch (micro 2 x accumulation 2 vs micro 1 x 2 processes x 2),
and compares the final weights.

Tolerance: after 3 AdamW steps at lr 1e-3 (each weight moves up to ~3e-3) the strategies
differ only by float32 summation order, which test_distributed.py measured at ~2e-6 max abs
(the same holds here, see MAX_TOL); a real mistake (e.g. each rank normalising its loss by its
own token count, or a wrong shard) moves weights by ~1e-3. 5e-5 leaves >10x headroom for other
CPUs' rounding while still catching that by a factor of ~20.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from train_helpers import make_sources, run_command, torchrun_command, weights, write_data

MAX_TOL = 5e-5
TIMEOUT_S = 120
STEPS, LR = 3, 1e-3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torchrun")
    src = make_sources(root / "src")
    # 6 image rows + 6 text-only rows: with modality grouping (the finetune default) some steps are
    # text-only, so the projector's zero-gradient path is exercised in every strategy.
    data = write_data(root / "data", n_image=6, n_text=6)
    return {"root": root, "model": Path(src["llava"]), "data": data, "folder": root / "data"}


def _train_args(setup: dict[str, Path], out: Path, strategy: str, micro: int) -> list[str]:
    return ["-m", "llava.train", "--stage", "finetune", "--model", str(setup["model"]), "--data", str(setup["data"]),
            "--image-folder", str(setup["folder"]), "--out", str(out), "--strategy", strategy,
            "--global-batch-size", "4", "--micro-batch-size", str(micro), "--max-steps", str(STEPS),
            "--lr", str(LR), "--seed", "0", "--no-progress", "--no-gradient-checkpointing", "--device", "cpu"]


@pytest.fixture(scope="module")
def single(setup) -> dict[str, torch.Tensor]:
    out = setup["root"] / "out_single"
    run_command([sys.executable, *_train_args(setup, out, "single", micro=2)], TIMEOUT_S)  # micro 2 x accumulation 2
    return weights(out)


def _torchrun(setup, strategy: str) -> tuple[dict[str, torch.Tensor], str]:
    out = setup["root"] / f"out_{strategy}"
    # micro 1 x 2 processes x accumulation 2
    output = run_command(torchrun_command(_train_args(setup, out, strategy, micro=1)), TIMEOUT_S)
    return weights(out), output


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_matches_single_process(strategy, setup, single):
    dist, output = _torchrun(setup, strategy)
    assert f"trained {STEPS} steps" in output
    assert dist.keys() == single.keys()
    initial = weights(setup["model"])
    diffs = {k: float((dist[k].float() - single[k].float()).abs().max()) for k in single}
    worst = max(diffs, key=diffs.get)
    print(f"{strategy}: max |diff| vs single = {diffs[worst]:.3g} ({worst})")
    assert diffs[worst] < MAX_TOL, f"{strategy} differs from one process: {worst} by {diffs[worst]:.3g}"
    # The comparison means something only if training moved the weights well beyond the tolerance.
    moved = max(float((single[k].float() - initial[k].float()).abs().max()) for k in single if k in initial)
    assert moved > 20 * MAX_TOL, f"training barely moved the weights ({moved:.3g})"
