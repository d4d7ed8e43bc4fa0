"""The tiny-LLaVA recipe: stage-0 pieces (fast) and the whole small recipe end to end (slow)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionModel

from llava.checkpoint import load_tokenizer
from llava.data.synth import generate, load_scenes
from llava.eval.synth import CATEGORIES
from llava.recipe.common import read_check, read_losses, seed_everything
from llava.recipe.negatives import hard_negatives, perturb_caption
from llava.recipe.text import LMSpec, pack, pretrain_lm, text_answer_accuracy
from llava.recipe.tokenizer import IMAGE_TOKEN, chat_texts, grounded_docs, train_tokenizer
from llava.recipe.vision import (DualEncoder, VisionSpec, clip_loss, load_pairs,
                                 pretrain_vision, scene_pairs, sincos_grid, to_pixels)

SMALL_VISION = VisionSpec(patch_size=16, width=32, layers=1, heads=2, text_width=32, text_layers=1, embed_dim=32)
SMALL_LM = LMSpec(width=32, layers=1, heads=2, intermediate=64, max_positions=256)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=0, n=24, eval_n=7)
    return root


@pytest.fixture(scope="module")
def tokenizer(synth):
    return train_tokenizer(chat_texts([synth / "pretrain.json", synth / "instruct.json"]), vocab_size=384)


def test_tokenizer_round_trips_with_llama_specials(tokenizer, synth):
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == len(tokenizer) - 1
    text = chat_texts([synth / "instruct.json"])[0]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[1:]) == text
    assert len(ids) < len(text) / 2  # the corpus' words are merged, not spelled out byte by byte
    with_image = tokenizer("<image>\nWhat color?")["input_ids"]
    assert with_image[1] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def test_clip_loss_is_low_for_matching_pairs():
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert clip_loss(x, x, 50.0) < 0.1 < clip_loss(x, x.roll(1, 0), 50.0)


def test_hard_negatives_count_in_the_image_side_of_the_loss():
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    far = -x
    # a negative caption identical to the true one makes the true one half as likely
    assert clip_loss(x, x, 50.0, far) < 0.1 < clip_loss(x, x, 50.0, x)


CAPTION = "two red diamonds, a gray star and a blue circle on a light green background with the word 'bird'"


@pytest.mark.parametrize("kind", ["color", "shape", "count"])
def test_perturb_caption_changes_one_object_attribute(kind):
    import random

    tail = " on a light green background with the word 'bird'"
    seen = set()
    for seed in range(40):
        neg = perturb_caption(CAPTION, random.Random(seed), kind)
        assert neg != CAPTION and neg.endswith(tail)  # never the background or the word
        changed = [(a, b) for a, b in zip(CAPTION.split(), neg.split()) if a != b]
        assert len(changed) == 1 and len(neg.split()) == len(CAPTION.split()), neg
        old, new = (w.strip(",") for w in changed[0])
        seen.add(old)
        if old == "diamonds":  # a group stays a group
            assert new.endswith("s") and new != old
    expected = {"color": {"red", "gray", "blue"}, "shape": {"diamonds", "star", "circle"}, "count": {"two"}}[kind]
    assert seen == expected
    assert perturb_caption("a red circle on a white background", random.Random(0), "count") is None


def test_hard_negatives_cover_each_kind_per_caption():
    negs = hard_negatives([CAPTION, "a red circle on a white background"], seed=0, per_caption=4)
    assert len(negs) == 8 and CAPTION not in negs
    changed = [next(a.strip(",") for a, b in zip(CAPTION.split(), n.split()) if a != b) for n in negs[:4]]
    kinds = ["count" if w == "two" else "color" if w in ("red", "gray", "blue") else "shape" for w in changed]
    assert kinds == ["shape", "color", "count", "shape"]
    # no number word to change in the second caption: its count negative changes something else
    assert all(n != "a red circle on a white background" for n in negs[4:])


def test_contrastive_loss_falls_on_a_tiny_batch(synth, tokenizer):
    torch.manual_seed(0)
    images, captions = load_pairs(str(synth / "pretrain.json"), str(synth), limit=8)
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    model = DualEncoder(len(tokenizer), SMALL_VISION)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pixels, ids, mask = to_pixels(images), enc["input_ids"], enc["attention_mask"].bool()
    losses = []
    for _ in range(30):
        loss = model(pixels, ids, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_grounding_targets_read_from_captions_match_the_scenes():
    """Pairs and shape counts parsed from each caption equal what the scene itself holds."""
    from llava.data.synth import train_scene
    from llava.data.synth_scene import SHAPES
    from llava.data.synth_text import caption
    from llava.recipe.grounding import MAX_COUNT, PAIRS, grounding_targets

    assert len(set(PAIRS)) == len(PAIRS) == 7 * 6
    scenes = [train_scene(0, i)[1] for i in range(200)]
    pairs, counts = grounding_targets([caption(s) for s in scenes])
    for scene, pair_row, count_row in zip(scenes, pairs, counts):
        assert {PAIRS[i] for i in pair_row.nonzero().flatten().tolist()} == {f"{o.color} {o.shape}" for o in scene.objects}
        assert count_row.tolist() == [min(scene.count(shape=s), MAX_COUNT) for s in SHAPES]
    assert counts.max() > 1 and (counts == 0).any()  # the scenes cover groups and absent shapes


def test_per_query_readout_starts_as_the_shared_head_and_trains_its_own_weights():
    """The option adds zero-initialised weights per pair and per shape: the same outputs at the start as
    the shared head from the same seed, then gradients of their own; the DualEncoder takes it from the spec."""
    from dataclasses import replace

    from llava.recipe.grounding import MAX_COUNT, PAIRS, GroundingHead, grounding_loss

    torch.manual_seed(0)
    own = GroundingHead(32, per_query_readout=True)
    torch.manual_seed(0)
    shared = GroundingHead(32)
    assert set(own.state_dict()) - set(shared.state_dict()) == {"pair_own", "count_own"}
    tokens = torch.randn(3, 9, 32)
    for a, b in zip(own(tokens)[:2], shared(tokens)[:2]):
        torch.testing.assert_close(a, b)
    pairs = (torch.rand(3, len(PAIRS)) < 0.1).float()
    counts = torch.randint(0, MAX_COUNT + 1, (3, 6))
    grounding_loss(*own(tokens)[:2], pairs, counts).backward()
    assert own.pair_own.grad.abs().sum() > 0 and own.count_own.grad.abs().sum() > 0
    model = DualEncoder(100, replace(SMALL_VISION, grounding_per_query_readout=True), grounding=True)
    assert model.grounding_head.pair_own is not None
    assert DualEncoder(100, SMALL_VISION, grounding=True).grounding_head.pair_own is None


def test_caption_order_ranks_each_pair_by_its_leftmost_object():
    """The order targets follow the scene: a group listed earlier has its leftmost object further left."""
    from llava.data.synth import train_scene
    from llava.data.synth_text import caption
    from llava.recipe.grounding import PAIRS, caption_order, order_loss

    scenes = [train_scene(0, i)[1] for i in range(200)]
    order = caption_order([caption(s) for s in scenes])
    compared = 0
    for scene, row in zip(scenes, order):
        left = {}
        for o in scene.objects:
            key = f"{o.color} {o.shape}"
            left[key] = min(left.get(key, (o.x, o.y)), (o.x, o.y))
        listed = {PAIRS[i]: int(p) for i, p in enumerate(row) if p >= 0}
        assert set(listed) == set(left) and sorted(listed.values()) == list(range(len(left)))
        for a in left:
            for b in left:
                if listed[a] < listed[b]:
                    assert left[a] < left[b]
                    compared += 1
    assert compared > 100
    # the ranking loss is small when scores follow the caption's order, large when they reverse it
    right, wrong = order.float(), -order.float()
    assert order_loss(10 * right, order) < 0.01 < 5 < order_loss(10 * wrong, order)


def test_order_ranking_trains_and_is_scored(synth, tokenizer, tmp_path):
    v = pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tmp_path / "tower"), SMALL_VISION,
                        steps=6, batch_size=8, lr=3e-3, check_pairs=scene_pairs(str(synth)), grounding_weight=1.0,
                        order_weight=1.0)
    assert 0 <= v["grounding_heldout"]["order_accuracy"] <= 100 and v["order_weight"] == 1.0
    with pytest.raises(ValueError, match="grounding_weight"):
        pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tmp_path / "t2"), SMALL_VISION,
                        steps=1, batch_size=8, order_weight=1.0)
    with pytest.raises(ValueError, match="check images are 96 px, the tower's are 64"):  # one clear error, not CLIP's
        pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tmp_path / "t3"),
                        dataclasses.replace(SMALL_VISION, image_size=64), steps=1, batch_size=8,
                        check_pairs=scene_pairs(str(synth)))


def test_stage0_goes_on_from_its_whole_dual_encoder_at_a_higher_resolution(synth, tokenizer, tmp_path):
    """`init_from`: training continues from the dual encoder an earlier call kept (text side and heads too); at
    another side the tower's position grid is resampled (the class position kept). A folder without the file, or
    of other heads, is one clear error."""
    from safetensors.torch import load_file

    from llava.recipe.vision import DUAL_FILE, DualEncoder, load_dual_encoder

    kw = dict(batch_size=8, grounding_weight=1.0, centre_weight=1.0, check_cells=None)
    pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tmp_path / "low"), SMALL_VISION,
                    steps=2, lr=3e-3, **kw)
    low = load_file(str(tmp_path / "low" / DUAL_FILE))
    # lr 0: one step changes nothing, so the continued model is the kept one, resampled
    high = dataclasses.replace(SMALL_VISION, image_size=128)
    v = pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tmp_path / "high"), high, steps=1,
                        lr=0.0, init_from=str(tmp_path / "low"), check_pairs=scene_pairs(str(synth), image_size=128),
                        **kw)
    assert v["steps"] == 1 and CLIPVisionModel.from_pretrained(tmp_path / "high").config.image_size == 128
    went_on = load_file(str(tmp_path / "high" / DUAL_FILE))
    positions = next(k for k in low if k.endswith("position_embedding.weight"))
    assert low[positions].shape[0] == 1 + 6 * 6 and went_on[positions].shape[0] == 1 + 8 * 8
    assert torch.equal(went_on[positions][0], low[positions][0])
    assert all(torch.equal(went_on[k], low[k]) for k in low if k != positions and "position_ids" not in k)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "config.json").write_text(json.dumps({"image_size": 96}))
    with pytest.raises(FileNotFoundError, match=DUAL_FILE):
        pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tmp_path / "x"), SMALL_VISION,
                        steps=1, init_from=str(tmp_path / "none"), **kw)
    with pytest.raises(ValueError, match="not a dual encoder of this spec and heads"):
        load_dual_encoder(DualEncoder(len(tokenizer), SMALL_VISION, grounding=True), str(tmp_path / "low"))


def test_centre_cells_mark_each_shape_s_centre_patch_as_the_padded_tower_sees_it():
    from llava.data.synth_scene import SHAPES, Obj, Scene
    from llava.recipe.grounding import centre_cells

    # 200 x 100: padded to 200 x 200 (50 px above and below), resized to 96, patch 16 (6 x 6 cells)
    scene = Scene(size=200, height=100, background="white", gradient=0, objects=[
        Obj("circle", "red", "small", 10, 10, 5), Obj("circle", "blue", "small", 190, 90, 5),
        Obj("star", "red", "small", 100, 50, 5), Obj("star", "gray", "small", 101, 51, 5)])
    cells = centre_cells(scene, 96, 16)
    assert cells.shape == (36, len(SHAPES))
    circle, star = SHAPES.index("circle"), SHAPES.index("star")
    # (10, 60) -> (4.8, 28.8): row 1, col 0; (190, 140) -> (91.2, 67.2): row 4, col 5; (100, 100) -> (48, 48)
    assert cells[:, circle].nonzero().flatten().tolist() == [1 * 6 + 0, 4 * 6 + 5]
    assert cells[:, star].nonzero().flatten().tolist() == [3 * 6 + 3]  # two centres in one patch: one mark
    assert cells.sum() == 3


def test_word_cells_mark_the_word_band_s_patches_as_the_padded_tower_sees_it():
    from llava.data.synth_scene import WORDS, Scene
    from llava.recipe.grounding import patch_cells, word_cells, word_read_accuracy

    # 200 x 100 with its word in the bottom band (y 80-100): padded to 200 x 200 (50 px above), so the band is
    # y 130-150 -> 62.4-72 at 96 px: patch rows 3 and 4, every column
    scene = Scene(size=200, height=100, background="white", gradient=0, objects=[], word="cat",
                  word_box=(0, 80, 200, 100), word_place="bottom")
    cells = word_cells(scene, 96, 16).view(6, 6)
    assert (cells[3:5] == 1 + WORDS.index("cat")).all() and cells[:3].sum() == 0 and cells[5:].sum() == 0
    plain = Scene(size=96, background="white", gradient=0, objects=[])
    assert word_cells(plain, 96, 16).sum() == 0
    with pytest.raises(ValueError, match="names only"):
        word_cells(dataclasses.replace(scene, word="zebra"), 96, 16)
    both = patch_cells([scene, plain], 96, 16)
    assert both.centres.shape == (2, 36, 6) and both.words.shape == (2, 36)
    logits = torch.zeros(2, 36, 1 + len(WORDS))
    logits[0, :, 1 + WORDS.index("dog")] = 1.0  # every patch says dog ...
    logits[0, 18:30, 1 + WORDS.index("cat")] = 2.0  # ... but the band's say cat louder
    assert word_read_accuracy(logits, both.words) == 100.0  # the picture without a word is not scored
    logits[0, 18:30, 1 + WORDS.index("cat")] = 0.5
    assert word_read_accuracy(logits, both.words) == 0.0


def test_centre_and_word_readouts_train_need_the_grounding_head_and_are_scored(synth, tokenizer, tmp_path):
    from llava.recipe.grounding import scenes_of
    from llava.recipe.vision import heldout_cells

    names = [r["image"] for r in json.loads((synth / "pretrain.json").read_text())]
    assert [s.objects for s in scenes_of(str(synth), names[:3])] == [
        s.objects for s in list(load_scenes(synth, "train").values())[:3]]
    v = pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tmp_path / "tower"), SMALL_VISION,
                        steps=6, batch_size=8, lr=3e-3, check_pairs=scene_pairs(str(synth)), grounding_weight=1.0,
                        centre_weight=1.0, word_weight=1.0, check_cells=heldout_cells(str(synth), SMALL_VISION))
    assert 0 <= v["grounding_heldout"]["centre_count_accuracy"] <= 100 and v["centre_weight"] == 1.0
    assert 0 <= v["grounding_heldout"]["word_read_accuracy"] <= 100 and v["word_weight"] == 1.0
    assert not any("centre" in k or "word" in k
                   for k in CLIPVisionModel.from_pretrained(tmp_path / "tower").state_dict())
    # the readouts are kept beside the tower: read back, they score the held-out scenes as training did
    from llava.recipe.grounding import load_readouts
    from llava.recipe.vision import DualEncoder, grounding_accuracy

    again = DualEncoder(len(tokenizer), SMALL_VISION, grounding=True, centres=True, words=True)
    again.vision = CLIPVisionModel.from_pretrained(tmp_path / "tower")
    load_readouts(again, str(tmp_path / "tower"))
    assert grounding_accuracy(again, *scene_pairs(str(synth)), cells=heldout_cells(str(synth), SMALL_VISION)) \
        == v["grounding_heldout"]
    from llava.recipe.grounding import save_readouts

    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="readouts.safetensors"):  # a tower saved before readouts were kept
        load_readouts(again, str(tmp_path / "plain"))
    save_readouts(DualEncoder(len(tokenizer), SMALL_VISION, grounding=True), str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no centre_head"):  # a head the saved tower was trained without
        load_readouts(again, str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="grounding_weight"):
        pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tmp_path / "t2"), SMALL_VISION,
                        steps=1, batch_size=8, centre_weight=1.0)
    with pytest.raises(ValueError, match="grounding_weight"):
        pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tmp_path / "t3"), SMALL_VISION,
                        steps=1, batch_size=8, word_weight=1.0)
    with pytest.raises(ValueError, match="no scenes.jsonl"):
        scenes_of(str(tmp_path), names[:1])


def test_grounding_loss_falls_and_is_checked_on_held_out_scenes(synth, tokenizer, tmp_path):
    v = pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tmp_path / "tower"), SMALL_VISION,
                        steps=24, batch_size=8, lr=3e-3, check_pairs=scene_pairs(str(synth)), grounding_weight=1.0,
                        log_every=1, check_every=10)
    losses = read_losses(tmp_path / "tower" / "metrics.jsonl")
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    assert set(v["grounding_heldout"]) == {"pair_recall", "pair_accuracy", "count_accuracy"}
    assert v["grounding_weight"] == 1.0
    rows = [json.loads(line) for line in open(tmp_path / "tower" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "grounding" in r] == [10, 20, 24]  # periodic checks, then the final one
    assert read_check(tmp_path / "tower" / "metrics.jsonl", "grounding") == v["grounding_heldout"]
    # the saved tower is a plain CLIP vision folder: the grounding head is training-only
    assert not any("grounding" in k for k in CLIPVisionModel.from_pretrained(tmp_path / "tower").state_dict())


def test_scene_pairs_caption_scenes_as_the_pretraining_set_does(synth):
    images, captions = load_pairs(str(synth / "pretrain.json"), str(synth))
    train_images, train_captions = scene_pairs(str(synth), split="train")
    assert train_captions == captions and (train_images == images).all()
    eval_images, eval_captions = scene_pairs(str(synth))
    assert len(eval_captions) == len(eval_images) == 7 and not set(eval_captions) & set(captions)


def test_stage0_folders_load_with_transformers(synth, tokenizer, tmp_path):
    tower, lm = tmp_path / "tower", tmp_path / "lm"
    v = pretrain_vision(str(synth / "pretrain.json"), str(synth), tokenizer, str(tower), SMALL_VISION, steps=3,
                        batch_size=8, hard_negatives_per_image=2, check_pairs=scene_pairs(str(synth)))
    t = pretrain_lm(grounded_docs(0, 24, 2), tokenizer, str(lm), SMALL_LM, steps=3, batch_size=4,
                    block=64)
    assert v["steps"] == t["steps"] == 3 and len(read_losses(tower / "metrics.jsonl")) >= 2
    # the held-out binding check is logged (and read back when a restarted recipe reuses the tower)
    assert read_check(str(tower / "metrics.jsonl"), "binding") == v["binding_heldout"]
    assert set(v["binding_heldout"]) == {"color", "shape", "count"} and v["pairs"] == 24
    clip = CLIPVisionModel.from_pretrained(tower)
    assert clip.config.image_size == 96 and clip.config.patch_size == 16
    out = clip(pixel_values=torch.zeros(1, 3, 96, 96), output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 37, 32)
    model = AutoModelForCausalLM.from_pretrained(lm)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    from llava.checkpoint import load_tokenizer

    assert load_tokenizer(str(lm)).convert_tokens_to_ids(IMAGE_TOKEN) == len(tokenizer) - 1


def test_stage0_models_are_kept_only_for_the_same_text_data():
    """The text-only chats feed the tokenizer (so the tower's captions' ids) and the LM's corpus; the
    world's size (objects a scene) changes every scene, caption and chat."""
    from llava.recipe.sizes import SIZES
    from llava.recipe.stages import same_stage0_spec

    # what the fields' defaults describe: the text data before these fields existed
    before = dataclasses.replace(SIZES["full"], text_chats=0.1, text_mc=0.0)
    older = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(before))).items()
             if k not in ("text_chats", "text_mc", "max_objects")}  # a summary written before these fields existed
    for stage in ("stage0_tokenizer", "stage0_vision", "stage0_lm"):
        assert same_stage0_spec(stage, older, before)
        assert not same_stage0_spec(stage, older, dataclasses.replace(before, max_objects=2))  # other scenes
        assert not same_stage0_spec(stage, older, dataclasses.replace(before, text_mc=0.5))
        assert not same_stage0_spec(stage, older, dataclasses.replace(before, text_chats=0.5))
        assert not same_stage0_spec(stage, older, SIZES["full"])  # the shipped recipe's text data differs
    # a summary from before the tower's sin-cos positions: its vision spec lacks the field (default 0)
    plain = dataclasses.replace(before, vision=dataclasses.replace(before.vision, sincos_positions=0.0))
    older["vision"].pop("sincos_positions")
    assert same_stage0_spec("stage0_vision", older, plain)
    assert not same_stage0_spec("stage0_vision", older, before)
    assert same_stage0_spec("stage0_lm", older, before)  # the LM does not read the tower


