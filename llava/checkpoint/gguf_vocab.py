"""The tokenizer part of a GGUF language model, as llama.cpp's `convert_hf_to_gguf.py` writes it.

SentencePiece tokenizers (Vicuna, Llama-2, Mistral) become `tokenizer.ggml.model = "llama"` with
the piece scores and types read from `tokenizer.model`: llama.cpp's SPM tokenizer merges pieces by
those scores, so the file is refused rather than written without them. Byte-level BPE tokenizers
(GPT-2 style, Llama-3, Qwen2) become "gpt2" with their merges and a `tokenizer.ggml.pre` naming the
pre-tokenizer regex llama.cpp should split with; one it has no name for is refused, since a wrong
one tokenizes silently differently. Ids are the model's: the list is padded to the embedding rows
with unused `[PAD<id>]` tokens, and added tokens are CONTROL (special) or USER_DEFINED.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import gguf
from transformers import PreTrainedTokenizerBase

from llava.checkpoint.tokenizer import save_tokenizer
from llava.errors import CheckpointError, InputError

# tokenizer.json split regexes -> llama.cpp's pre-tokenizer names (llama-vocab.cpp LLAMA3 / QWEN2)
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_BPE_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
_SPACE = "\u2581"  # SentencePiece's word-boundary mark


def add_vocab(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, n_vocab: int,
              chat_template: str | None) -> None:
    """Write tokenizer.ggml.* and tokenizer.chat_template for `tokenizer`, padded to `n_vocab` ids.

    The tokenizer is saved to a scratch folder first so gguf-py's own readers (SentencePieceVocab,
    SpecialVocab) see the files convert_hf_to_gguf.py would.
    """
    if len(tokenizer) > n_vocab:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embedding "
                              "rows; llama.cpp needs one row per token")
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tokenizer, tmp)
        with open(os.path.join(tmp, "tokenizer.json"), encoding="utf-8") as f:
            spec = json.load(f)
        kind = _tokenizer_kind(spec, tmp)
        if kind == "llama":
            tokens, scores, types = _sentencepiece_base(Path(tmp), n_vocab)
        else:
            tokens, scores, types = _bpe_base(tokenizer, n_vocab)
        _overlay_added(tokenizer, kind, tokens, scores, types)
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre("default" if kind == "llama" else _bpe_pre(spec))
        writer.add_token_list(tokens)
        if kind == "llama":
            writer.add_token_scores(scores)
        writer.add_token_types(types)
        if kind == "llama":
            _add_normalizer_flags(writer, os.path.join(tmp, "tokenizer.model"))
        special = _special_vocab(tmp, kind == "gpt2", n_vocab)
        special.add_special_token.update(_adds_bos_eos(tokenizer))
        special.chat_template = chat_template or special.chat_template
        special.add_to_gguf(writer, quiet=True)


def _special_vocab(folder: str, merges: bool, n_vocab: int) -> gguf.SpecialVocab:
    """gguf-py's reader of special ids, add_bos/eos flags and BPE merges, kept off stderr: its notes
    on pair templates (which llama.cpp never uses) would print under `llava convert`."""
    quiet = logging.getLogger("gguf.vocab")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)
    finally:
        quiet.setLevel(level)


def _adds_bos_eos(tokenizer: PreTrainedTokenizerBase) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, from what the tokenizer does rather than from its files."""
    ids = tokenizer("a").input_ids
    return {"bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
            "eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]}


def _tokenizer_kind(spec: dict[str, Any], folder: str) -> str:
    """"gpt2" (byte-level BPE) or "llama" (SentencePiece), or why this tokenizer cannot be written."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "gpt2"
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        return "llama"
    if model.get("byte_fallback") or model.get("type") == "Unigram":
        raise InputError("this SentencePiece tokenizer has no tokenizer.model beside it; llama.cpp tokenizes by the "
                         "piece scores only that file holds: put the model's tokenizer.model into the source folder")
    raise InputError(f"GGUF export supports SentencePiece and byte-level BPE tokenizers; this one is a "
                     f"{model.get('type')!r} model with a {decoder.get('type')!r} decoder")


def _sentencepiece_base(folder: Path, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types from tokenizer.model (gguf-py's reader), then `[PAD<id>]` up to n_vocab."""
    tokens, scores, types = [], [], []
    for text, score, toktype in gguf.SentencePieceVocab(folder).sentencepiece_tokens():
        tokens.append(text.decode("utf-8"))
        scores.append(score)
        types.append(int(toktype))
    _pad(tokens, scores, types, n_vocab)
    return tokens, scores, types


def _bpe_base(tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """The byte-level token strings in id order (added tokens are typed by `_overlay_added`)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    n = max(by_id) + 1 if by_id else 0
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [int(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED) for i in range(n)]
    scores = [0.0] * n
    _pad(tokens, scores, types, n_vocab)
    return tokens, scores, types


def _pad(tokens: list[str], scores: list[float], types: list[int], n_vocab: int) -> None:
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))


def _overlay_added(tokenizer: PreTrainedTokenizerBase, kind: str, tokens: list[str], scores: list[float],
                   types: list[int]) -> None:
    """Added tokens as convert_hf_to_gguf types them: special -> CONTROL, else USER_DEFINED."""
    for tid, added in tokenizer.added_tokens_decoder.items():
        text = added.content
        if added.special:
            types[tid] = int(gguf.TokenType.CONTROL)
        else:
            types[tid] = int(gguf.TokenType.USER_DEFINED)
            text = text.replace(_SPACE, " ") if kind == "llama" else text
        tokens[tid] = text
        scores[tid] = -1000.0 if kind == "llama" else 0.0


def _bpe_pre(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json (it picks its split regex by name)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split" \
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True):
        name = _BPE_PRE.get((parts[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise InputError("GGUF export knows the GPT-2, Llama-3 and Qwen2 byte-level pre-tokenizers; this tokenizer's "
                     f"{json.dumps(pre)[:200]} has no llama.cpp name, and a wrong one would split text differently")


def _add_normalizer_flags(writer: gguf.GGUFWriter, model_file: str) -> None:
    """The SentencePiece normalizer flags llama.cpp's SPM tokenizer honours (as convert_hf_to_gguf.py)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
