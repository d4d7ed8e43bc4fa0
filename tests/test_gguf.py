"""`llava convert --to gguf`: the language-model and mmproj files llama.cpp reads, read back with
gguf-py's own GGUFReader (llama.cpp itself is not installed): metadata, tokenizer arrays, every
tensor's name, shape, type and value for each quantization, the q/k permutation against
llama.cpp's rotary convention, and both halves recomputed from the GGUF tensors alone."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_tokenizers import train_sentencepiece

from llava.checkpoint import convert, load_checkpoint, save_checkpoint
from llava.checkpoint.build import image_processor_for
from llava.checkpoint.gguf_export import check_exportable, permute_qk
from llava.checkpoint.tokenizer import load_tokenizer
from llava.cli import main
from llava.config import preset
from llava.errors import InputError, OutputPathError
from llava.model.llava import LlavaModel
from llava.processing.templates import get_template
from llava.tiny import tiny_model, tiny_tokenizer

QUANTS = ["f32", "f16", "bf16", "q8_0", "q4_0"]
T = gguf.GGMLQuantizationType
TT = gguf.TokenType


# Helpers -------------------------------------------------------------------------------------------
class Gguf:
    """One file read back: metadata values by key, tensors by name (numpy shape = reversed ggml ne)."""

    def __init__(self, path: str | os.PathLike) -> None:
        reader = gguf.GGUFReader(path)
        self.fields = {k: f.contents() for k, f in reader.fields.items()}
        self.tensors = {t.name: t for t in reader.tensors}

    def __getitem__(self, key: str):
        return self.fields[key]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def type(self, name: str) -> gguf.GGMLQuantizationType:
        return self.tensors[name].tensor_type

    def value(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(self.shape(name))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _files(folder: Path) -> tuple[Gguf, Gguf]:
    lm = next(p for p in folder.iterdir() if not p.name.startswith("mmproj-"))
    return Gguf(lm), Gguf(next(folder.glob("mmproj-*.gguf")))


def _lm_names(model: LlavaModel) -> dict[str, str]:
    """Our language-model key -> the GGUF name, spelled out for the tiny 2-layer Llama."""
    out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(model.config.text_config.num_hidden_layers):
        out.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in parts.items()})
    return out


def _block_bound(ours: torch.Tensor, quant: str) -> torch.Tensor:
    """The largest error the format allows per 32-value block: half a step for q8_0 (amax/127), one
    step for q4_0 (amax/8: its top code is 7, not 8), plus the f16 rounding of the block scale."""
    blocks = ours.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    step = amax / (127 if quant == "q8_0" else 8)
    return ((0.5 if quant == "q8_0" else 1.0) * step + step * 128 * 2**-11 + 1e-7).expand_as(blocks).reshape(ours.shape)


# Fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model (byte-level BPE tokenizer) in the llava-hf layout, exported in every quantization."""
    root = tmp_path_factory.mktemp("gguf")
    model, tok = tiny_model("tiny", seed=3)
    save_checkpoint(model, tok, image_processor_for(model.config), root / "tiny-llava", layout="hf")
    src = load_checkpoint(root / "tiny-llava")
    for quant in QUANTS:
        convert(root / "tiny-llava", root / quant, to="gguf", quant=quant)
    return root, src


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """A SentencePiece (Llama-style) model in the original layout, as the released v1.5 checkpoints."""
    root = tmp_path_factory.mktemp("gguf-sp")
    sp = train_sentencepiece(root / "sp")
    model, tok = tiny_model("tiny", seed=6, tokenizer=load_tokenizer(sp))
    model.config.image_token_index, model.config.template = -200, None
    save_checkpoint(model, tok, image_processor_for(model.config), root / "llava-v1.5-tiny", layout="original")
    ckpt = convert(root / "llava-v1.5-tiny", root / "out", to="gguf", quant="q8_0")
    return root, ckpt, sp


