"""The model card (README.md) the recipe writes next to the model it trained."""

from __future__ import annotations

import os
from typing import Any, Mapping

from llava.data.synth_scene import MAX_OBJECTS
from llava.eval.synth import TARGETS


def _hires_note(spec: dict[str, Any], summary: dict[str, Any]) -> str:
    """Stage 0 going on at a higher resolution (`vision_hires_*`), where the recipe has it."""
    if not spec.get("vision_hires_steps"):
        return ""
    held = summary.get("stages", {}).get("stage0_vision_hires", {}).get("grounding_heldout", {})
    return (f"; then the whole dual encoder went on {spec['vision_hires_steps']} steps at {spec['vision_hires_size']} "
            f"px (lr {spec['vision_hires_lr']}, its position embeddings resampled; held-out shape counts "
            f"{held.get('count_accuracy', float('nan')):.1f}%): the tower stage 2's last phase takes")


def _size_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, f))) / 1e6


def blank_cell(blank: Mapping[str, Any], category: str) -> str:
    """A blank-image accuracy, and where the model declined some questions (answers outside the
    category's set), its accuracy among the rest: what the grounding check compares with chance."""
    s = blank["categories"][category]
    answered = s.get("answered", s["n"])
    if answered == s["n"]:
        return f"{s['accuracy']:.1f}"
    among = blank["answered_accuracy"][category]
    return f"{s['accuracy']:.1f} ({'-' if among is None else f'{among:.1f}'} of {answered} guesses)"


def metrics_table(real: Mapping[str, Any], blank: Mapping[str, Any]) -> str:
    """Markdown: per category accuracy with real and blank images, chance and target."""
    chance = real.get("chance", {})
    rows = ["| category | n | accuracy % | blank-image % | chance % | target % |", "|---|---|---|---|---|---|"]
    for cat, s in real["categories"].items():
        target = TARGETS.get(cat)
        rows.append(f"| {cat} | {s['n']} | {s['accuracy']:.1f} | {blank_cell(blank, cat)} | "
                    f"{chance.get(cat, float('nan')):.1f} | {'' if target is None else f'{target:.0f}'} |")
    rows.append(f"| overall | {real['n']} | {real['overall']:.1f} | {blank['overall']:.1f} | "
                f"{chance.get('overall', float('nan')):.1f} | |")
    if "exist" in real:
        e, b = real["exist"], blank.get("exist", {})
        rows.append("")
        rows.append(f"Yes/no (POPE-style, yes = positive): precision {e['precision']:.3f}, recall {e['recall']:.3f}, "
                    f"F1 {e['f1']:.3f} (target {TARGETS['exist_f1']}), yes-ratio {e['yes_ratio']:.3f}; "
                    f"blank images: F1 {b.get('f1', float('nan')):.3f}, "
                    f"yes-ratio {b.get('yes_ratio', float('nan')):.3f}.")
    return "\n".join(rows)


def _aspect(spec: Mapping[str, Any]) -> str:
    """The recipe's model's aspect mode: pad (the varied world throughout), the mixed phase's, or square."""
    return "pad" if spec.get("world", "classic") != "classic" else spec.get("s2_mix_aspect") or "square"


def _how_the_model_sees(spec: Mapping[str, Any]) -> str:
    """How the image processor frames a non-square picture for this recipe's model."""
    aspect = _aspect(spec)
    if aspect == "pad":
        return "padded to a square by the image processor, as LLaVA-1.5 does"
    if aspect == "anyres":
        grids = ", ".join(f"{c}x{r}" for c, r in spec.get("s2_mix_grids", ()))
        return (f"which its last phase sees as LLaVA-NeXT does: the whole picture plus tiles of the tower's side "
                f"on the best of the grids {grids}, columns x rows")
    return ("resized and centre-cropped to a square by the image processor, the model's square mode, which cuts "
            "off the sides of a wide picture")


def _crop_sentence(oos: Mapping[str, Any], square: bool) -> str:
    """What a centre crop keeps of the set, and the accuracy there (where the evaluation measured it)."""
    crop = oos.get("after_crop")
    if not crop:
        return ""
    kept = ", ".join(f"{c} {share:.0f}%" for c, share in crop["share"].items())
    there = ", ".join(f"{c} {acc:.1f}" for c, acc in crop["accuracy"].items())
    who = ("this model's square mode" if square else
           "a square-mode model; this one sees the whole picture")
    return (f"\nA centre crop ({who}) keeps what decides the answer (the counted shapes, the one asked about) "
            f"in {kept} of each category's questions; what it cuts off no square-mode model can answer. Accuracy "
            f"on the questions it keeps: {there}.\n")


