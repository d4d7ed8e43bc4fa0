"""`llava recipe tiny`: the LLaVA recipe end to end at miniature scale, on a CPU.

data (llava.data.synth) -> stage 0 (tokenizer, CLIP-style vision tower, Llama LM) ->
stage 1 (projector alignment, `plain`) -> stage 2 (instruction tuning, `vicuna_v1`) ->
evaluation (with real and blank images) -> model card. Stages 1 and 2 run the project's
own trainer (`llava.train.loop.train`) in-process, exactly as `llava train` would.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable

import torch

from llava.checkpoint import load_tokenizer
from llava.data.synth_scene import MAX_OBJECTS
from llava.recipe.common import read_check, read_json, read_losses
from llava.recipe.evaluation import OUT_OF_STYLE_SEED, eval_seed, evaluate_model, write_eval_results
from llava.recipe.stages import finished_run, resumable_checkpoint, train_command, train_config, train_stage
from llava.recipe.text import LMSpec, pretrain_lm
from llava.recipe.tokenizer import chat_texts, grounded_docs, train_tokenizer
from llava.recipe.vision import VisionSpec, pretrain_vision, scene_pairs


@dataclass
class RecipeSize:
    """Everything that scales: data, model sizes, steps and epochs per stage."""

    n: int
    eval_n: int
    vocab: int
    vision: VisionSpec
    lm: LMSpec
    vision_steps: int
    vision_batch: int
    lm_steps: int
    lm_batch: int
    lm_scenes: int  # scenes whose descriptions + chats the LM reads in stage 0 (>= n; text only beyond n)
    s1_epochs: int
    s1_batch: int
    s1_lr: float
    s2_epochs: int
    s2_batch: int
    s2_lr: float
    s1_max_steps: int | None = None
    s2_max_steps: int | None = None
    s2_unfreeze_tower: bool = False  # LLaVA-1.6 style: the tower learns in stage 2 too
    s2_tail_epochs: int = 0  # stage 2 goes on from its last step at a lower lr (0: one phase)
    s2_tail_lr: float = 3e-4
    s2_tail_max_steps: int | None = None
    s2_tail_unfreeze_tower: bool = False  # the tower learns in the tail (at s2_tail_tower_lr)
    s2_tail_tower_lr: float | None = None  # None: the tail's lr
    vision_negatives: int = 0  # hard negative captions per image in stage 0 (0: plain CLIP)
    vision_scenes: int = 0  # scenes the tower pretrains on (a superset of the n; 0: just the n)
    train_scenes: int = 0  # scenes whose captions and chats stages 1-2 train on (a superset of the n; 0: the n)
    vision_lr: float = 1e-3
    grounding_weight: float = 0.0  # the caption-grounding loss beside CLIP's (llava.recipe.grounding)
    order_weight: float = 0.0  # its left-to-right ranking of the caption's groups (puts x into the patch tokens)
    text_chats: float = 0.1  # text-only chats per scene, in every data set and the LM's corpus
    text_mc: float = 0.0  # share of their questions asked as lettered multiple choice (llava.data.synth_text)
    max_objects: int = MAX_OBJECTS  # objects a scene at most, in training and held-out data (fewer: a simpler world)
    world: str = "classic"  # the synthetic world (llava.data.synth.WORLDS): "varied" draws and words it many ways
    save_steps: int = 200  # stages 1-2 checkpoint this often; a killed run restarted with reuse goes on from there
    eval_batch: int = 32
    out_of_style_per_cell: int = 40  # questions per category and wording of the out-of-style set (0: not run)
    extra: dict[str, Any] = field(default_factory=dict)


SIZES: dict[str, RecipeSize] = {
    "full": RecipeSize(n=3000, eval_n=350, vocab=1024, vision=VisionSpec(patch_size=16, sincos_positions=1.0),
                       lm=LMSpec(layers=6),
                       vision_steps=4000, vision_batch=128, lm_steps=400, lm_batch=16, lm_scenes=6000,
                       s1_epochs=1, s1_batch=32, s1_lr=1e-3, s2_epochs=4, s2_batch=16, s2_lr=1e-3,
                       s2_tail_epochs=5, s2_tail_lr=3e-4, vision_scenes=12000, train_scenes=9000,
                       grounding_weight=1.0, order_weight=1.0, text_chats=0.5, text_mc=0.5),
    "small": RecipeSize(n=240, eval_n=140, vocab=512,
                        vision=VisionSpec(patch_size=16, width=64, layers=2, heads=2, text_width=64, text_layers=1,
                                          embed_dim=64, sincos_positions=1.0),
                        lm=LMSpec(width=96, layers=2, heads=2, intermediate=256, max_positions=512),
                        vision_steps=40, vision_batch=48, lm_steps=60, lm_batch=8, lm_scenes=240,
                        s1_epochs=4, s1_batch=16, s1_lr=3e-3, s2_epochs=1, s2_batch=8, s2_lr=2e-3,
                        s1_max_steps=60, s2_max_steps=120, s2_tail_epochs=1, s2_tail_lr=6e-4, s2_tail_max_steps=30,
                        eval_batch=35, vision_scenes=300, train_scenes=300, grounding_weight=1.0, order_weight=1.0,
                        text_mc=0.5, save_steps=50, out_of_style_per_cell=4),
}
# The small size trained longer (about 8 min on one thread) in a simpler world, at most 2 objects a
# scene: it reads the printed word and tells a named object's colour (60%, chance 15). With up to 5
# objects the same training left colour at chance (20%): telling which of five objects is "the circle"
# is what a reduced model does not learn in minutes.
SIZES["reduced"] = replace(SIZES["small"], vision_steps=300, vision_scenes=1500, train_scenes=1500, lm_steps=200,
                           s1_max_steps=300, s2_max_steps=3000, s2_tail_max_steps=600, max_objects=2, eval_n=280)


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


# the spec fields each stage-0 model depends on: a restarted run keeps the model only if they are unchanged
_DATA_FIELDS = ("n", "vocab", "text_chats", "text_mc", "max_objects", "world")
_STAGE0_FIELDS: dict[str, tuple[str, ...]] = {
    "stage0_tokenizer": _DATA_FIELDS,
    "stage0_vision": _DATA_FIELDS + ("vision", "vision_steps", "vision_batch", "vision_lr", "vision_scenes",
                                     "vision_negatives", "grounding_weight", "order_weight"),
    "stage0_lm": _DATA_FIELDS + ("lm", "lm_steps", "lm_batch", "lm_scenes"),
}


STAGE0_SPEC_FILE = "recipe_spec.json"  # beside each stage-0 model: the recipe spec it was made with


def stage0_spec(folder: str, earlier_spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The spec a stage-0 model in `folder` was made with: its own record, else the spec of the last
    run that finished (older runs wrote no record), else None (trust the folder)."""
    path = os.path.join(folder, STAGE0_SPEC_FILE)
    return read_json(path) if os.path.isfile(path) else earlier_spec