# Language model ------------------------------------------------------------------------------------
def test_files_and_language_model_metadata(tiny):
    root, src = tiny
    assert sorted(os.listdir(root / "q4_0")) == ["mmproj-tiny-llava-f16.gguf", "tiny-llava-q4_0.gguf"]
    assert sorted(os.listdir(root / "f32")) == ["mmproj-tiny-llava-f32.gguf", "tiny-llava-f32.gguf"]
    text = src.model.config.text_config
    for quant, file_type in zip(QUANTS, (0, 1, 32, 7, 2)):
        lm, mm = _files(root / quant)
        assert (lm["general.architecture"], lm["general.type"], lm["general.name"]) == ("llama", "model", "tiny-llava")
        assert lm["general.file_type"] == file_type and mm["general.file_type"] == (0 if quant == "f32" else 1)
    lm, _ = _files(root / "f16")
    expected = {"context_length": 512, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
                "attention.key_length": 16, "vocab_size": 512}
    assert {k: lm[f"llama.{k}"] for k in expected} == expected
    assert lm["llama.rope.freq_base"] == text.rope_parameters["rope_theta"]
    assert lm["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(text.rms_norm_eps)


def test_bpe_tokenizer_arrays(tiny):
    root, src = tiny
    tok, lm = src.tokenizer, _files(root / "f16")[0]
    assert (lm["tokenizer.ggml.model"], lm["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert lm["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))
    special = {0, 1, 2, 3, tok.convert_tokens_to_ids("<image>")}
    assert lm["tokenizer.ggml.token_type"] == [TT.CONTROL if i in special else TT.NORMAL for i in range(len(tok))]
    spec = json.loads((root / "tiny-llava" / "tokenizer.json").read_text())
    assert lm["tokenizer.ggml.merges"] == [" ".join(pair) for pair in spec["model"]["merges"]]
    ids = {k: lm[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unknown": tok.unk_token_id,
                   "padding": tok.pad_token_id}
    assert lm["tokenizer.ggml.add_bos_token"] is True and tok("a").input_ids[0] == tok.bos_token_id
    assert lm["tokenizer.chat_template"] == get_template("vicuna_v1").chat_template()


def test_sentencepiece_tokenizer_arrays(spm):
    import sentencepiece

    root, ckpt, sp_folder = spm
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    lm = _files(root / "out")[0]
    assert (lm["tokenizer.ggml.model"], lm["tokenizer.ggml.pre"]) == ("llama", "default")
    tok = ckpt.tokenizer
    assert lm["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert lm["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert lm["tokenizer.ggml.scores"][3:] == pytest.approx([sp.get_score(i) for i in range(3, sp.get_piece_size())])
    expected = [TT.CONTROL if i < 3 else TT.BYTE if sp.is_byte(i) else TT.NORMAL for i in range(sp.get_piece_size())]
    assert lm["tokenizer.ggml.token_type"] == expected  # <unk> <s> </s>: CONTROL, as convert_hf_to_gguf types them
    assert [lm[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown")] == [1, 2, 0]
    assert lm["tokenizer.ggml.add_bos_token"] is True and lm["tokenizer.ggml.add_space_prefix"] is True
    assert lm["tokenizer.chat_template"] == get_template("llava_v1").chat_template()  # chosen from the name
    assert lm.type("blk.0.attn_q.weight") == T.Q8_0 and lm["llama.vocab_size"] == 400


def test_sentencepiece_without_tokenizer_model_is_refused(spm, tmp_path):
    root, _, _ = spm
    shutil.copytree(root / "llava-v1.5-tiny", tmp_path / "src")
    (tmp_path / "src" / "tokenizer.model").unlink()  # tokenizer.json alone has no piece scores
    with pytest.raises(InputError, match="no tokenizer.model beside it; llama.cpp tokenizes by the piece scores"):
        convert(tmp_path / "src", tmp_path / "out", to="gguf")
    assert not (tmp_path / "out").exists()


def test_vocabulary_padded_to_the_embedding_rows(tmp_path):
    model, tok = tiny_model("tiny", seed=1, vocab_size=520)
    save_checkpoint(model, tok, image_processor_for(model.config), tmp_path / "padded", layout="hf")
    convert(tmp_path / "padded", tmp_path / "out", to="gguf", quant="f32")
    lm = _files(tmp_path / "out")[0]
    assert len(lm["tokenizer.ggml.tokens"]) == lm["llama.vocab_size"] == 520 == lm.shape("token_embd.weight")[0]
    assert lm["tokenizer.ggml.tokens"][512:] == [f"[PAD{i}]" for i in range(512, 520)]
    assert set(lm["tokenizer.ggml.token_type"][512:]) == {TT.UNUSED}


@pytest.mark.parametrize("quant", QUANTS)
def test_every_language_model_tensor_round_trips(tiny, quant):
    root, src = tiny
    lm = _files(root / quant)[0]
    text = src.model.config.text_config
    names = _lm_names(src.model)
    state = src.model.language_model.state_dict()
    assert set(lm.tensors) == set(names.values())
    for key, name in names.items():
        ours = state[key].float()
        assert lm.shape(name) == tuple(ours.shape), name
        got = lm.value(name)
        if "attn_q" in name or "attn_k" in name:
            got = _unpermute(got, text.num_attention_heads if "attn_q" in name else text.num_key_value_heads)
        if ours.dim() == 1 or quant == "f32":
            assert lm.type(name) == T.F32 and torch.equal(got, ours), name
        elif quant in ("f16", "bf16"):
            assert lm.type(name) == (T.F16 if quant == "f16" else T.BF16)
            assert torch.equal(got, ours.to(torch.float16 if quant == "f16" else torch.bfloat16).float()), name
        else:
            q4_output = quant == "q4_0" and name == "output.weight"
            assert lm.type(name) == (T.Q8_0 if q4_output else T[quant.upper()]), name
            assert ((got - ours).abs() <= _block_bound(ours, "q8_0" if q4_output else quant)).all(), name


def test_qk_permutation_gives_llama_cpp_rope_the_same_attention_scores(tiny):
    """llama.cpp's llama rope rotates interleaved pairs (2i, 2i+1); HF's rotates (i, i+d/2). With the
    permuted GGUF weights, llama.cpp-style rope must give the attention scores transformers computes."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    root, src = tiny
    lm, text = _files(root / "f32")[0], src.model.config.text_config
    attn = src.model.language_model.model.layers[0].self_attn
    n_head, n_kv, d = text.num_attention_heads, text.num_key_value_heads, 16
    x, pos = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(0)), torch.arange(7)[None]
    cos, sin = src.model.language_model.model.rotary_emb(x, pos)
    with torch.no_grad():
        q = attn.q_proj(x).view(1, 7, n_head, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, 7, n_kv, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    theirs = q @ k.repeat_interleave(n_head // n_kv, dim=1).transpose(-1, -2)

    def rope_interleaved(t: torch.Tensor) -> torch.Tensor:  # ggml_rope_ext, mode 0 (LLAMA_ROPE_TYPE_NORM)
        theta = pos[0, :, None].float() * lm["llama.rope.freq_base"] ** (-torch.arange(0, d, 2).float() / d)
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack((a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()), -1).flatten(-2)

    gq = rope_interleaved((x @ lm.value("blk.0.attn_q.weight").T).view(1, 7, n_head, d).transpose(1, 2))
    gk = rope_interleaved((x @ lm.value("blk.0.attn_k.weight").T).view(1, 7, n_kv, d).transpose(1, 2))
    ours = gq @ gk.repeat_interleave(n_head // n_kv, dim=1).transpose(-1, -2)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.equal(permute_qk(_unpermute(attn.k_proj.weight, n_kv), n_head, n_kv), attn.k_proj.weight)


def _rebuilt_logits_equal(lm: Gguf, model: LlavaModel) -> bool:
    """A transformers LM filled from the f32 GGUF (names reversed, q/k unpermuted) gives our logits."""
    text = model.config.text_config
    rebuilt = type(model.language_model)(text).eval()
    state = {}
    for key, name in _lm_names(model).items():
        value = lm.value(name)
        if "attn_q" in name or "attn_k" in name:
            value = _unpermute(value, text.num_attention_heads if "attn_q" in name else text.num_key_value_heads)
        state[key] = value
    rebuilt.load_state_dict(state)
    ids = torch.tensor([[1, 40, 41, 300, 7, 2]])
    with torch.no_grad():
        return torch.equal(rebuilt(ids).logits, model.language_model(ids).logits)


def test_language_model_rebuilt_from_the_gguf_gives_the_same_logits(tiny):
    root, src = tiny
    assert _rebuilt_logits_equal(_files(root / "f32")[0], src.model)


def test_llama_cpp_runs_the_export_with_our_greedy_tokens(tiny):
    """Where llama-cpp-python is installed (an optional benchmark dependency, not in CI: it builds
    from source), llama.cpp itself loads the f32 export and decodes our greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llava.generate import Engine, Request, SamplingParams

    root, src = tiny
    ids = [1, 40, 41, 300, 7, 2, 55, 90]
    ours = Engine(src.model, src.tokenizer, eos_token_ids=[]).generate(
        [Request(ids)], SamplingParams(max_new_tokens=16, temperature=0))[0].token_ids
    llm = llama_cpp.Llama(str(next((root / "f32").glob("tiny-llava-f32.gguf"))), n_ctx=64, verbose=False)
    try:
        theirs = []
        for token in llm.generate(ids, top_k=1, temp=0.0):
            theirs.append(token)
            if len(theirs) == len(ours):
                break
    finally:
        llm.close()
    assert theirs == ours


# mmproj ----------------------------------------------------------------------------------------------
def test_mmproj_metadata(tiny):
    root, src = tiny
    mm = _files(root / "f16")[1]
    vision = src.model.config.vision_config
    assert (mm["general.architecture"], mm["general.type"], mm["clip.projector_type"]) == ("clip", "mmproj", "mlp")
    assert mm["clip.has_vision_encoder"] and mm["clip.has_llava_projector"] and not mm["clip.has_text_encoder"]
    expected = {"image_size": 28, "patch_size": 14, "embedding_length": 32, "feed_forward_length": 64,
                "attention.head_count": 4, "projection_dim": 64, "block_count": 1, "feature_layer": [1],
                "mm_patch_merge_type": "flat"}
    assert {k: mm[f"clip.vision.{k}"] for k in expected} == expected  # 2 blocks, features of layer -2: 1 kept
    assert mm["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(vision.layer_norm_eps)
    assert mm["clip.vision.image_mean"] == pytest.approx(src.image_processor.mean)
    assert mm["clip.vision.image_std"] == pytest.approx(src.image_processor.std)
    assert mm["clip.use_gelu"] is False and vision.hidden_act == "quick_gelu"
    assert "clip.vision.image_grid_pinpoints" not in mm.fields


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_mmproj_tensors(tiny, quant):
    root, src = tiny
    mm = _files(root / quant)[1]
    state = src.model.state_dict()
    tower = "vision_tower." + ("vision_model." if any(".vision_model." in k for k in state) else "")
    names = {"embeddings.class_embedding": "v.class_embd", "embeddings.patch_embedding.weight": "v.patch_embd.weight",
             "embeddings.position_embedding.weight": "v.position_embd.weight",
             "pre_layrnorm.weight": "v.pre_ln.weight", "pre_layrnorm.bias": "v.pre_ln.bias"}
    names = {tower + k: v for k, v in names.items()}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up",
             "mlp.fc2": "ffn_down"}
    names.update({f"{tower}encoder.layers.0.{k}.{s}": f"v.blk.0.{v}.{s}" for k, v in parts.items()
                  for s in ("weight", "bias")})
    names.update({f"projector.{i}.{s}": f"mm.{i}.{s}" for i in (0, 2) for s in ("weight", "bias")})
    assert set(mm.tensors) == set(names.values())  # no v.blk.1 (past the feature layer), no v.post_ln
    for key, name in names.items():
        ours = state[key].float()
        assert mm.shape(name) == tuple(ours.shape), name
        f16 = quant == "f16" and ours.dim() > 1
        assert mm.type(name) == (T.F16 if f16 else T.F32), name
        assert torch.equal(mm.value(name), ours.half().float() if f16 else ours), name


def _llama_cpp_llava_graph(mm: Gguf, pixels: torch.Tensor) -> torch.Tensor:
    """clip.cpp's LLaVA graph (models/llava.cpp) over the mmproj's tensors and metadata only."""
    v = mm.value
    heads, eps = mm["clip.vision.attention.head_count"], mm["clip.vision.attention.layer_norm_epsilon"]
    x = F.conv2d(pixels[None], v("v.patch_embd.weight"), stride=mm["clip.vision.patch_size"]).flatten(2)[0].T
    x = torch.cat([v("v.class_embd")[None], x]) + v("v.position_embd.weight")
    x = F.layer_norm(x, x.shape[-1:], v("v.pre_ln.weight"), v("v.pre_ln.bias"), eps)
    act = F.gelu if mm["clip.use_gelu"] else (lambda t: t * torch.sigmoid(1.702 * t))
    n_run = max(mm["clip.vision.feature_layer"])  # explicit feature layer: exactly this many blocks
    for i in range(n_run):
        def p(part: str) -> tuple[torch.Tensor, torch.Tensor]:
            return v(f"v.blk.{i}.{part}.weight"), v(f"v.blk.{i}.{part}.bias")
        h = F.layer_norm(x, x.shape[-1:], *p("ln1"), eps)
        q, k, val = (F.linear(h, *p(n)).view(len(h), heads, -1).transpose(0, 1) for n in ("attn_q", "attn_k", "attn_v"))
        x = x + F.linear(F.scaled_dot_product_attention(q, k, val).transpose(0, 1).flatten(1), *p("attn_out"))
        x = x + F.linear(act(F.linear(F.layer_norm(x, x.shape[-1:], *p("ln2"), eps), *p("ffn_up"))), *p("ffn_down"))
    x = x[1:]  # the patch rows
    x = F.gelu(F.linear(x, v("mm.0.weight"), v("mm.0.bias")), approximate="tanh")  # ggml_gelu
    return F.linear(x, v("mm.2.weight"), v("mm.2.bias"))


def _features_close(mm: Gguf, model: LlavaModel, atol: float) -> bool:
    size = model.config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.encode_images([pixels], [(size, size)])[0]
        theirs = _llama_cpp_llava_graph(mm, pixels[0])
    assert ours.shape == theirs.shape == (model.config.patches_per_side ** 2, model.config.hidden_size)
    return torch.allclose(ours, theirs, atol=atol)


def test_mmproj_alone_reproduces_our_image_features(tiny):
    """Run the tower as llama.cpp would from the f32 mmproj: same features as our model (up to
    ggml_gelu's tanh approximation in the projector)."""
    root, src = tiny
    assert _features_close(_files(root / "f32")[1], src.model, atol=2e-3)


def test_shipped_model(tmp_path):
    """The trained model the package ships (6-layer Llama, head_dim 48; 4-block CLIP): both halves
    recomputed from the f32 files. A model trained on centre-cropped ('square') images is told that
    llama.cpp pads them; a padded one converts without a warning."""
    shipped = Path(__file__).resolve().parents[1] / "llava" / "assets" / "tiny-llava"
    square = load_checkpoint(shipped).model.config.image_aspect_ratio == "square"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = convert(shipped, tmp_path / "out", to="gguf", quant="f32")
    told = [w for w in caught if "llama.cpp pads them to a square" in str(w.message)]
    assert len(told) == square
    lm, mm = _files(tmp_path / "out")
    assert mm["clip.vision.block_count"] == 3 and mm["clip.vision.feature_layer"] == [3]
    assert _rebuilt_logits_equal(lm, ckpt.model)
    assert _features_close(mm, ckpt.model, atol=2e-3)


def test_anyres_mmproj_has_pinpoints_merge_type_and_image_newline(tmp_path):
    model, tok = tiny_model("tiny-anyres", seed=4)
    save_checkpoint(model, tok, image_processor_for(model.config), tmp_path / "next", layout="original")
    convert(tmp_path / "next", tmp_path / "out", to="gguf", quant="f32")
    mm = _files(tmp_path / "out")[1]
    assert mm["clip.vision.image_grid_pinpoints"] == [28, 56, 56, 28, 56, 56, 84, 28, 28, 84]  # (width, height)
    assert mm["clip.vision.mm_patch_merge_type"] == "spatial_unpad"
    assert torch.equal(mm.value("v.image_newline"), model.image_newline.detach())


# Qwen2 ------------------------------------------------------------------------------------------------
def test_qwen2_language_model(tmp_path):
    tok = tiny_tokenizer()
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = preset("tiny").replace(text_config=text, image_token_index=len(tok) - 1)
    torch.manual_seed(0)
    model = LlavaModel(config).eval()
    save_checkpoint(model, tok, image_processor_for(config), tmp_path / "qwen", layout="hf")
    convert(tmp_path / "qwen", tmp_path / "out", to="gguf", quant="f32")
    lm = _files(tmp_path / "out")[0]
    assert lm["general.architecture"] == "qwen2" and lm["qwen2.block_count"] == 2
    assert "output.weight" not in lm.tensors  # tied: llama.cpp reuses token_embd
    attn = model.language_model.model.layers[1].self_attn
    assert torch.equal(lm.value("blk.1.attn_q.weight"), attn.q_proj.weight)  # no permutation (neox rope)
    assert torch.equal(lm.value("blk.1.attn_k.bias"), attn.k_proj.bias)


def test_mistral_converts_as_llama_with_linear_rope_scaling(tmp_path):
    """LLaVA-1.6 Mistral is written as llama.cpp's `llama` architecture, q/k permuted, as llama.cpp does."""
    model, tok = tiny_model("tiny", seed=2)
    text = model.config.text_config.to_dict() | {"model_type": "mistral", "sliding_window": None,
                                                 "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                     "rope_theta": 1e6}}
    config = model.config.replace(text_config=text)
    torch.manual_seed(2)
    model = LlavaModel(config).eval()
    save_checkpoint(model, tok, image_processor_for(config), tmp_path / "mistral", layout="hf")
    convert(tmp_path / "mistral", tmp_path / "out", to="gguf", quant="f32")
    lm = _files(tmp_path / "out")[0]
    assert lm["general.architecture"] == "llama" and lm["llama.rope.freq_base"] == 1e6
    assert (lm["llama.rope.scaling.type"], lm["llama.rope.scaling.factor"]) == ("linear", 2.0)
    q = model.language_model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(_unpermute(lm.value("blk.0.attn_q.weight"), 4), q)


# Errors ------------------------------------------------------------------------------------------------
def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["convert", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def test_cli_writes_gguf_and_refuses_in_one_line(tiny, tmp_path, capsys):
    root, _ = tiny
    src = root / "tiny-llava"
    code, err = _cli(capsys, src, tmp_path / "out", "--to", "gguf", "--quant", "q5_k")
    assert code == 2 and err == "llava convert: error: unknown GGUF quantization 'q5_k'; valid: f32, f16, bf16, " \
                                "q8_0, q4_0"
    code, err = _cli(capsys, src, tmp_path / "hf", "--to", "hf", "--quant", "q8_0")
    assert code == 2 and "applies only to GGUF output" in err and "\n" not in err
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "gguf", "--quant", "q8_0"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote GGUF files to {tmp_path / 'out'}"
    code, err = _cli(capsys, src, tmp_path / "out", "--to", "gguf")
    assert code == 2 and err.endswith("out exists and is not empty; pass --overwrite (Python: overwrite=True) to "
                                      "replace it")
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "gguf", "--overwrite"]) == 0  # default f16
    assert sorted(os.listdir(tmp_path / "out")) == ["mmproj-tiny-llava-f16.gguf", "tiny-llava-f16.gguf"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_unsupported_language_model_family_in_one_line(tmp_path, capsys):
    tok = tiny_tokenizer()
    text = dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=1, head_dim=16,
                num_attention_heads=4, num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=512)
    config = preset("tiny").replace(text_config=text, image_token_index=len(tok) - 1)
    save_checkpoint(LlavaModel(config), tok, image_processor_for(config), tmp_path / "gemma", layout="hf")
    code, err = _cli(capsys, tmp_path / "gemma", tmp_path / "out", "--to", "gguf")
    assert code == 2 and err == ("llava convert: error: GGUF export supports llama, mistral and qwen2 language "
                                 "models (llama.cpp's llama and qwen2 architectures); this model's language model "
                                 "is 'gemma'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    (dict(projector_type="linear"), "the 'linear' projector"),
    (dict(vision_feature_select="cls_patch"), "llama.cpp always drops CLS"),
    (dict(image_aspect_ratio="anyres", mm_patch_merge_type="flat"), "image_aspect_ratio 'anyres' with "
     "mm_patch_merge_type 'flat'"),
    (dict(vision_feature_layer=-5), "vision_feature_layer -5 (outside the tower)"),
])
def test_what_llama_cpp_cannot_run_is_refused(change, message):
    with pytest.raises(InputError, match=r"cannot write a llama.cpp mmproj for .*" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        check_exportable(preset("tiny").replace(**change))


def test_unsupported_rope_scaling_is_refused():
    config = preset("tiny")
    text = config.text_config.to_dict() | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}
    with pytest.raises(InputError, match="default and linear rotary scaling; this model uses 'yarn'"):
        check_exportable(config.replace(text_config=text))


def test_overwrite_never_replaces_the_source_or_a_non_gguf_folder(tiny, tmp_path):
    root, _ = tiny
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    with pytest.raises(OutputPathError, match="not a checkpoint folder"):
        convert(root / "tiny-llava", tmp_path / "notes", to="gguf", overwrite=True)
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"
    src = tmp_path / "src"
    shutil.copytree(root / "tiny-llava", src)
    for inside in (src / "gguf", src / "f16"):
        shutil.copytree(root / "f16", src / "f16", dirs_exist_ok=True)  # an earlier export kept in the source
        with pytest.raises(OutputPathError, match="inside the source folder"):
            convert(src, inside, to="gguf", overwrite=True)
    assert sorted(os.listdir(src / "f16")) == sorted(os.listdir(root / "f16"))