def test_a_stage0_model_records_its_spec_so_a_killed_run_keeps_only_what_still_fits(tmp_path):
    """A run killed before writing its summary leaves stage-0 models behind; each has its spec beside
    it, so a restart with another tower spec or world retrains what depends on it, keeps the rest."""
    from llava.recipe.sizes import SIZES
    from llava.recipe.stages import STAGE0_SPEC_FILE, same_stage0_spec, stage0_spec

    spec = SIZES["full"]
    (tmp_path / STAGE0_SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec)))
    recorded = stage0_spec(str(tmp_path), earlier_spec=None)
    longer = dataclasses.replace(spec, vision_steps=spec.vision_steps + 1)
    assert same_stage0_spec("stage0_vision", recorded, spec)
    assert not same_stage0_spec("stage0_vision", recorded, longer)
    assert same_stage0_spec("stage0_lm", recorded, longer)
    assert not same_stage0_spec("stage0_lm", recorded, dataclasses.replace(spec, world="varied"))
    # no record (a folder from before records): the last finished run's summary, else trust the folder
    assert stage0_spec(str(tmp_path / "older"), {"n": 1}) == {"n": 1}
    assert stage0_spec(str(tmp_path / "older"), None) is None


def test_the_towers_second_world_can_differ_from_the_mixed_phases():
    """`vision_mix_world` picks the world of the scenes stage 0 adds; left unset it is the mixed phase's,
    so a record written before the field existed keeps its tower for a spec that moves only stage 2's world."""
    from llava.recipe.sizes import SIZES
    from llava.recipe.stages import same_stage0_spec

    full, chats = SIZES["full"], SIZES["full-varied-2-chats"]
    assert full.tower_mix_world == "varied" and chats.tower_mix_world == "varied"
    assert chats.s2_mix_world == "varied-2" and SIZES["full-varied-2"].tower_mix_world == "varied-2"
    older = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(full))).items() if k != "vision_mix_world"}
    assert same_stage0_spec("stage0_vision", older, chats)  # same tower: its scenes' world is unchanged
    assert not same_stage0_spec("stage0_vision", older, SIZES["full-varied-2"])
    assert not same_stage0_spec("stage0_vision", older, dataclasses.replace(full, vision_mix_world="varied-2"))
    recorded = json.loads(json.dumps(dataclasses.asdict(chats)))
    assert same_stage0_spec("stage0_vision", recorded, full)
    assert not same_stage0_spec("stage0_vision", recorded, dataclasses.replace(full, s2_mix_world="varied-2"))


