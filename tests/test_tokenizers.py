"""Tokenizer loading from checkpoint folders: tokenizer.json, SentencePiece tokenizer.model, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llava.checkpoint.tokenizer import IMAGE_TOKEN, add_special_tokens, load_tokenizer, save_tokenizer, token_id
from llava.processing.tokenize import tokenize_prompt
from llava.tiny import _CORPUS

SP_VOCAB = 400  # 256 byte-fallback pieces + ~140 learnt ones


def train_sentencepiece(folder: str | os.PathLike, tokenizer_config: dict | None = None) -> Path:
    """A Llama-style SentencePiece model (BPE, byte fallback, <unk>/<s>/</s> = 0/1/2) in `folder`."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [line for line in _CORPUS.splitlines() if line.strip()] * 5
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=SP_VOCAB, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


def _sp_ids(folder: Path, text: str) -> list[int]:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(text)


def test_sentencepiece_model_adds_bos_and_matches_sentencepiece(sp_folder):
    tok = load_tokenizer(sp_folder)
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (1, 2, SP_VOCAB)
    for text in ["What color is the circle?", "\nAnswer the question", "USER: hi ASSISTANT:"]:
        assert tok(text).input_ids == [1] + _sp_ids(sp_folder, text)


def test_literal_eos_string_becomes_the_eos_id(sp_folder):
    # Training targets end in the literal "</s>"; the slow Llama tokenizer mapped it to EOS (2).
    tok = load_tokenizer(sp_folder)
    ids = tok("ASSISTANT: two</s>").input_ids
    assert ids[-1] == 2 and ids.count(2) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "ASSISTANT: two"


def test_tokenizer_config_wins_over_defaults(tmp_path):
    folder = train_sentencepiece(tmp_path, {"add_bos_token": False, "tokenizer_class": "LlamaTokenizer"})
    assert load_tokenizer(folder)("hi").input_ids == _sp_ids(folder, "hi")


def test_original_prompt_convention_with_sentencepiece(sp_folder):
    # upstream tokenizer_image_token: "<image>\nQ" -> [BOS, image ids, ids("\nQ") minus BOS]
    tok = load_tokenizer(sp_folder)
    ids = tokenize_prompt(tok, "<image>\nWhat is shown?", [3], -200, convention="original")
    assert ids == [1, -200, -200, -200] + _sp_ids(sp_folder, "\nWhat is shown?")


def test_saved_tokenizer_reloads_from_tokenizer_json(sp_folder, tmp_path):
    tok = load_tokenizer(sp_folder)
    assert add_special_tokens(tok, [IMAGE_TOKEN]) == [IMAGE_TOKEN]
    assert add_special_tokens(tok, [IMAGE_TOKEN]) == []
    save_tokenizer(tok, tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    again = load_tokenizer(tmp_path)
    # legacy splitting after special tokens (a prefix space after <image> and </s>) must survive the save
    text = "USER: <image>\nWhat color is the circle? ASSISTANT: red</s>USER: hi"
    assert again(text).input_ids == tok(text).input_ids
    assert token_id(again, IMAGE_TOKEN) == SP_VOCAB and again(text).input_ids[0] == 1


def test_tiny_bpe_tokenizer_json_folder(tiny_tok, tmp_path):
    tiny_tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok("hi <image> there").input_ids == tiny_tok("hi <image> there").input_ids
    assert token_id(tok, IMAGE_TOKEN) == 511 and token_id(tok, "<im_patch>") is None


def test_no_tokenizer_lists_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*tokenizer\.model.*config\.json"):
        load_tokenizer(tmp_path)
