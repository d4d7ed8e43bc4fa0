"""`llava recipe tiny`: the LLaVA recipe end to end at miniature scale, on a CPU.

data (llava.data.synth) -> stage 0 (tokenizer, CLIP-style vision tower, Llama LM) ->
stage 1 (projector alignment, `plain`) -> stage 2 (instruction tuning, `vicuna_v1`) ->
evaluation (with real and blank images) -> model card. Stages 1 and 2 run the project's
own trainer (`llava.train.loop.train`) in-process, exactly as `llava train` would.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import torch

from llava.checkpoint import load_tokenizer
from llava.recipe.common import read_check, read_json, read_losses
from llava.recipe.evaluation import OUT_OF_STYLE_SEED, eval_seed, evaluate_model, write_eval_results
from llava.recipe.sizes import SIZES, RecipeSize
from llava.recipe.stages import (MADE_IN_SECONDS, STAGE0_SPEC_FILE, finished_run, resumable_checkpoint,
                                 same_stage0_spec, stage0_spec, train_command, train_config, train_stage, use_bf16)
from llava.recipe.text import pretrain_lm
from llava.recipe.tokenizer import chat_texts, grounded_docs, train_tokenizer
from llava.recipe.vision import VisionSpec, heldout_cells, pretrain_vision, scene_pairs
from llava.train.checkpointing import write_json

__all__ = ["SIZES", "RecipeSize", "run_recipe"]


class _Timer:
    """Wall time per named stage, printed as it goes."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.times: dict[str, float] = {}
        self.echo = echo

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.echo(f"[recipe] {name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.times[name] = round(time.perf_counter() - t0, 1)
        self.echo(f"[recipe] {name} done in {self.times[name]:.1f}s")
        return result


def _rows_inside(folder: str, name: str) -> list[dict[str, Any]]:
    """The rows of `folder/name`, their images named from the folder above (`folder` sits inside
    another data folder, so one image folder serves both)."""
    prefix = os.path.basename(folder)
    return [{**r, "image": f"{prefix}/{r['image']}"} if "image" in r else r
            for r in read_json(os.path.join(folder, name))]


def _write_rows(path: str, rows: list[dict[str, Any]]) -> str:
    """A training file of `rows` on one line, as `llava data synth` writes them, whole or not at all."""
    write_json(path, rows, indent=None)
    return path


class _RecipeRun:
    """One run of the recipe into `out`: where each part goes, which parts an earlier run left that
    may be kept (`reuse`), and the wall time of each part."""

    def __init__(self, out: str, seed: int, spec: RecipeSize, workers: int, echo: Callable[[str], None],
                 reuse: bool, device: str) -> None:
        self.out, self.seed, self.spec, self.workers, self.reuse, self.device = out, seed, spec, workers, reuse, device
        self.data_dir, self.eval_dir = os.path.join(out, "data"), os.path.join(out, "eval")
        s0 = os.path.join(out, "stage0")
        self.stage0 = s0
        self.tok_dir, self.tower, self.lm, self.tower_hires = (os.path.join(s0, name) for name in
                                                               ("tokenizer", "vision", "lm", "vision_hires"))
        self.timer = _Timer(echo)
        self.summary_file = os.path.join(out, "recipe_summary.json")
        # a restarted run reports the reused stages' times from the run that made them
        earlier = read_json(self.summary_file) if reuse and os.path.isfile(self.summary_file) else {}
        self.earlier_times, self.earlier_spec = earlier.get("times", {}), earlier.get("spec")
        self.reused: set[str] = set()
        self.trained_seconds: dict[str, float] = {}  # kept training stages' own wall time

    # what may be kept --------------------------------------------------------------------------
    def keep(self, name: str, path: str) -> bool:
        """A stage-0 model to keep: asked to reuse, it is there, and the spec it depends on is unchanged."""
        return self.reuse and os.path.isfile(path) and same_stage0_spec(
            name, stage0_spec(os.path.dirname(path), self.earlier_spec), self.spec)

    def made(self, folder: str, result: Any, started: float) -> Any:
        """Record beside a stage-0 model the spec it was made with and how long that took (since the
        `perf_counter` time `started`): a run killed before its summary keeps the model and its time."""
        record = {**asdict(self.spec), MADE_IN_SECONDS: round(time.perf_counter() - started, 1)}
        write_json(os.path.join(folder, STAGE0_SPEC_FILE), record, indent=1)  # atomic: `--reuse` reads it
        return result

    def text_chats(self, n: int) -> int:
        return round(n * self.spec.text_chats)

    def same_data(self, meta: dict[str, Any], n: int, text_only: int, world: str | None = None) -> bool:
        """An earlier data folder is this run's (older ones, without text_mc in meta.json, had none)."""
        spec = self.spec
        return (meta.get("seed"), meta.get("n"), meta.get("eval_n"), meta.get("text_only"), meta.get("text_mc", 0.0),
                meta.get("vocab", {}).get("max_objects"), meta.get("world", "classic")) == (
                    self.seed, n, 0, text_only, spec.text_mc, spec.max_objects, world or spec.world)

    # data --------------------------------------------------------------------------------------
    def _generate(self, folder: str, n: int, text_only: int, world: str | None = None) -> dict[str, Any]:
        from llava.data.synth import generate

        return generate(folder, seed=self.seed, n=n, eval_n=0, text_only=text_only, text_mc=self.spec.text_mc,
                        max_objects=self.spec.max_objects, workers=self.workers, world=world or self.spec.world)

    def data(self) -> dict[str, Any]:
        """The recipe's own scenes (the tokenizer's and the LM's): meta.json of the data folder."""
        meta_file = os.path.join(self.data_dir, "meta.json")
        if self.reuse and os.path.isfile(meta_file):
            meta = read_json(meta_file)
            if self.same_data(meta, self.spec.n, self.text_chats(self.spec.n)):
                self.reused.add("data")
                return meta
        return self._generate(self.data_dir, self.spec.n, self.text_chats(self.spec.n))

    def eval_data(self) -> dict[str, Any]:
        """Held out twice over: its own seed, and the eval stream of that seed."""
        from llava.data.synth import generate

        return generate(self.eval_dir, seed=eval_seed(self.seed), n=0, eval_n=self.spec.eval_n,
                        max_objects=self.spec.max_objects, world=self.spec.world)

    def superset(self, folder: str, n: int, text_only: int, name: str | None = None) -> str:
        """A folder of the first `n` scenes of the same seed: the recipe's own data when n <= spec.n,
        else more of it (scene i and its chat are the same whichever n is asked for, so extra scenes
        extend the n; the tokenizer and the LM keep reading the n)."""
        if n <= self.spec.n:
            return self.data_dir
        return self._kept_or_generated(folder, n, text_only, name)

    def _kept_or_generated(self, folder: str, n: int, text_only: int, name: str | None,
                           world: str | None = None) -> str:
        """`folder` as an earlier run left it when asked to reuse and it is this run's data (recorded
        as kept under `name`), else generated anew."""
        meta_file = os.path.join(folder, "meta.json")
        if self.reuse and os.path.isfile(meta_file) and self.same_data(read_json(meta_file), n, text_only, world):
            if name:
                self.reused.add(name)
        else:
            self._generate(folder, n, text_only, world)
        return folder

    def mix_folder(self, train_data: str) -> str:
        """Where the mixed-world phase's own scenes go: inside `train_data`, one image folder for both."""
        return os.path.join(train_data, f"mix_{self.spec.s2_mix_world}")

    def mix_data(self, train_data: str) -> str:
        """The chats of stage 2's mixed-world phase (`s2_mix_world`): that world's own scenes, in a
        folder inside `train_data` (one image folder serves both worlds), and the main world's first
        `s2_mix_main_chats` image chats. Returns the chats file (`train_data/mix_instruct.json`)."""
        spec = self.spec
        folder = self._kept_or_generated(self.mix_folder(train_data), spec.s2_mix_scenes,
                                         self.text_chats(spec.s2_mix_scenes), "mix_data", spec.s2_mix_world)
        main = [r for r in read_json(os.path.join(train_data, "instruct.json")) if "image" in r]
        return _write_rows(os.path.join(train_data, "mix_instruct.json"),
                           _rows_inside(folder, "instruct.json") + main[:spec.s2_mix_main_chats])

    # stage 0 -----------------------------------------------------------------------------------
    def tokenizer(self):
        started = time.perf_counter()
        if self.keep("stage0_tokenizer", os.path.join(self.tok_dir, "tokenizer.json")):
            self.reused.add("stage0_tokenizer")
            return load_tokenizer(self.tok_dir)
        corpus = [os.path.join(self.data_dir, "pretrain.json"), os.path.join(self.data_dir, "instruct.json")]
        tok = train_tokenizer(chat_texts(corpus), vocab_size=self.spec.vocab)
        tok.save_pretrained(self.tok_dir)
        return self.made(self.tok_dir, tok, started)

    def _kept_stage0(self, name: str, weights: str) -> bool:
        """Stage-0 models are kept only beside the tokenizer they were trained with."""
        return "stage0_tokenizer" in self.reused and self.keep(name, weights)

    def _reused_stage(self, name: str, folder: str, checks: tuple[str, ...]) -> dict[str, Any]:
        """A stage-0 model already in `out`: its losses and held-out checks, read back from its log (and
        its wall time from its record, where no finished run's summary has it)."""
        self.reused.add(name)
        record = stage0_spec(folder, None) or {}
        if name not in self.earlier_times and MADE_IN_SECONDS in record:
            self.trained_seconds[name] = record[MADE_IN_SECONDS]
        log_file = os.path.join(folder, "metrics.jsonl")
        losses = read_losses(log_file)
        return {"reused": True, "first_loss": losses[0], "final_loss": losses[-1],
                **{f"{check}_heldout": read_check(log_file, check) for check in checks}}

    def vision(self, tokenizer) -> dict[str, Any]:
        """Stage 0b: the CLIP-style tower, on its own (larger) set of scenes' captions."""
        spec, started = self.spec, time.perf_counter()
        if self._kept_stage0("stage0_vision", os.path.join(self.tower, "model.safetensors")):
            return self._reused_stage("stage0_vision", self.tower, ("binding", "grounding"))
        return self.made(self.tower, self._pretrain_tower(tokenizer, self.tower, spec.vision, spec.vision_steps,
                                                          spec.vision_lr, self.seed), started)

    def vision_hires(self, tokenizer) -> dict[str, Any]:
        """Stage 0b, continued: the whole dual encoder goes on at `vision_hires_size` px from where it
        ended (its position grid resampled), on the same captions, reshuffled (the next seed)."""
        spec, started = self.spec, time.perf_counter()
        if "stage0_vision" in self.reused and self.keep("stage0_vision_hires",
                                                        os.path.join(self.tower_hires, "model.safetensors")):
            return self._reused_stage("stage0_vision_hires", self.tower_hires, ("binding", "grounding"))
        vision = replace(spec.vision, image_size=spec.vision_hires_size)
        return self.made(self.tower_hires, self._pretrain_tower(
            tokenizer, self.tower_hires, vision, spec.vision_hires_steps, spec.vision_hires_lr, self.seed + 1,
            init_from=self.tower), started)

    def _pretrain_tower(self, tokenizer, out: str, vision: VisionSpec, steps: int, lr: float, seed: int,
                        init_from: str | None = None) -> dict[str, Any]:
        """`pretrain_vision` on stage 0's captions with the spec's losses, checked on the held-out scenes."""
        spec = self.spec
        scenes = self.superset(os.path.join(self.stage0, "scenes"), spec.vision_scenes, text_only=0)
        return pretrain_vision(
            self.vision_captions(scenes), scenes, tokenizer, out, vision, steps=steps, batch_size=spec.vision_batch,
            lr=lr, seed=seed, device=self.device, hard_negatives_per_image=spec.vision_negatives,
            check_pairs=scene_pairs(self.eval_dir, image_size=vision.image_size),
            grounding_weight=spec.grounding_weight, order_weight=spec.order_weight, check_every=max(1, steps // 6),
            centre_weight=spec.centre_weight, word_weight=spec.word_weight, init_from=init_from,
            check_cells=heldout_cells(self.eval_dir, vision) if spec.centre_weight or spec.word_weight else None)

    def vision_captions(self, scenes: str) -> str:
        """The tower's captions file: that of `scenes`, or with `vision_mix_scenes` a file in `scenes`
        beside it that adds as many scenes of a second world (`RecipeSize.tower_mix_world`), generated into a
        folder inside `scenes`, so one image folder serves both worlds (with the mixed phase's world, the same
        seed's scenes as stage 2 trains on)."""
        spec = self.spec
        if not spec.vision_mix_scenes:
            return os.path.join(scenes, "pretrain.json")
        world = spec.tower_mix_world
        folder = self._kept_or_generated(os.path.join(scenes, f"mix_{world}"), spec.vision_mix_scenes,
                                         0, "stage0_mix_scenes", world)
        return _write_rows(os.path.join(scenes, "vision_pretrain.json"),
                           read_json(os.path.join(scenes, "pretrain.json")) + _rows_inside(folder, "pretrain.json"))

    def language_model(self, tokenizer) -> dict[str, Any]:
        """Stage 0c: the Llama LM, on the scenes' descriptions and chats as text."""
        spec, started = self.spec, time.perf_counter()
        if self._kept_stage0("stage0_lm", os.path.join(self.lm, "model.safetensors")):
            return self._reused_stage("stage0_lm", self.lm, ("text_answers",))
        lm_scenes = max(spec.n, spec.lm_scenes)
        docs = grounded_docs(self.seed, lm_scenes, n_text=self.text_chats(lm_scenes), text_mc=spec.text_mc,
                             max_objects=spec.max_objects, world=spec.world)
        return self.made(self.lm, pretrain_lm(docs, tokenizer, self.lm, spec.lm, steps=spec.lm_steps,
                                              batch_size=spec.lm_batch, seed=self.seed, device=self.device,
                                              check_dir=self.eval_dir), started)

    # stages 1-2 --------------------------------------------------------------------------------
    def training_runs(self, train_data: str, mix_data: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(name, `train_config` arguments) of stage 1 and stage 2's phases: the first, the tail where
        `s2_tail_epochs`, and the mixed-world phase on the chats file `mix_data` where given. Each
        phase goes on from the one before; the last trains into OUT/stage2, the others into
        OUT/stage2_phase1, _phase2.

        Stage 1 trains in fp32 whatever `spec.bf16` says: under bf16 autocast (its projector learning
        from bf16 tower features) the full recipe's first phase ended at colour 76% / word 20% in
        style, against 96 / 100 from an fp32 stage 1, and no later phase learnt left/right. The first
        phase does not sort rows by length (`s2_length_window` is the later phases'): with the
        fp32 stage 1 it has only been measured unsorted."""
        spec, out = self.spec, self.out
        s1 = os.path.join(out, "stage1")
        bf16 = use_bf16(spec.bf16, self.device)
        s1_args = dict(stage="pretrain", out=s1, data=os.path.join(train_data, "pretrain.json"),
                       image_folder=train_data, epochs=spec.s1_epochs, batch=spec.s1_batch, lr=spec.s1_lr,
                       seed=self.seed, max_steps=spec.s1_max_steps, device=self.device, language_model=self.lm,
                       vision_tower=self.tower, save_steps=spec.save_steps, bf16=False,
                       # the varied world's canvases are not square: keep all of them, as LLaVA-1.5 does
                       image_aspect_ratio="pad" if spec.world != "classic" else None)
        # template: else the stage-1 checkpoint's own template (plain) would be kept
        first = dict(stage="finetune", data=os.path.join(train_data, "instruct.json"),
                     image_folder=train_data, epochs=spec.s2_epochs, batch=spec.s2_batch, lr=spec.s2_lr,
                     seed=self.seed, max_steps=spec.s2_max_steps, template="vicuna_v1",
                     save_steps=spec.save_steps, unfreeze_vision_tower=spec.s2_unfreeze_tower, device=self.device,
                     length_window=1, bf16=bf16)
        later = {**first, "length_window": spec.s2_length_window}
        phases = [first] if spec.s2_epochs else []  # none: stage 2 is its later phases alone
        if spec.s2_tail_epochs:
            phases.append({**later, "epochs": spec.s2_tail_epochs, "lr": spec.s2_tail_lr,
                           "max_steps": spec.s2_tail_max_steps,
                           "unfreeze_vision_tower": spec.s2_unfreeze_tower or spec.s2_tail_unfreeze_tower,
                           "vision_tower_lr": spec.s2_tail_tower_lr})
        if mix_data:  # None: the checkpoint's own aspect mode (square); padding the varied canvases measured worse
            side = spec.vision.image_size
            grids = [(cols * side, rows * side) for cols, rows in spec.s2_mix_grids] or None
            phases.append({**later, "data": mix_data, "epochs": spec.s2_mix_epochs, "lr": spec.s2_mix_lr,
                           "max_steps": spec.s2_mix_max_steps, "vision_tower_lr": spec.s2_mix_tower_lr,
                           "unfreeze_vision_tower": spec.s2_mix_tower_lr is not None,
                           "image_aspect_ratio": spec.s2_mix_aspect, "image_grid_pinpoints": grids,
                           "image_size": spec.s2_mix_image_size})
            if spec.vision_hires_steps:  # the tower that went on at a higher resolution, at its own size
                phases[-1].update(vision_tower=self.tower_hires, image_size=None)
        runs, model = [("stage1", s1_args)], s1
        for i, args in enumerate(phases, start=1):
            name = "stage2" if i == len(phases) else f"stage2_phase{i}"
            runs.append((name, {**args, "out": os.path.join(out, name), "model": model}))
            model = runs[-1][1]["out"]
        return runs

    def train(self, runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """Each training stage in turn: kept when finished with the same config while every stage before
        it was kept, resumed from its last checkpoint when killed, else trained."""
        results = {}
        reusable = self.reuse and {"stage0_vision", "stage0_lm"} <= self.reused
        for name, args in runs:
            if args.get("vision_tower") == self.tower_hires and "stage0_vision_hires" not in self.reused:
                reusable = False  # the phase that swaps in the higher-resolution tower, retrained
            cfg = train_config(**args)
            done = finished_run(cfg, self.out) if reusable else None
            # a killed stage goes on from its last checkpoint (the trainer re-checks it), unless an earlier one retrained
            resume = resumable_checkpoint(cfg, self.out) if reusable and not done else None
            reusable = done is not None
            if done:
                self.reused.add(name)
                self.trained_seconds[name] = round(done["seconds"], 1)
            results[name] = self.timer.run(name, lambda done=done, cfg=cfg, resume=resume:
                                           done or train_stage(cfg, resume))
        return results

    def times(self) -> tuple[dict[str, float], dict[str, float]]:
        """(wall time per part, counting a kept part's from the run that made it; the kept parts' times)."""
        # a kept training stage's own trainer_state says how long it took (an earlier summary may predate it)
        carried = {k: self.trained_seconds.get(k, self.earlier_times.get(k)) for k in sorted(self.reused)
                   if k in self.earlier_times or k in self.trained_seconds}
        return {k: carried.get(k, v) for k, v in self.timer.times.items()}, carried


def run_recipe(out: str = "runs/tiny", seed: int = 0, size: str | RecipeSize = "full", workers: int = 1,
               echo: Callable[[str], None] = print, keep_data: bool = True,
               threads: int | None = None, reuse: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Run every stage into `out` (data/, stage0/, stage1/, stage2/ = the model); returns the summary.

    `threads`: torch intra-op threads; on a loaded machine 1 is often several times faster than 2
    (oversubscribed threads spin), so the default leaves torch's choice only when asked to.
    `reuse`: keep the data, tokenizer, vision tower and LM already in `out`, and each finished
    training stage whose config is unchanged while every stage before it was kept (a restarted run);
    the first unfinished one goes on from its last checkpoint when that is of the same config.
    `device`: where every stage trains ("cuda" makes the full recipe a matter of minutes)."""
    from llava.recipe.card import write_card

    spec = SIZES[size] if isinstance(size, str) else size
    if threads:
        torch.set_num_threads(threads)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    run = _RecipeRun(out, seed, spec, workers, echo, reuse, device)
    timer, t_all = run.timer, time.perf_counter()

    meta = timer.run("data", run.data)
    eval_meta = timer.run("eval_data", run.eval_data)
    tokenizer = timer.run("stage0_tokenizer", run.tokenizer)
    summary: dict[str, Any] = {"size": size if isinstance(size, str) else "custom", "seed": seed, "spec": asdict(spec),
                               "stages": {}}
    stages = summary["stages"]
    stages["stage0_vision"] = timer.run("stage0_vision", lambda: run.vision(tokenizer))
    if spec.vision_hires_steps:
        stages["stage0_vision_hires"] = timer.run("stage0_vision_hires", lambda: run.vision_hires(tokenizer))
    stages["stage0_lm"] = timer.run("stage0_lm", lambda: run.language_model(tokenizer))
    train_data = timer.run("train_data", lambda: run.superset(
        os.path.join(out, "train_data"), spec.train_scenes, text_only=run.text_chats(spec.train_scenes),
        name="train_data"))
    mix_data = timer.run("mix_data", lambda: run.mix_data(train_data)) if spec.s2_mix_epochs else None
    runs = run.training_runs(train_data, mix_data)
    stages.update(run.train(runs))
    s2 = runs[-1][1]["out"]
    oos_dir = None
    if spec.out_of_style_per_cell:
        from llava.eval.out_of_style import write_set

        oos_dir = os.path.join(out, "eval_out_of_style")
        oos_meta = timer.run("out_of_style_data", lambda: write_set(oos_dir, OUT_OF_STYLE_SEED,
                                                                    spec.out_of_style_per_cell))
    metrics = timer.run("eval", lambda: evaluate_model(s2, run.eval_dir, spec.eval_batch, device, oos_dir))

    times, carried = run.times()
    summary.update(times=times, this_run_seconds=round(time.perf_counter() - t_all, 1), reused_stages=sorted(carried),
                   data_sha=meta.get("files", {}), images_sha=meta.get("images", {}), eval_seed=eval_seed(seed),
                   train_data_sha=read_json(os.path.join(train_data, "meta.json")).get("files", {}),
                   eval_sha=eval_meta.get("files", {}).get("eval.jsonl"),
                   commands=[train_command(root=out, **a) for _, a in runs], metrics=metrics)
    summary["total_seconds"] = round(sum(times.values()), 1) if carried else summary["this_run_seconds"]
    if mix_data:
        summary["mix_data_sha"] = read_json(os.path.join(run.mix_folder(train_data), "meta.json")).get("files", {})
    if oos_dir:
        summary["out_of_style_set"] = {"seed": OUT_OF_STYLE_SEED, "per_cell": spec.out_of_style_per_cell,
                                       "eval_sha256": oos_meta["sha256"]}
    write_json(run.summary_file, summary, indent=1)
    write_card(s2, summary)
    write_eval_results(s2, summary)
    if not keep_data:
        mix_folders = [run.mix_folder(train_data)] if mix_data else []
        for folder in (run.data_dir, train_data, *mix_folders):
            shutil.rmtree(os.path.join(folder, "images"), ignore_errors=True)
    echo(f"[recipe] model: {s2}")
    echo("[recipe] wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
         + f"; total {summary['total_seconds']:.1f}s" + (f" (reused: {', '.join(carried)})" if carried else ""))
    return summary