def test_sincos_positions_start_the_tower_knowing_where_each_patch_is():
    grid = sincos_grid(6, 32)
    assert grid.shape == (36, 32)
    cols, rows = torch.arange(36) % 6, torch.arange(36) // 6
    # first half: the column alone (same for every row), second half: the row alone; all 36 distinct
    assert torch.equal(grid[:, :16], grid[cols, :16]) and torch.equal(grid[:, 16:], grid[rows * 6, 16:])
    assert len({tuple(r.tolist()) for r in grid}) == 36
    spec = dataclasses.replace(SMALL_VISION, sincos_positions=2.0)
    seed_everything(0)
    plain_tower = DualEncoder(50, SMALL_VISION).vision
    seed_everything(0)
    tower = DualEncoder(50, spec).vision
    weight, plain = tower.embeddings.position_embedding.weight, plain_tower.embeddings.position_embedding.weight
    assert torch.equal(weight[1:], 2.0 * sincos_grid(6, 32)) and torch.equal(weight[0], plain[0])  # CLS kept
    assert weight.requires_grad  # a starting point: CLIP's position embedding still learns
    # at init, a patch's column is readable from the tokens LLaVA takes (layer -2), unlike CLIP's init:
    # the same red square drawn in column 0 and column 5 gives far more different tokens with sin-cos
    img = torch.zeros(2, 3, 96, 96)
    img[0, 0, 40:56, 0:16] = img[1, 0, 40:56, 80:96] = 2.0

    def moved(t: CLIPVisionModel) -> float:
        with torch.no_grad():
            h = t(pixel_values=img, output_hidden_states=True).hidden_states[-2][:, 1:]
        return ((h[0, 2 * 6 + 0] - h[1, 2 * 6 + 5]).norm() / h[0, 2 * 6 + 0].norm()).item()

    assert moved(tower) > 3 * moved(plain_tower)


