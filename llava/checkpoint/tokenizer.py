"""Loading tokenizers from checkpoint folders, and the special tokens LLaVA adds.

transformers 5 has no pure-Python ("slow") tokenizers. Original LLaVA folders ship only a
SentencePiece `tokenizer.model`; `LlamaTokenizer` converts it into a `tokenizers` pipeline
(needs the sentencepiece and protobuf packages). The original used the slow tokenizer,
which adds BOS and, when the config does not say, behaves as `legacy=True`; we ask for the
same so ids match what the checkpoint was trained on.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Sequence

from tokenizers import AddedToken
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"


def _tokenizer_config(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return {}
    with open(config_path) as f:
        return json.load(f)


def has_tokenizer(path: str | os.PathLike) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))


def load_tokenizer(path: str | os.PathLike, config: Any = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a folder: `tokenizer.json` if present, else SentencePiece `tokenizer.model`.

    `config` (the language model's config) spares transformers reading the folder's config.json,
    whose original-layout `llava_llama` type it does not know (and warns about).
    """
    path = str(path)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(path, **({"config": config} if config is not None else {}))
        except (ValueError, OSError, ImportError, KeyError):
            # An unknown tokenizer_class (e.g. remote code) must not hide a perfectly usable tokenizer.json.
            return PreTrainedTokenizerFast.from_pretrained(path)
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        cfg = _tokenizer_config(path)
        kwargs: dict[str, Any] = {}
        if "add_bos_token" not in cfg:
            kwargs["add_bos_token"] = True  # the slow LlamaTokenizer's default
        if "legacy" not in cfg:
            kwargs["legacy"] = True  # likewise (it warned and used legacy behaviour)
        try:
            return LlamaTokenizer.from_pretrained(path, **kwargs)
        except ImportError as err:
            raise ImportError(f"reading the SentencePiece tokenizer in {path} needs the sentencepiece and protobuf "
                              f"packages: pip install sentencepiece protobuf ({err})") from None
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    raise FileNotFoundError(f"no tokenizer in {path}: looked for tokenizer.json (fast tokenizer) and tokenizer.model "
                            f"(SentencePiece); found {found}")


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """`save_pretrained`, plus what transformers 5 leaves out: the Llama `legacy` flag (it
    changes how text after a special token is split) and the SentencePiece `tokenizer.model`
    the tokenizer came from (the original code base can only read that one)."""
    tokenizer.save_pretrained(path)
    complete_tokenizer_files(tokenizer, path)


def complete_tokenizer_files(tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """Add what `save_pretrained` leaves out (see `save_tokenizer`) to a folder it just wrote;
    also for savers that write the tokenizer themselves, such as a processor's `save_pretrained`."""
    sp_model = getattr(tokenizer, "vocab_file", None)
    target = os.path.join(path, "tokenizer.model")
    if isinstance(sp_model, str) and sp_model.endswith(".model") and os.path.isfile(sp_model) \
            and not os.path.exists(target):
        shutil.copyfile(sp_model, target)
    legacy = getattr(tokenizer, "legacy", None)
    config_path = os.path.join(path, "tokenizer_config.json")
    if isinstance(legacy, bool) and os.path.isfile(config_path):
        with open(config_path) as f:
            cfg = json.load(f)
        cfg["legacy"] = legacy
        with open(config_path, "w") as f:
            json.dump(cfg, f, indent=2)


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token` if the tokenizer has it as one token, else None."""
    ids = tokenizer.convert_tokens_to_ids([token])
    tid = ids[0] if ids else None
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> list[str]:
    """Add the tokens the tokenizer lacks, as special (never split) tokens; returns those added."""
    missing = [t for t in tokens if token_id(tokenizer, t) is None]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return missing