def _count_sentence(oos: Mapping[str, Any]) -> str:
    """Count accuracy by the true count and by the objects drawn, where the evaluation measured it."""
    from llava.eval.out_of_style import count_detail_sentence

    detail = oos.get("count_detail")
    return f"\nCount accuracy % (questions) {count_detail_sentence(detail)}.\n" if detail else ""


def out_of_style_section(oos: Mapping[str, Any], set_info: Mapping[str, Any], square: bool = True) -> str:
    """Markdown: the out-of-style set per category, training vs held-out wordings, blank images, targets,
    and what a centre crop keeps (`square`: the model sees pictures that way)."""
    from llava.eval.out_of_style import TARGETS as OOS_TARGETS

    chance = oos["all"].get("chance", {})
    rows = ["| category | n | training wordings % | held-out wordings % | all % | blank-image % | chance % | target % |",
            "|---|---|---|---|---|---|---|---|"]
    for cat, s in oos["all"]["categories"].items():
        rows.append(f"| {cat} | {s['n']} | {oos['train']['accuracy'][cat]:.1f} | {oos['heldout']['accuracy'][cat]:.1f} "
                    f"| {s['accuracy']:.1f} | {blank_cell(oos['blank'], cat)} | {chance.get(cat, float('nan')):.1f} "
                    f"| {OOS_TARGETS.get(cat, float('nan')):.0f} |")
    rows.append(f"| overall | {oos['all']['n']} | {oos['train']['overall']:.1f} | {oos['heldout']['overall']:.1f} | "
                f"{oos['all']['overall']:.1f} | {oos['blank']['overall']:.1f} | {chance.get('overall', float('nan')):.1f} | |")
    f1 = {part: oos[part].get("exist", {}).get("f1", float("nan")) for part in ("train", "heldout", "all", "blank")}
    return f"""## Pictures drawn another way (out-of-style set)

Pictures from an independent renderer (`llava.eval.drawn`: numpy rasterisation, its own shades,
canvases 64-640 px and non-square, object sizes, outlines, backgrounds, noise, PNG and JPEG), never
used for training, each question asked once in a training wording and once in a wording training
never uses (`llava.eval.out_of_style`, seed {set_info.get('seed', '?')}, {set_info.get('per_cell', '?')} questions per
category and wording, `eval.jsonl` SHA-256 `{set_info.get('eval_sha256', '?')}`); short-answer instruction, temperature 0.

{chr(10).join(rows)}

Yes/no F1 (yes = positive): training wordings {f1['train']:.3f}, held-out {f1['heldout']:.3f}, all {f1['all']:.3f}
(target {OOS_TARGETS['exist_f1']}), blank images {f1['blank']:.3f}.
{_count_sentence(oos)}{_crop_sentence(oos, square)}"""


def _tower_scenes(spec: Mapping[str, Any]) -> str:
    """The scenes stage 0's tower pretrains on: its own world's, and a second world's beside them."""
    scenes = str(max(spec.get("vision_scenes", 0), spec["n"]))
    if spec.get("vision_mix_scenes"):
        mix_world = spec.get("vision_mix_world") or spec["s2_mix_world"]
        scenes += f" scenes and {spec['vision_mix_scenes']} of the {mix_world} world's"
    return scenes


def _grounding(spec: Mapping[str, Any], grounded: Mapping[str, Any]) -> str:
    """The tower's caption-grounding loss and its per-patch readouts, with their held-out checks."""
    g_weight = spec.get("grounding_weight", 0.0)
    if not g_weight:
        return ""
    nan = float("nan")
    readouts = (f"; with the left-to-right ranking of the caption's groups (weight {spec['order_weight']}), "
                f"pairs of groups put in order {grounded.get('order_accuracy', nan):.1f}%"
                if spec.get("order_weight") else "")
    if spec.get("centre_weight"):
        readouts += (f"; with a per-patch readout of each shape's centre (weight {spec['centre_weight']}), whose "
                     f"centre patches count each shape right {grounded.get('centre_count_accuracy', nan):.1f}%")
    if spec.get("word_weight"):
        readouts += (f"; with a per-patch readout of the printed word on its band's patches (weight "
                     f"{spec['word_weight']}), which reads it right {grounded.get('word_read_accuracy', nan):.1f}%")
    return (f" plus the caption-grounding loss (weight {g_weight}: for each colour-shape pair \"is it there?\", "
            f"for each shape \"how many?\", read from the caption; held-out recall of present pairs "
            f"{grounded.get('pair_recall', nan):.1f}%, shape counts {grounded.get('count_accuracy', nan):.1f}%"
            f"{readouts})")


