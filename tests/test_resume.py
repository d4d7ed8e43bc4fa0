"""Long runs are safe: a run killed with SIGKILL resumes to the same weights; partial checkpoints are ignored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava.train.checkpointing import COMPLETE, complete_checkpoints
from llava.train.cli import main as cli_main
from llava.train.config import TrainConfig
from llava.train.loop import train
from train_helpers import make_sources, weights, write_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    src = make_sources(root / "src")
    data = write_data(root / "data", n_image=6, n_text=2)
    return root, src, data


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false")
    return env


def _command(src: dict[str, str], data: Path, out: Path, *extra: str) -> list[str]:
    # LoRA (dropout: the RNG state must be restored), projector with its own LR (optimizer state),
    # modality grouping over 4 epochs (3 steps each: the resume crosses an epoch boundary).
    return [sys.executable, "-m", "llava.train", "--stage", "lora", "--language-model", src["lm"],
            "--vision-tower", src["tower"], "--data", str(data), "--image-folder", str(data.parent), "--out", str(out),
            "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--mm-projector-lr", "1e-3", "--max-steps", "12",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--group-by-modality-length", "--save-steps", "3",
            "--save-total-limit", "2", "--no-progress", "--no-gradient-checkpointing", "--seed", "7", *extra]


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if complete_checkpoints(str(out)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before writing a checkpoint: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def _lora_weights(out: Path) -> dict[str, torch.Tensor]:
    state = dict(load_file(str(out / "adapter_model.safetensors")))
    state.update(torch.load(out / "non_lora_trainables.bin", weights_only=True))
    return state


def test_sigkilled_run_resumes_to_the_same_weights(setup):
    root, src, data = setup
    reference, killed = root / "reference", root / "killed"
    proc = subprocess.Popen(_command(src, data, killed, "--step-delay", "0.3"), env=_env(), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    try:
        _wait_for_checkpoint(proc, killed)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "trainer_state.json").exists()
    step_at_kill = complete_checkpoints(str(killed))[-1][0]
    assert 3 <= step_at_kill < 12

    resumed = subprocess.Popen(_command(src, data, killed, "--resume"), env=_env(), stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    # Meanwhile the uninterrupted reference, in this process (same single thread, same code).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(_command(src, data, reference)[3:]) == 0
    finally:
        torch.set_num_threads(threads)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed at step {step_at_kill}" in err

    ours, theirs = _lora_weights(killed), _lora_weights(reference)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key  # bit-identical on CPU fp32
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # lines past the checkpoint from the killed run were dropped
    assert [p.name for p in sorted(killed.glob("checkpoint-*"))] == ["checkpoint-6", "checkpoint-9"]
    state = json.loads((killed / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and state["loss"] == json.loads(
        (reference / "trainer_state.json").read_text())["loss"]


def _cfg(src, data, out, **kw) -> TrainConfig:
    values = dict(stage="finetune", model=src["llava"], data=str(data), image_folder=str(data.parent), out=str(out),
                  learning_rate=1e-3, micro_batch_size=2, global_batch_size=4, max_steps=3, save_steps=1,
                  progress=False, gradient_checkpointing=False)
    return TrainConfig(**{**values, **kw})


def test_half_written_checkpoints_are_ignored(setup, tmp_path):
    _, src, data = setup
    torch.set_num_threads(1)
    out = tmp_path / "run"
    train(_cfg(src, data, out))
    final = weights(out)
    # What a kill can leave: a temp folder mid-write, and a checkpoint folder without its completion marker.
    latest = out / "checkpoint-2"
    assert (latest / COMPLETE).exists()
    (out / ".tmp-checkpoint-3").mkdir()
    (out / ".tmp-checkpoint-3" / "trainable.safetensors").write_bytes(b"half a file")
    broken = out / "checkpoint-7"
    broken.mkdir()
    (broken / "state.json").write_text("{")
    (out / "trainer_state.json").unlink()
    (out / "model.safetensors").unlink()

    result = train(_cfg(src, data, out, resume="auto"))
    assert result.global_step == 3
    assert not broken.exists() and not (out / ".tmp-checkpoint-3").exists()
    resumed = weights(out)
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_resume_refuses_changed_data(setup, tmp_path):
    _, src, data = setup
    out = tmp_path / "run"
    train(_cfg(src, data, out, max_steps=2))
    changed = tmp_path / "data.json"
    changed.write_text(json.dumps(json.loads(data.read_text())[:-1]))
    (out / "trainer_state.json").unlink()
    cfg = _cfg(src, changed, out, max_steps=2, resume="auto")
    cfg.image_folder = str(data.parent)
    with pytest.raises(ValueError, match="data file .* changed"):
        train(cfg)
