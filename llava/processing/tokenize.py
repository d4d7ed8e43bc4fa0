"""Prompt text with `<image>` tags -> token ids with one run of placeholders per image.

Two conventions, chosen by where a checkpoint comes from:
- "original": each text chunk around `<image>` is tokenised on its own (each gets the
  tokenizer's prefix handling), BOS is kept once at the front (the original's
  `tokenizer_image_token`).
- "hf": the whole string is tokenised with `<image>` as a special token, as transformers'
  processors do.
Either way each image becomes `count` copies of `image_token_index`, the ids that
`LlavaModel.embed` replaces with features.
"""

from __future__ import annotations

from typing import Sequence

from llava.errors import PromptError  # re-exported: raised here

IMAGE_TAG = "<image>"
CONVENTIONS = ("original", "hf")



def count_image_tags(prompt: str) -> int:
    return prompt.count(IMAGE_TAG)


def check_image_count(prompt: str, n_images: int) -> None:
    n_tags = count_image_tags(prompt)
    if n_tags != n_images:
        raise PromptError(f"the prompt has {n_tags} {IMAGE_TAG} tag(s) but {n_images} image(s) were given; "
                          f"put exactly one {IMAGE_TAG} where each image belongs")


def tokenize_prompt(tokenizer, prompt: str, image_token_counts: Sequence[int], image_token_index: int,
                    convention: str = "original", add_bos: bool = True) -> list[int]:
    check_image_count(prompt, len(image_token_counts))
    if convention == "original":
        ids = _tokenize_chunks(tokenizer, prompt, image_token_counts, image_token_index)
    elif convention == "hf":
        ids = _tokenize_whole(tokenizer, prompt, image_token_counts, image_token_index)
    else:
        raise ValueError(f"unknown tokenization convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    bos = tokenizer.bos_token_id
    if bos is not None:
        if not add_bos and ids and ids[0] == bos:
            ids = ids[1:]
        elif add_bos and (not ids or ids[0] != bos):
            ids = [bos] + ids
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True).input_ids)


def _tokenize_chunks(tokenizer, prompt: str, counts: Sequence[int], image_token_index: int) -> list[int]:
    bos = tokenizer.bos_token_id
    chunks = [_encode(tokenizer, c) for c in prompt.split(IMAGE_TAG)]
    ids: list[int] = []
    if chunks and chunks[0] and bos is not None and chunks[0][0] == bos:
        ids.append(bos)
    for i, chunk in enumerate(chunks):
        if bos is not None and chunk and chunk[0] == bos:
            chunk = chunk[1:]
        ids.extend(chunk)
        if i < len(counts):
            ids.extend([image_token_index] * counts[i])
    return ids


def _tokenize_whole(tokenizer, prompt: str, counts: Sequence[int], image_token_index: int) -> list[int]:
    tag_id = tokenizer.convert_tokens_to_ids(IMAGE_TAG)
    if tag_id is None or tag_id == tokenizer.unk_token_id:
        raise PromptError(f"this tokenizer has no {IMAGE_TAG} token; use the 'original' convention")
    ids: list[int] = []
    k = 0
    for t in _encode(tokenizer, prompt):
        if t == tag_id:
            ids.extend([image_token_index] * counts[k])
            k += 1
        else:
            ids.append(t)
    if k != len(counts):
        raise PromptError(f"the tokenizer produced {k} {IMAGE_TAG} tokens for {len(counts)} image(s)")
    return ids