def test_the_card_s_train_commands_parse_to_the_configs_the_recipe_trains_with():
    """Each stage's shell command (on the card), parsed by `llava train`, resolves to the config the recipe
    ran, but for where and how the run is kept (device: best available; checkpoints, logging, progress)."""
    import argparse
    import shlex

    from llava.recipe.stages import train_command, train_config
    from llava.train.cli import add_train_args, config_from_args

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    stages = [dict(stage="pretrain", out="o1", data="p.json", image_folder="img", epochs=1, batch=32, lr=1e-3, seed=0,
                   max_steps=None, language_model="lm", vision_tower="vt", image_aspect_ratio="pad"),
              dict(stage="finetune", out="o2", data="i.json", image_folder="img", epochs=3, batch=16, lr=3e-4, seed=1,
                   max_steps=120, model="o1", template="vicuna_v1", unfreeze_vision_tower=True,
                   vision_tower_lr=1e-4, length_window=16, bf16=True, image_size=128),
              dict(stage="finetune", out="o3", data="m.json", image_folder="img", epochs=4, batch=16, lr=3e-4, seed=0,
                   max_steps=None, model="o2", template="vicuna_v1", image_aspect_ratio="anyres",
                   image_grid_pinpoints=[(96, 96), (96, 192), (192, 96), (192, 192)], bf16=True)]
    run_only = {"save_steps", "save_total_limit", "logging_steps", "progress", "overwrite", "device"}
    for args in stages:
        ran = train_config(**args).resolved().to_dict()
        parsed = config_from_args(parser.parse_args(shlex.split(train_command(**args))[2:])).resolved().to_dict()
        assert {k: v for k, v in parsed.items() if k not in run_only} == {
            k: v for k, v in ran.items() if k not in run_only}
    # Paths inside the run folder read $OUT/...; a sibling folder sharing its prefix does not.
    moved = train_command(root="/r/run", **{**stages[1], "out": "/r/run/o2", "model": "/r/run2/o1",
                                            "image_folder": "/r/run/img dir"})
    assert "--out $OUT/o2 " in moved and "--model /r/run2/o1 " in moved
    assert shlex.split(moved.replace("$OUT", "/x"))[shlex.split(moved).index("--image-folder") + 1] == "/x/img dir"