def _defaults(cls: type) -> dict[str, Any]:
    """A dataclass's fields that have a plain default, with it."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _same_stage0_spec(name: str, earlier: dict[str, Any] | None, spec: RecipeSize) -> bool:
    """Whether the run that wrote `earlier` (its summary's spec) made stage-0 model `name` as `spec` would.
    Fields an older summary lacks count as their default, in the nested specs too (VisionSpec,
    LMSpec). No earlier summary: trust the folder."""
    if earlier is None:
        return True
    defaults = _defaults(RecipeSize)
    now = json.loads(json.dumps(asdict(spec)))

    def then(k: str) -> Any:
        value = earlier.get(k, defaults.get(k))
        nested = getattr(spec, k)
        if isinstance(value, dict) and is_dataclass(nested):
            value = {**_defaults(type(nested)), **value}
        return value

    return all(then(k) == now[k] for k in _STAGE0_FIELDS[name])


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
    from llava.data.synth import generate
    from llava.recipe.card import write_card

    spec = SIZES[size] if isinstance(size, str) else size
    size_name = size if isinstance(size, str) else "custom"
    if threads:
        torch.set_num_threads(threads)
    out = os.path.abspath(out)
    data, s0, eval_dir = os.path.join(out, "data"), os.path.join(out, "stage0"), os.path.join(out, "eval")
    tok_dir, tower, lm = os.path.join(s0, "tokenizer"), os.path.join(s0, "vision"), os.path.join(s0, "lm")
    s1, s2 = os.path.join(out, "stage1"), os.path.join(out, "stage2")
    os.makedirs(out, exist_ok=True)
    timer = _Timer(echo)
    t_all = time.perf_counter()
    summary_file = os.path.join(out, "recipe_summary.json")
    # a restarted run reports the reused stages' times from the run that made them
    earlier = read_json(summary_file) if reuse and os.path.isfile(summary_file) else {}
    earlier_times, earlier_spec = earlier.get("times", {}), earlier.get("spec")

    def keep(name: str, path: str) -> bool:
        """A stage-0 model to keep: asked to reuse, it is there, and the spec it depends on is unchanged."""
        return reuse and os.path.isfile(path) and _same_stage0_spec(
            name, stage0_spec(os.path.dirname(path), earlier_spec), spec)

    def made(folder: str, result: Any) -> Any:
        """Record beside a stage-0 model the spec it was made with (a run killed before its summary keeps it)."""
        with open(os.path.join(folder, STAGE0_SPEC_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(spec), f, indent=1)
        return result

    reused: set[str] = set()
    trained_seconds: dict[str, float] = {}  # kept training stages' own wall time

    def text_chats(n: int) -> int:
        return round(n * spec.text_chats)

    def same_data(meta: dict[str, Any], n: int, text_only: int) -> bool:
        """An earlier data folder is this run's (older ones, without text_mc in meta.json, had none)."""
        return (meta.get("seed"), meta.get("n"), meta.get("eval_n"), meta.get("text_only"), meta.get("text_mc", 0.0),
                meta.get("vocab", {}).get("max_objects"), meta.get("world", "classic")) == (
                    seed, n, 0, text_only, spec.text_mc, spec.max_objects, spec.world)

    def _data() -> dict[str, Any]:
        meta_file = os.path.join(data, "meta.json")
        if reuse and os.path.isfile(meta_file):
            meta = read_json(meta_file)
            if same_data(meta, spec.n, text_chats(spec.n)):
                reused.add("data")
                return meta
        return generate(data, seed=seed, n=spec.n, eval_n=0, text_only=text_chats(spec.n), text_mc=spec.text_mc,
                        max_objects=spec.max_objects, workers=workers, world=spec.world)

    meta = timer.run("data", _data)
    # held out twice over: its own seed, and the eval stream of that seed
    eval_meta = timer.run("eval_data", lambda: generate(eval_dir, seed=eval_seed(seed), n=0, eval_n=spec.eval_n,
                                                        max_objects=spec.max_objects, world=spec.world))
    corpus = [os.path.join(data, "pretrain.json"), os.path.join(data, "instruct.json")]

    def _tok():
        if keep("stage0_tokenizer", os.path.join(tok_dir, "tokenizer.json")):
            reused.add("stage0_tokenizer")
            return load_tokenizer(tok_dir)
        tok = train_tokenizer(chat_texts(corpus), vocab_size=spec.vocab)
        tok.save_pretrained(tok_dir)
        return made(tok_dir, tok)

    tokenizer = timer.run("stage0_tokenizer", _tok)

    def _superset(folder: str, n: int, text_only: int, name: str | None = None) -> str:
        """A folder of the first `n` scenes of the same seed: the recipe's own data when n <= spec.n,
        else more of it (scene i and its chat are the same whichever n is asked for, so extra scenes
        extend the n; the tokenizer and the LM keep reading the n)."""
        if n <= spec.n:
            return data
        meta_file = os.path.join(folder, "meta.json")
        if reuse and os.path.isfile(meta_file) and same_data(read_json(meta_file), n, text_only):
            if name:
                reused.add(name)
        else:
            generate(folder, seed=seed, n=n, eval_n=0, text_only=text_only, text_mc=spec.text_mc,
                     max_objects=spec.max_objects, workers=workers, world=spec.world)
        return folder

    def _vision_scenes() -> tuple[str, str]:
        """(pretrain.json, image folder) of the tower's scenes (captions only)."""
        folder = _superset(os.path.join(s0, "scenes"), spec.vision_scenes, text_only=0)
        return os.path.join(folder, "pretrain.json"), folder

    def _reused_stage(name: str, folder: str, checks: tuple[str, ...]) -> dict[str, Any]:
        """A stage-0 model already in `out`: its losses and held-out checks, read back from its log."""
        reused.add(name)
        log_file = os.path.join(folder, "metrics.jsonl")
        losses = read_losses(log_file)
        return {"reused": True, "first_loss": losses[0], "final_loss": losses[-1],
                **{f"{check}_heldout": read_check(log_file, check) for check in checks}}

    summary: dict[str, Any] = {"size": size_name, "seed": seed, "spec": asdict(spec), "stages": {}}
    if "stage0_tokenizer" in reused and keep("stage0_vision", os.path.join(tower, "model.safetensors")):
        summary["stages"]["stage0_vision"] = timer.run("stage0_vision", lambda: _reused_stage(
            "stage0_vision", tower, ("binding", "grounding")))
    else:
        summary["stages"]["stage0_vision"] = timer.run("stage0_vision", lambda: made(tower, pretrain_vision(
            *_vision_scenes(), tokenizer, tower, spec.vision, steps=spec.vision_steps, batch_size=spec.vision_batch,
            lr=spec.vision_lr, seed=seed, device=device, hard_negatives_per_image=spec.vision_negatives,
            check_pairs=scene_pairs(eval_dir), grounding_weight=spec.grounding_weight,
            order_weight=spec.order_weight, check_every=max(1, spec.vision_steps // 6))))
    if "stage0_tokenizer" in reused and keep("stage0_lm", os.path.join(lm, "model.safetensors")):
        summary["stages"]["stage0_lm"] = timer.run("stage0_lm", lambda: _reused_stage(
            "stage0_lm", lm, ("text_answers",)))
    else:
        lm_scenes = max(spec.n, spec.lm_scenes)
        lm_docs = grounded_docs(seed, lm_scenes, n_text=text_chats(lm_scenes), text_mc=spec.text_mc,
                                max_objects=spec.max_objects, world=spec.world)
        summary["stages"]["stage0_lm"] = timer.run("stage0_lm", lambda: made(lm, pretrain_lm(
            lm_docs, tokenizer, lm, spec.lm, steps=spec.lm_steps, batch_size=spec.lm_batch, seed=seed,
            device=device, check_dir=eval_dir)))

    train_data = timer.run("train_data", lambda: _superset(os.path.join(out, "train_data"), spec.train_scenes,
                                                           text_only=text_chats(spec.train_scenes),
                                                           name="train_data"))
    s1_args = dict(stage="pretrain", out=s1, data=os.path.join(train_data, "pretrain.json"), image_folder=train_data,
                   epochs=spec.s1_epochs, batch=spec.s1_batch, lr=spec.s1_lr, seed=seed, max_steps=spec.s1_max_steps,
                   device=device, language_model=lm, vision_tower=tower, save_steps=spec.save_steps,
                   # the varied world's canvases are not square: keep all of them, as LLaVA-1.5 does
                   image_aspect_ratio="pad" if spec.world == "varied" else None)
    # with a tail, stage 2's first phase trains into its own folder and the tail ends in OUT/stage2
    s2_first = os.path.join(out, "stage2_phase1") if spec.s2_tail_epochs else s2
    # template: else the stage-1 checkpoint's own template (plain) would be kept
    s2_args = dict(stage="finetune", out=s2_first, data=os.path.join(train_data, "instruct.json"),
                   image_folder=train_data, epochs=spec.s2_epochs, batch=spec.s2_batch, lr=spec.s2_lr, seed=seed,
                   max_steps=spec.s2_max_steps, model=s1, template="vicuna_v1", save_steps=spec.save_steps,
                   unfreeze_vision_tower=spec.s2_unfreeze_tower, device=device)
    runs = [("stage1", s1_args), ("stage2_phase1" if spec.s2_tail_epochs else "stage2", s2_args)]
    if spec.s2_tail_epochs:
        runs.append(("stage2", {**s2_args, "out": s2, "model": s2_first, "epochs": spec.s2_tail_epochs,
                                "lr": spec.s2_tail_lr, "max_steps": spec.s2_tail_max_steps,
                                "unfreeze_vision_tower": spec.s2_unfreeze_tower or spec.s2_tail_unfreeze_tower,
                                "vision_tower_lr": spec.s2_tail_tower_lr}))
    reusable = reuse and {"stage0_vision", "stage0_lm"} <= reused
    for name, args in runs:
        cfg = train_config(**args)
        done = finished_run(cfg, out) if reusable else None
        # a killed stage goes on from its last checkpoint (the trainer re-checks it), unless an earlier one retrained
        resume = resumable_checkpoint(cfg, out) if reusable and not done else None
        reusable = done is not None  # a stage is kept only when every stage before it was
        if done:
            reused.add(name)
            trained_seconds[name] = round(done["seconds"], 1)
        summary["stages"][name] = timer.run(name, lambda done=done, cfg=cfg, resume=resume: done or train_stage(cfg, resume))
    oos_dir = None
    if spec.out_of_style_per_cell:
        from llava.eval.out_of_style import write_set

        oos_dir = os.path.join(out, "eval_out_of_style")
        oos_meta = timer.run("out_of_style_data", lambda: write_set(oos_dir, OUT_OF_STYLE_SEED,
                                                                    spec.out_of_style_per_cell))
    metrics = timer.run("eval", lambda: evaluate_model(s2, eval_dir, spec.eval_batch, device, oos_dir))

    this_run = round(time.perf_counter() - t_all, 1)
    # a kept training stage's own trainer_state says how long it took (an earlier summary may predate it)
    carried = {k: trained_seconds.get(k, earlier_times.get(k)) for k in sorted(reused)
               if k in earlier_times or k in trained_seconds}
    times = {k: carried.get(k, v) for k, v in timer.times.items()}
    summary.update(times=times, this_run_seconds=this_run, reused_stages=sorted(carried),
                   total_seconds=round(sum(times.values()), 1) if carried else this_run,
                   data_sha=meta.get("files", {}), images_sha=meta.get("images", {}), eval_seed=eval_seed(seed),
                   train_data_sha=read_json(os.path.join(train_data, "meta.json")).get("files", {}),
                   eval_sha=eval_meta.get("files", {}).get("eval.jsonl"),
                   commands=[train_command(**a).replace(out, "$OUT") for _, a in runs], metrics=metrics)
    if oos_dir:
        summary["out_of_style_set"] = {"seed": OUT_OF_STYLE_SEED, "per_cell": spec.out_of_style_per_cell,
                                       "eval_sha256": oos_meta["sha256"]}
    with open(summary_file, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=str)
    write_card(s2, summary)
    write_eval_results(s2, summary)
    if not keep_data:
        for folder in (data, train_data):
            shutil.rmtree(os.path.join(folder, "images"), ignore_errors=True)
    echo(f"[recipe] model: {s2}")
    echo("[recipe] wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
         + f"; total {summary['total_seconds']:.1f}s" + (f" (reused: {', '.join(carried)})" if carried else ""))
    return summary

