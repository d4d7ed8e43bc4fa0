"""LlavaModel against transformers' Llava on identical tiny random weights."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from llava.checkpoint.hf import save_hf
from llava.config import LlavaConfig, preset, validate_projector_type
from llava.model.llava import ImageTokenMismatch, LlavaModel
from llava.model.projector import build_projector
from llava.tiny import tiny_model

LM_VARIANTS = {
    "llama": {},
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", use_sliding_window=False),
}


def _with_lm(model_type_overrides: dict) -> LlavaModel:
    base, tok = tiny_model("tiny")
    text = base.config.text_config.to_dict()
    text.update(model_type_overrides)
    for k in ("architectures", "transformers_version"):
        text.pop(k, None)
    torch.manual_seed(1)
    return LlavaModel(base.config.replace(text_config=text)).eval()


def _prompt(model: LlavaModel, n_images: int = 1) -> torch.Tensor:
    n = model.image_token_count((28, 28))
    ids = [1, 40, 41]
    for _ in range(n_images):
        ids += [model.config.image_token_index] * n + [42, 43]
    return torch.tensor([ids])


def _hf_twin(model: LlavaModel, tmp_path) -> LlavaForConditionalGeneration:
    save_hf(model.state_dict(), model.config, tmp_path)
    return LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("lm", sorted(LM_VARIANTS))
def test_logits_match_transformers_llava(lm, tmp_path):
    model = _with_lm(LM_VARIANTS[lm])
    hf = _hf_twin(model, tmp_path)
    ids = _prompt(model, n_images=2)
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ours = model(ids, pixel_values=[px[:1], px[1:]]).logits
        theirs = hf(input_ids=ids, pixel_values=px).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_cls_patch_and_last_layer_match_transformers(tmp_path):
    base, _ = tiny_model("tiny")
    torch.manual_seed(2)
    model = LlavaModel(base.config.replace(vision_feature_select="cls_patch", vision_feature_layer=-1)).eval()
    assert model.image_token_count((28, 28)) == 5  # 2x2 patches + CLS
    hf = _hf_twin(model, tmp_path)
    ids, px = _prompt(model), torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        diff = (model(ids, pixel_values=[px]).logits - hf(input_ids=ids, pixel_values=px).logits).abs().max()
    assert diff.item() <= 1e-5


def test_text_only_forward_needs_no_images():
    model, _ = tiny_model("tiny")
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 6, 7]]))
    assert out.logits.shape == (1, 4, model.config.text_config.vocab_size)


def test_placeholder_count_mismatch_is_a_clear_error():
    model, _ = tiny_model("tiny")
    ids = _prompt(model)[:, :-3]  # one placeholder row short
    with pytest.raises(ImageTokenMismatch, match=r"3 image placeholder tokens but the images give 4"):
        model(ids, pixel_values=[torch.randn(1, 3, 28, 28)])


def test_frozen_tower_gets_no_graph_but_projector_does():
    model, _ = tiny_model("tiny")
    model.vision_tower.requires_grad_(False)
    feats = model.encode_images([torch.randn(1, 3, 28, 28)], [(28, 28)])
    assert feats[0].requires_grad  # through the projector
    loss = model(_prompt(model), image_features=feats).logits.sum()
    loss.backward()
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())


@pytest.mark.parametrize("name,depth", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projectors(name, depth):
    proj = build_projector(name, 8, 16)
    linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth
    assert proj(torch.randn(2, 8)).shape == (2, 16)
    assert isinstance(build_projector("identity", 8, 8), torch.nn.Identity)


@pytest.mark.parametrize("bad", ["mlp", "conv", "mlp2x_relu"])
def test_unknown_projector_lists_valid_ones(bad):
    with pytest.raises(ValueError, match="valid: linear, identity, mlp<N>x_gelu"):
        validate_projector_type(bad)


def test_bad_config_choices_are_named():
    with pytest.raises(ValueError, match="unknown image aspect ratio 'wide'; valid: pad, square, anyres"):
        preset("tiny").replace(image_aspect_ratio="wide")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")


def test_siglip_tower_works():
    base, _ = tiny_model("tiny")
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=28, patch_size=14)
    model = LlavaModel(base.config.replace(vision_config=vision)).eval()
    assert model.image_token_count((28, 28)) == 4  # SigLIP has no CLS to drop
    with torch.no_grad():
        out = model(_prompt(model), pixel_values=[torch.randn(1, 3, 28, 28)])
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("kind", ["clip_vision_model", "siglip_vision_model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_tower_forward_equals_the_towers_own_hidden_states(kind, dtype):
    """Every layer index LLaVA may read, both tower families, both dtypes; it runs only without grad."""
    from transformers import AutoConfig, AutoModel

    from llava.model.vision import lean_forward_fits, lean_hidden_state, select_features

    torch.manual_seed(3)
    config = AutoConfig.for_model(kind, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, image_size=48, patch_size=16)
    tower = AutoModel.from_config(config).to(dtype).eval()
    pixels = torch.randn(2, 3, 48, 48, dtype=dtype)
    assert not lean_forward_fits(tower)  # grad on: transformers' forward, for training
    with torch.no_grad():
        assert lean_forward_fits(tower)
        reference = tower(pixels, output_hidden_states=True).hidden_states
        for layer in range(-4, 4):
            torch.testing.assert_close(lean_hidden_state(tower, pixels, layer), reference[layer])
        torch.testing.assert_close(select_features(tower, pixels, -2, "patch"),
                                   reference[-2][:, 1:] if kind == "clip_vision_model" else reference[-2])
        with pytest.raises(IndexError):
            lean_hidden_state(tower, pixels, 4)
        mlp = getattr(tower, "vision_model", tower).encoder.layers[1].mlp
        mlp.fc1 = torch.nn.Sequential(mlp.fc1)  # a wrapped linear, e.g. LoRA's
        assert not lean_forward_fits(tower)
        torch.testing.assert_close(select_features(tower, pixels, -2, "full"), reference[-2])


def test_config_round_trips_through_dict():
    config = preset("tiny-anyres")
    again = LlavaConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