def test_cli_parses_recipe_flags():
    import argparse

    from llava.recipe.cli import add_recipe_command

    parser = argparse.ArgumentParser()
    add_recipe_command(parser.add_subparsers())
    args = parser.parse_args(["recipe", "tiny", "--out", "x", "--seed", "3", "--size", "small"])
    assert (args.out, args.seed, args.size) == ("x", 3, "small") and callable(args.func)
    # the choices are listed by hand (building the parser imports no torch): the named sizes, no more, no fewer
    from llava.recipe.cli import SIZE_NAMES
    from llava.recipe.sizes import SIZES

    assert sorted(SIZE_NAMES) == sorted(SIZES)
    for name in SIZES:
        assert parser.parse_args(["recipe", "tiny", "--size", name]).size == name


def test_grounded_docs_are_the_dataset_chats_with_descriptions_for_images(synth):
    from llava.data.synth_scene import Scene
    from llava.data.synth_text import description

    records = json.loads((synth / "instruct.json").read_text())
    scenes = [json.loads(line) for line in (synth / "scenes.jsonl").read_text().splitlines()]
    docs = grounded_docs(0, 30, 1)  # 6 scenes beyond the dataset: text only, never rendered
    assert len(docs) == 2 * 30 + 1
    chat, spans = docs[2 * 5 + 1]  # scene 5: its caption doc, then its chat doc
    desc = description(Scene.from_dict(scenes[5]["scene"]))
    turns = [t["value"] for t in records[5]["conversations"]]
    assert IMAGE_TOKEN not in chat and desc in chat
    assert [chat[a:b].strip() for a, b in spans] == [t + "</s>" for t in turns[1::2]]
    assert chat.endswith(turns[-1] + "</s>")


def test_pack_masks_everything_but_the_assistant_turns(tokenizer):
    docs = grounded_docs(0, 2)
    ids, labels = pack(tokenizer, docs, block=32, all_tokens=False)
    assert ids.shape == labels.shape and ids.shape[1] == 32
    flat_ids, flat_labels = ids.flatten(), labels.flatten()
    kept = flat_labels != -100
    assert 0 < kept.sum() < len(flat_ids) // 2 and torch.equal(flat_labels[kept], flat_ids[kept])
    answers = tokenizer.decode(flat_ids[kept])
    assert "USER" not in answers and "ASSISTANT" not in answers and "</s>" in answers
    ids_all, labels_all = pack(tokenizer, docs, block=32)
    assert torch.equal(ids_all, ids) and torch.equal(labels_all, ids_all)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from llava.recipe import run_recipe

    out = tmp_path_factory.mktemp("recipe") / "tiny"
    return out, run_recipe(str(out), seed=0, size="small", threads=1, echo=lambda _: None)