def _vision_bullet(spec: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """The model section's vision line: the tower, how stage 0 pretrained it, and its held-out checks."""
    v = spec["vision"]
    s0 = summary.get("stages", {}).get("stage0_vision", {})
    binding = ", ".join(f"{k} {a:.1f}%" for k, a in s0.get("binding_heldout", {}).items()) or "not measured"
    k_neg = spec.get("vision_negatives", 0)
    negatives = f", {k_neg} hard negative captions per image" if k_neg else ""
    sincos = (f", patch position embeddings started as a 2-D sin-cos grid of scale {v['sincos_positions']}"
              f" (so the patch tokens keep where they are)" if v.get("sincos_positions") else "")
    shape = f"{v['image_size']} px, patch {v['patch_size']}, {v['layers']} layers x {v['width']} wide"
    return f"""- vision: CLIP ViT, {shape}{sincos}
  (contrastively pretrained on the captions of {_tower_scenes(spec)} scenes, {spec['vision_steps']} steps of batch
  {spec['vision_batch']}{negatives}{_grounding(spec, s0.get("grounding_heldout", {}))}). Binding check on
  held-out scenes, how often an image is closer to its caption than to that caption with one colour,
  shape or count changed (50% = blind to it): {binding}{_hires_note(spec, summary)}"""


def _stage2_phases(spec: Mapping[str, Any]) -> str:
    """Stage 2's phases in words: the first, the tail at a lower lr, the mixed-world phase."""
    tail = (f", then {spec['s2_tail_epochs']} more from its last step at lr {spec['s2_tail_lr']}"
            if spec.get("s2_tail_epochs") else "")
    if spec.get("s2_mix_epochs"):
        tower = (f", the tower learning too at lr {spec['s2_mix_tower_lr']}"
                 if spec.get("s2_mix_tower_lr") is not None else "")
        if spec.get("vision_hires_steps"):
            tower += f", the tower being stage 0's {spec['vision_hires_size']}-px one (below)"
        elif spec.get("s2_mix_image_size"):
            tower += f" and taking {spec['s2_mix_image_size']}-px pictures (its position embeddings resampled)"
        tail += (f", then {spec['s2_mix_epochs']} more" if tail or spec.get("s2_epochs") else
                 f"{spec['s2_mix_epochs']} epoch(s), straight after stage 1,")
        tail += (f" at lr {spec['s2_mix_lr']} on the chats of "
                 f"{spec['s2_mix_scenes']} scenes of the {spec['s2_mix_world']} world beside the first "
                 f"{spec['s2_mix_main_chats']} image chats above{tower}")
    first_phase = f"{spec['s2_epochs']} epoch(s), lr {spec['s2_lr']}" if spec.get("s2_epochs", 1) else ""
    return first_phase + tail


def _data_section(summary: Mapping[str, Any]) -> str:
    """Which scenes each stage trains on, the held-out questions, and the generated files' hashes."""
    spec = summary["spec"]
    n_train = max(spec.get("train_scenes", 0), spec["n"])
    text_mc = (f" ({spec['text_mc']:.0%} of their questions as lettered multiple choice)"
               if spec.get("text_mc") else "")
    k_max = spec.get("max_objects", MAX_OBJECTS)
    simpler = (f" A simpler world: at most {k_max} objects a scene (the full world has {MAX_OBJECTS})."
               if k_max != MAX_OBJECTS else "")
    look = (f"\nThe varied world (`llava.data.synth_varied`): canvases of 64-384 px up to 2:1 either way "
            f"({_how_the_model_sees(spec)}), one shape filling the picture or up to five small "
            "ones, shades of each colour, filled or outlined, with or without an edge, tinted backgrounds, blur, "
            "noise and JPEG; questions in many wordings, some answered in sentences."
            if spec.get("world", "classic") != "classic" or spec.get("s2_mix_epochs") else "")
    hashes = "\n".join(f"- `{k}`: `{v}`" for k, v in summary.get("data_sha", {}).items())
    train_files = summary.get("train_data_sha", {}) if n_train > spec["n"] else {}
    train_hashes = "".join(f"\n- `train_data/{k}`: `{v}`" for k, v in train_files.items())
    images = summary.get("images_sha", {})
    return f"""## Data

Seed {summary['seed']}: the tokenizer is fitted to the text of the first {spec['n']} scenes, stages 1 and 2
train on the captions and chats of the first {n_train} (scene i is the same in every such set),
plus {spec.get('text_chats', 0.1):g} text-only chats per scene{text_mc};
{spec['eval_n']} held-out questions generated with
seed {summary.get('eval_seed', '?')} (`eval.jsonl` SHA-256 `{summary.get('eval_sha', '?')}`; the same numbers are
in `eval_results.json`).{simpler}{look}
SHA-256 of the generated files (from `meta.json`):

{hashes}{train_hashes}
- images: {images.get('count', '?')} files, digest `{images.get('sha256', '?')}`"""


def _wall_time_section(summary: Mapping[str, Any]) -> str:
    """Seconds per stage, the total, which stages an earlier run made, and how the model was made."""
    timing = "\n".join(f"| {k} | {v:.1f} |" for k, v in summary["times"].items())
    reused = summary.get("reused_stages", [])
    reused_note = (f"\nStages {', '.join(reused)} were reused from an earlier run of the same recipe in the same "
                   f"folder (`--reuse`); their times are that run's. This run took "
                   f"{summary.get('this_run_seconds', 0):.1f} s.\n" if reused else "")
    # how a model was actually made, where that differs from one uninterrupted run (set by whoever ships it)
    provenance = f"\n{summary['provenance']}\n" if summary.get("provenance") else ""
    return f"""## Wall time (seconds, {os.cpu_count()} CPU cores)

| stage | seconds |
|---|---|
{timing}
| total | {summary['total_seconds']:.1f} |
{reused_note}{provenance}"""


def card_text(summary: Mapping[str, Any], model_dir: str) -> str:
    m, spec = summary["metrics"], summary["spec"]
    lm = spec["lm"]
    lm_check = summary.get("stages", {}).get("stage0_lm", {}).get("text_answers_heldout", {})
    lm_answers = ", ".join(f"{k} {a:.0f}%" for k, a in lm_check.items()) or "not measured"
    oos = (out_of_style_section(m["out_of_style"], summary.get("out_of_style_set", {}), _aspect(spec) == "square")
           + "\n"
           if "out_of_style" in m else "")
    return f"""# tiny-llava (trained by the project's own recipe)

A miniature LLaVA trained from scratch on the synthetic shapes dataset (`llava.data.synth`),
with every stage of the LLaVA recipe reproduced at small scale on a CPU. No pretrained
weights are involved: the tokenizer, the CLIP-style vision tower and the Llama-style LM are
all pretrained by the recipe itself (stage 0).

## Reproduce

```
llava recipe tiny --size {summary['size']} --seed {summary['seed']} --out $OUT
```

(the model is `$OUT/stage2`). Stages 1 and 2 are equivalent to:

```
{chr(10).join(summary['commands'])}
```

## Model

{_vision_bullet(spec, summary)}
- language model: Llama, {lm['layers']} layers x {lm['width']} wide, vocabulary {spec['vocab']}
  ({spec['lm_steps']} steps of next-token pretraining on the dataset's chats and captions, each image
  replaced by its scene description in words, {spec.get('lm_scenes', spec['n'])} scenes). The LM alone,
  answering the held-out questions from each scene's description in words: {lm_answers}
- projector: mlp2x_gelu; stage 1 `plain` ({spec['s1_epochs']} epoch(s), lr {spec['s1_lr']}),
  stage 2 `vicuna_v1` ({_stage2_phases(spec)})
- size on disk: {_size_mb(model_dir):.1f} MB (llava-hf layout, safetensors)

{_data_section(summary)}

## Held-out results

{metrics_table(m['real'], m['blank'])}

Blank-image scores are the grounding check: with a white image the model should fall to
about chance. Among the answers it gives from each category's set, accuracy lies within 10 points
of chance (`llava.eval.synth.grounding_check`); answers outside the set, such as "No" to "left or
right?" about a blank picture, are declines rather than guesses, and where there are any the
cell shows the accuracy among the guesses and their number.

{oos}{_wall_time_section(summary)}"""


def write_card(model_dir: str, summary: Mapping[str, Any]) -> str:
    path = os.path.join(model_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(card_text(summary, model_dir))
    return path