@pytest.mark.slow
def test_small_recipe_end_to_end(small_run):
    out, summary = small_run
    for metrics in ("stage0/vision", "stage0/lm", "stage1", "stage2_phase1", "stage2"):
        losses = read_losses(out / metrics / "metrics.jsonl")
        assert len(losses) >= 2 and losses[-1] < losses[0], (metrics, losses)
    model = out / "stage2"
    assert (model / "model.safetensors").is_file() and (model / "README.md").is_file()
    assert sum(os.path.getsize(model / f) for f in os.listdir(model)) < 20e6
    card = (model / "README.md").read_text()
    assert "llava recipe tiny --size small --seed 0" in card and "blank-image" in card
    assert "Binding check on\n  held-out scenes" in card and "shape " in card
    saved = json.loads((out / "recipe_summary.json").read_text())
    assert set(saved["times"]) >= {"data", "eval_data", "stage0_vision", "stage0_lm", "stage1", "stage2_phase1",
                                   "stage2", "eval"}
    assert saved["eval_seed"] != saved["seed"]
    results = json.loads((model / "eval_results.json").read_text())
    assert results["eval_seed"] == saved["eval_seed"] and results["real"]["accuracy"] == saved["metrics"]["real"][
        "accuracy"]
    assert "## Pictures drawn another way" in card and "Count accuracy % (questions) by the true count: " in card
    assert results["out_of_style"]["count_detail"] == saved["metrics"]["out_of_style"]["count_detail"]
    assert saved["metrics"]["real"]["n"] == 140 and saved["metrics"]["blank"]["blank_images"]
    # stages 1-2 train on a superset of the n scenes: the same scenes and chats, then more
    assert "--data $OUT/train_data/instruct.json" in saved["commands"][1]
    # stage 2's low-lr tail goes on from the first phase's last step and ends in OUT/stage2
    tail = saved["commands"][2]
    assert "--model $OUT/stage2_phase1" in tail and "--out $OUT/stage2 " in tail and "--learning-rate 0.0006" in tail
    assert json.loads((model / "trainer_state.json").read_text())["config"]["model"] == str(out / "stage2_phase1")
    assert "then 1 more from its last step at lr 0.0006" in card
    own, more = (json.loads((out / d / "instruct.json").read_text()) for d in ("data", "train_data"))
    assert len([r for r in more if "image" in r]) == 300 and more[:240] == own[:240]
    assert "stages 1 and 2\ntrain on the captions and chats of the first 300" in card
    lm_answers = saved["stages"]["stage0_lm"]["text_answers_heldout"]
    assert set(lm_answers) == set(CATEGORIES) and all(0 <= a <= 100 for a in lm_answers.values())
    assert read_check(out / "stage0" / "lm" / "metrics.jsonl", "text_answers") == lm_answers
    assert "The LM alone,\n  answering the held-out questions" in card
    # the small size asks half its text-only questions as lettered multiple choice, in every data set
    for folder in ("data", "train_data"):
        assert json.loads((out / folder / "meta.json").read_text())["text_mc"] == 0.5
    assert any(r["conversations"][0]["value"].endswith("from the given choices directly.") for r in more
               if "image" not in r)
    assert "(50% of their questions as lettered multiple choice)" in card


@pytest.mark.slow
def test_lm_text_check_scores_batched_as_one_by_one(small_run):
    """Left padding in the batched check must not change any answer."""
    out, summary = small_run
    lm = AutoModelForCausalLM.from_pretrained(out / "stage0" / "lm")
    tokenizer = load_tokenizer(str(out / "stage0" / "tokenizer"))
    one_by_one = text_answer_accuracy(lm, tokenizer, str(out / "eval"), batch_size=1)
    assert one_by_one == text_answer_accuracy(lm, tokenizer, str(out / "eval"), batch_size=64)
    assert one_by_one == summary["stages"]["stage0_lm"]["text_answers_heldout"]


@pytest.mark.slow
def test_restarted_recipe_reuses_stage0_and_reports_its_times(small_run, tmp_path):
    from llava.recipe import run_recipe

    out, first = small_run
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("stage1", "stage2*"))
    summary = run_recipe(str(copy), seed=0, size="small", threads=1, reuse=True, echo=lambda _: None)
    assert summary["reused_stages"] == ["data", "stage0_lm", "stage0_tokenizer", "stage0_vision", "train_data"]
    for stage in summary["reused_stages"]:
        assert summary["times"][stage] == first["times"][stage]
    lm_check = summary["stages"]["stage0_lm"]
    assert lm_check["reused"] and lm_check["text_answers_heldout"] == first["stages"]["stage0_lm"][
        "text_answers_heldout"]
    assert summary["total_seconds"] == round(sum(summary["times"].values()), 1) > summary["this_run_seconds"]
    card = (copy / "stage2" / "README.md").read_text()
    assert "were reused from an earlier run" in card
    # killed before its summary: the stage-0 models' own records still give their times
    (copy / "recipe_summary.json").unlink()
    again = run_recipe(str(copy), seed=0, size="small", threads=1, reuse=True, echo=lambda _: None)
    for stage in ("stage0_vision", "stage0_lm"):
        assert stage in again["reused_stages"]
        assert 0 < again["times"][stage] == pytest.approx(first["times"][stage], abs=1.0)


@pytest.mark.slow
def test_restarted_recipe_keeps_finished_training_stages_of_the_same_config(small_run, tmp_path):
    """A killed run restarts at the stage it lost; a stage whose config (or stage-0 spec) changed
    trains again, and so does every stage after it."""
    from llava.recipe import SIZES, run_recipe

    out, first = small_run
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("stage2"))  # killed during the tail
    summary = run_recipe(str(copy), seed=0, size="small", threads=1, reuse=True, echo=lambda _: None)
    assert {"stage1", "stage2_phase1"} <= set(summary["reused_stages"]) and "stage2" not in summary["reused_stages"]
    for stage in ("stage1", "stage2_phase1"):
        # a kept training stage reports the time its trainer took (its trainer_state.json's)
        assert summary["stages"][stage]["reused"]
        assert summary["times"][stage] == round(first["stages"][stage]["seconds"], 1) <= first["times"][stage]
        assert summary["stages"][stage]["final_loss"] == first["stages"][stage]["final_loss"]
    assert (copy / "stage2" / "model.safetensors").is_file() and not summary["stages"]["stage2"].get("reused")

    changed = dataclasses.replace(SIZES["small"], s2_lr=1e-3)
    again = run_recipe(str(copy), seed=0, size=changed, threads=1, reuse=True, echo=lambda _: None)
    assert "stage1" in again["reused_stages"]
    assert not {"stage2_phase1", "stage2"} & set(again["reused_stages"])
    state = json.loads((copy / "stage2_phase1" / "trainer_state.json").read_text())
    assert state["config"]["learning_rate"] == 1e-3

    # a stage-0 change (the tower's ranking loss) re-trains the tower and everything that reads it
    tower_changed = dataclasses.replace(changed, order_weight=0.0)
    third = run_recipe(str(copy), seed=0, size=tower_changed, threads=1, reuse=True, echo=lambda _: None)
    assert {"stage0_tokenizer", "stage0_lm"} <= set(third["reused_stages"])
    assert not {"stage0_vision", "stage1", "stage2_phase1", "stage2"} & set(third["reused_stages"])
    assert "order_accuracy" not in third["stages"]["stage0_vision"]["grounding_heldout"]
    assert "order_accuracy" in first["stages"]["stage0_vision"]["grounding_heldout"]


@pytest.mark.slow
def test_a_last_phase_in_a_second_world_trains_on_both_worlds_chats(small_run, tmp_path):
    """`s2_mix_*`: a third phase of stage 2 after the tail, on the varied world's own scenes (in a
    folder of train_data, one image folder for both) beside the first image chats of the main
    world, padded as varied pictures are, the tower learning too; the card says so; added to a
    finished run, only the tail (now phase 2) and the new phase train."""
    from llava.recipe import SIZES, run_recipe
    from llava.train.data import load_records, validate_record

    out, _ = small_run
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy)
    spec = dataclasses.replace(SIZES["small"], s2_mix_scenes=12, s2_mix_main_chats=10, s2_mix_epochs=1,
                               s2_mix_max_steps=5, s2_mix_tower_lr=1e-4)
    summary = run_recipe(str(copy), seed=0, size=spec, threads=1, reuse=True, echo=lambda _: None)
    assert {"stage1", "stage2_phase1"} <= set(summary["reused_stages"])
    assert not {"stage2_phase2", "stage2"} & set(summary["reused_stages"])
    assert list(summary["stages"])[-3:] == ["stage2_phase1", "stage2_phase2", "stage2"]
    train_data = copy / "train_data"
    rows = load_records(train_data / "mix_instruct.json")
    varied = [r for r in rows if r.get("image", "").startswith("mix_varied/")]
    classic = [r for r in rows if "image" in r and r not in varied]
    assert len(varied) == 12 and len(classic) == 10
    assert len(rows) - 22 == round(12 * spec.text_chats)  # the varied world's own text chats
    assert all(validate_record(r, image_folder=str(train_data)) == [] for r in rows)
    main = [r for r in load_records(train_data / "instruct.json") if "image" in r]
    assert classic == main[:10]
    tail = json.loads((copy / "stage2_phase2" / "trainer_state.json").read_text())["config"]
    last = json.loads((copy / "stage2" / "trainer_state.json").read_text())["config"]
    assert tail["data"] == str(train_data / "instruct.json") and tail["learning_rate"] == spec.s2_tail_lr
    assert last["data"] == str(train_data / "mix_instruct.json") and last["image_aspect_ratio"] is None  # the checkpoint's own
    assert last["model"] == str(copy / "stage2_phase2") and last["unfreeze_vision_tower"]
    assert summary["mix_data_sha"]["instruct.json"]
    card = (copy / "stage2" / "README.md").read_text()
    assert "on the chats of 12 scenes of the varied world beside the first 10 image chats above" in card
    assert "mix_instruct.json" in card  # the last phase's train command


@pytest.mark.slow
def test_the_last_phase_takes_the_tower_that_went_on_at_a_higher_resolution(small_run, tmp_path):
    """`vision_hires_*`: stage 0's dual encoder goes on at a higher side (its own folder, the next seed), and
    the mixed phase swaps that tower in at its size; the stages before the tail (which becomes phase 2 here),
    and the first tower, are kept."""
    from llava.checkpoint import load_checkpoint
    from llava.recipe import SIZES, run_recipe
    from llava.recipe.stages import same_stage0_spec

    out, _ = small_run
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy)
    side = SIZES["small"].vision.image_size + 32
    spec = dataclasses.replace(SIZES["small"], s2_mix_scenes=12, s2_mix_main_chats=10, s2_mix_epochs=1,
                               s2_mix_max_steps=2, s2_mix_tower_lr=1e-4, vision_hires_size=side,
                               vision_hires_steps=2)
    summary = run_recipe(str(copy), seed=0, size=spec, threads=1, reuse=True, echo=lambda _: None)
    assert {"stage0_vision", "stage1", "stage2_phase1"} <= set(summary["reused_stages"])
    assert not {"stage0_vision_hires", "stage2_phase2", "stage2"} & set(summary["reused_stages"])
    assert summary["stages"]["stage0_vision_hires"]["steps"] == 2
    last = json.loads((copy / "stage2" / "trainer_state.json").read_text())["config"]
    assert last["vision_tower"] == str(copy / "stage0" / "vision_hires") and last["image_size"] is None
    model = load_checkpoint(copy / "stage2")
    assert model.model.config.vision_config.image_size == side and model.image_processor.crop_size == side
    longer = dataclasses.replace(spec, vision_hires_steps=3)
    assert not same_stage0_spec("stage0_vision_hires", summary["spec"], longer)
    assert same_stage0_spec("stage0_vision", summary["spec"], longer)


@pytest.mark.slow
def test_the_tower_pretrains_on_the_second_world_s_scenes_too(small_run, tmp_path):
    """`vision_mix_scenes`: stage 0's tower reads that many scenes of the mixed phase's world beside
    its own (their images in a folder inside its scenes folder); a restart with it retrains the tower
    and what depends on it, but keeps the tokenizer and the LM, whose data did not change."""
    from llava.recipe import SIZES, run_recipe
    from llava.train.data import load_records, validate_record

    out, _ = small_run
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy)
    spec = dataclasses.replace(SIZES["small"], vision_mix_scenes=12)
    summary = run_recipe(str(copy), seed=0, size=spec, threads=1, reuse=True, echo=lambda _: None)
    assert {"stage0_tokenizer", "stage0_lm"} <= set(summary["reused_stages"])
    assert not {"stage0_vision", "stage1"} & set(summary["reused_stages"])
    scenes = copy / "stage0" / "scenes"
    rows = load_records(scenes / "vision_pretrain.json")
    own = load_records(scenes / "pretrain.json")
    assert rows[:len(own)] == own and len(rows) == len(own) + 12
    assert all(r["image"].startswith("mix_varied/") for r in rows[len(own):])
    assert all(validate_record(r, image_folder=str(scenes)) == [] for r in rows)
    assert summary["stages"]["stage0_vision"]["pairs"] == len(rows)
    card = (copy / "stage2" / "README.md").read_text()
    assert f"captions of {len(own)} scenes and 12 of the varied world's scenes" in card


def test_the_card_s_data_section_keeps_its_own_world_sentence_beside_a_second_world():
    """The tower's second world once overwrote the data section's "simpler world" sentence with its name."""
    from llava.recipe.card import card_text

    shipped = os.path.join(os.path.dirname(__file__), "..", "llava", "assets", "tiny-llava")
    with open(os.path.join(shipped, "recipe_summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    summary["spec"].update(max_objects=2, vision_mix_scenes=12, vision_mix_world="varied")
    card = card_text(summary, shipped)
    assert "`eval_results.json`). A simpler world: at most 2 objects a scene (the full world has 5)." in card
    assert "and 12 of the varied world's scenes" in card


@pytest.mark.slow
def test_killed_recipe_resumes_its_stage_from_the_last_checkpoint(small_run, tmp_path):
    """A real `llava recipe` process killed in stage 2 restarts (--reuse) from that stage's last
    checkpoint and ends with the weights of the uninterrupted run; no checkpoint stays behind."""
    from safetensors.torch import load_file

    from llava.recipe import run_recipe
    from llava.train.checkpointing import complete_checkpoints

    out, first = small_run
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("stage2*"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llava.recipe", "tiny", "--size", "small", "--out", str(copy),
                             "--reuse", "--threads", "1", "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not complete_checkpoints(str(copy / "stage2_phase1")):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (copy / "stage2_phase1" / "trainer_state.json").exists()
    step = complete_checkpoints(str(copy / "stage2_phase1"))[-1][0]

    summary = run_recipe(str(copy), seed=0, size="small", threads=1, reuse=True, echo=lambda _: None)
    assert "stage1" in summary["reused_stages"] and "stage2_phase1" not in summary["reused_stages"]
    assert summary["stages"]["stage2_phase1"]["resumed_from"] == f"checkpoint-{step}"
    assert not summary["stages"]["stage2"].get("reused")
    for stage in ("stage2_phase1", "stage2"):
        assert not complete_checkpoints(str(copy / stage)) and not list((copy / stage).glob("checkpoint-*"))
        ours, theirs = (load_file(str(root / stage / "model.safetensors")) for root in (copy, out))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), stage  # bit-identical on CPU fp32


@pytest.mark.slow
def test_reduced_recipe_learns_in_every_stage_and_answers_from_the_image(tmp_path):
    """Data, stage 0, 1 and 2, eval at a reduced size: every stage's loss falls, and the model answers
    colour questions (52.5% measured on AVX-512, 57.5% on AVX2; chance 15%) and reads the printed word (100%, chance 10%) well
    above chance, falling to chance with blank images, so what it answers comes from the image."""
    from llava.recipe.tiny import run_recipe

    out = tmp_path / "tiny"
    summary = run_recipe(str(out), seed=0, size="reduced", threads=1, echo=lambda _: None)
    for stage in ("stage0/vision", "stage0/lm", "stage1", "stage2_phase1", "stage2"):
        losses = read_losses(out / stage / "metrics.jsonl")
        q = len(losses) // 4  # batch-8 steps are noisy: the first quarter's mean against the last's
        assert q >= 5 and sum(losses[-q:]) < sum(losses[:q]), (stage, losses)
    real, blank = summary["metrics"]["real"], summary["metrics"]["blank"]
    assert real["n"] == 280 and json.loads((out / "eval" / "meta.json").read_text())["vocab"]["max_objects"] == 2
    for category, margin in (("color", 20), ("word", 50)):
        assert real["accuracy"][category] >= real["chance"][category] + margin, (category, real["accuracy"])
        assert blank["accuracy"][category] <= blank["chance"][category] + 10, (category, blank["accuracy"])
    card = (out / "stage2" / "README.md").read_text()
    assert "llava recipe tiny --size reduced --seed 0" in card and "at most 2 objects a scene" in card


def test_stage_1_trains_in_fp32_and_only_the_later_phases_sort_by_length(tmp_path):
    """bf16 autocast and length-sorted batches are stage 2's: stage 1 under bf16 cost the full recipe
    left/right for good, and its first phase is only measured unsorted."""
    from llava.recipe import SIZES
    from llava.recipe.tiny import _RecipeRun

    spec = dataclasses.replace(SIZES["full"], bf16=True)
    run = _RecipeRun(str(tmp_path), 0, spec, 1, lambda _: None, False, "cpu")
    runs = dict(run.training_runs(str(tmp_path / "train_data"), str(tmp_path / "train_data" / "mix.json")))
    assert list(runs) == ["stage1", "stage2_phase1", "stage2_phase2", "stage2"]
    assert runs["stage1"]["bf16"] is False
    assert all(runs[name]["bf16"] is True for name in ("stage2_phase1", "stage2_phase2", "stage2"))
    assert runs["stage2_phase1"]["length_window"] == 1
    assert runs["stage2_phase2"]["length_window"] == runs["stage2"]["length_window"] == spec.s2_length_window == 16


def test_stage_2_may_be_its_mixed_phase_alone(tmp_path):
    """`direct-128` (s2_epochs=0): stage 2 is the mixed phase alone, straight on from stage 1 at its own lr,
    with the tower learning at 128 px (it learnt neither left/right nor the printed word: sizes.py)."""
    from llava.recipe import SIZES
    from llava.recipe.tiny import _RecipeRun

    spec = SIZES["direct-128"]
    run = _RecipeRun(str(tmp_path), 0, spec, 1, lambda _: None, False, "cpu")
    mix = str(tmp_path / "train_data" / "mix.json")
    runs = dict(run.training_runs(str(tmp_path / "train_data"), mix))
    assert list(runs) == ["stage1", "stage2"]
    stage2 = runs["stage2"]
    assert stage2["model"] == runs["stage1"]["out"] and stage2["data"] == mix
    assert (stage2["epochs"], stage2["lr"], stage2["vision_tower_lr"]) == (spec.s2_mix_epochs, 1e-3, 1e-4)
    assert stage2["image_size"] == 128 and stage2["unfreeze_vision_tower"] and stage2["template"] == "vicuna_v1"


def test_recipe_trains_in_bf16_only_where_it_is_native():
    """bf16 autocast by default only where oneDNN has bf16 instructions (elsewhere it is emulated, slower)."""
    from llava.model.onednn import native_bf16
    from llava.recipe.sizes import SIZES
    from llava.recipe.stages import use_bf16

    assert use_bf16(None, "cpu") == native_bf16()
    assert use_bf16(True, "cpu") and not use_bf16(False, "cpu")
    assert SIZES["reduced"].bf16 is False and SIZES["full"].bf16 is None
