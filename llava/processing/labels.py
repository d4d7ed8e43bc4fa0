"""Training labels: which tokens of a conversation the loss covers, for any tokenizer.

The original LLaVA counts tokens of re-tokenised pieces of the prompt (`preprocess_v1`
and friends) and patches the counts with tokenizer-specific -1/-2 corrections; when a
tokenizer disagrees with those corrections every label of the row is silently masked
("tokenization mismatch").  Here the template says which *characters* are trained
(`Template.target_spans`: from the end of each generation prompt to the end of the
answer's separator) and the tokenizer's character offsets say which tokens carry them:
a token is trained if it overlaps a trained character.  That gives the original's masks
where its corrections hold and correct masks where they do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from llava.errors import InputError, InputTypeError, LabelError  # LabelError re-exported: raised here
from llava.processing.templates import SepStyle, Template, get_template
from llava.processing.tokenize import CONVENTIONS, IMAGE_TAG, PromptError, tokenize_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "LabelError", "build_example", "training_text"]

_Span = tuple[int, int]


def training_text(template: Template, turns: Sequence[str], n_images: int) -> tuple[str, list[_Span]]:
    """The string a row is trained on and the character spans its loss covers.

    `plain` (stage-1 captioning) follows the original's `preprocess_plain`: the human
    text is replaced by the image tags and the string is tags + caption + "\\n".
    """
    if isinstance(turns, str):
        raise InputTypeError("turns must be a list of messages, not a single string")
    if not turns:
        raise LabelError("the conversation has no turns")
    for i, msg in enumerate(turns):
        role = "human" if i % 2 == 0 else "gpt"
        if not isinstance(msg, str):
            raise LabelError(f"turn {i} ({role}) must be a string, got {type(msg).__name__}")
        if not is_utf8(msg):  # a "\ud800" escape in a JSON file: the tokenizer would raise TypeError
            raise LabelError(f"turn {i} ({role}) holds an unpaired surrogate (\\ud800-\\udfff), not valid text")
        if role == "gpt" and IMAGE_TAG in msg:
            raise LabelError(f"turn {i} (gpt) contains {IMAGE_TAG}; images belong in human turns")
        if not msg.strip():  # a human turn that is only "<image>" is fine
            raise LabelError(f"turn {i} ({role}) is empty")
    if len(turns) % 2:
        raise LabelError(f"the conversation ends with a human turn (turn {len(turns) - 1}) that has no answer")
    if template.style is SepStyle.PLAIN:
        if len(turns) != 2:
            raise LabelError(f"the plain template (stage-1 captioning) takes one human and one gpt turn, "
                             f"got {len(turns)} turns")
        prompt = IMAGE_TAG * n_images
        text = prompt + turns[1] + template.sep
        return text, [(len(prompt), len(text))]
    return template.render(list(turns)), template.target_spans(list(turns))


def is_utf8(text: str) -> bool:
    """False for text with an unpaired surrogate (a `\\ud800` escape in a JSON file): no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def build_example(tokenizer: Tokenizer, template: Template | str, turns: Sequence[str],
                  image_token_counts: Sequence[int], image_token_index: int, convention: str = "original",
                  max_length: int | None = None, row_id: object = None) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX outside the answers) for one conversation.

    `turns` alternate human, gpt and end with a gpt answer; human turns carry one
    `<image>` tag per entry of `image_token_counts`, which become that many
    `image_token_index` placeholders.  Trained: every answer and its end separator
    (plus the space or prefix token that joins it to the prompt); never trained: BOS,
    the prompts, image placeholders.  `max_length` keeps the head, like the original,
    but refuses to cut through or drop an image.  Raises `LabelError` naming `row_id`.
    """
    if isinstance(template, str):
        template = get_template(template)
    try:
        text, spans = training_text(template, turns, len(image_token_counts))
        ids, trained, image_of = _tokenize(tokenizer, text, spans, image_token_counts, image_token_index, convention)
    except LabelError as err:
        raise LabelError(err.reason, row_id) from None
    except PromptError as err:
        raise LabelError(str(err), row_id) from err
    labels = [t if flag and img < 0 else IGNORE_INDEX for t, flag, img in zip(ids, trained, image_of)]
    if all(label == IGNORE_INDEX for label in labels):
        raise LabelError("no answer tokens to train on: the tokenizer gave the answers no tokens", row_id)
    if max_length is not None and len(ids) > max_length:
        total = len(ids)
        _check_cut(image_of, max_length, len(image_token_counts), row_id)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise LabelError(f"truncating {total} tokens to max_length={max_length} leaves no answer "
                             f"tokens to train on", row_id)
    return ids, labels


def _check_cut(image_of: list[int], max_length: int, n_images: int, row_id: object) -> None:
    """Refuse truncation that would leave an image with fewer placeholders than features."""
    lost = next((k for k in image_of[max_length:] if k >= 0), None)
    if lost is None:
        return
    how = "cut image" if image_of[max_length - 1] == lost else "drop image"
    raise LabelError(f"truncating {len(image_of)} tokens to max_length={max_length} would {how} {lost + 1} of "
                     f"{n_images} (image tokens cannot be partly kept); raise max_length or shorten the row",
                     row_id)


# -- tokenisation with per-token "trained" flags ----------------------------------------------

_Tokens = tuple[list[int], list[bool], list[int]]  # ids, trained flags, image index per token (-1: text)


def _tokenize(tokenizer: Tokenizer, text: str, spans: list[_Span], counts: Sequence[int], image_token_index: int,
              convention: str) -> _Tokens:
    """Ids exactly as `tokenize_prompt` makes them, plus per-token trained flags and image indices."""
    if convention not in CONVENTIONS:
        raise InputError(f"unknown tokenization convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    target = bytearray(len(text))
    for start, end in spans:
        target[start:end] = b"\x01" * (end - start)
    out: _Tokens = ([], [], [])
    if convention == "original":
        _chunks(tokenizer, text, target, counts, image_token_index, out)
    else:
        _whole(tokenizer, text, target, counts, image_token_index, out)
    ids, trained, image_of = out
    expected = tokenize_prompt(tokenizer, text, counts, image_token_index, convention)
    bos = tokenizer.bos_token_id
    if bos is not None and expected and expected[0] == bos and (not ids or ids[0] != bos):
        ids, trained, image_of = [bos] + ids, [False] + trained, [-1] + image_of
    if ids != expected:
        raise RuntimeError("label tokenisation disagrees with tokenize_prompt; this is a bug in llava")
    return ids, trained, image_of


def _append(out: _Tokens, ids: Sequence[int], flags: Sequence[bool], image: int = -1) -> None:
    out[0].extend(ids)
    out[1].extend(flags)
    out[2].extend([image] * len(ids))


def _chunks(tokenizer: Tokenizer, text: str, target: bytearray, counts: Sequence[int], image_token_index: int,
            out: _Tokens) -> None:
    """The original convention: each chunk around `<image>` on its own, BOS kept once."""
    bos = tokenizer.bos_token_id
    offset = 0
    for i, chunk in enumerate(text.split(IMAGE_TAG)):
        ids, flags = _encode(tokenizer, chunk, target[offset:offset + len(chunk)])
        if bos is not None and ids and ids[0] == bos:
            if i == 0:
                _append(out, [bos], [False])
            ids, flags = ids[1:], flags[1:]
        _append(out, ids, flags)
        if i < len(counts):
            _append(out, [image_token_index] * counts[i], [False] * counts[i], image=i)
        offset += len(chunk) + len(IMAGE_TAG)


def _whole(tokenizer: Tokenizer, text: str, target: bytearray, counts: Sequence[int], image_token_index: int,
           out: _Tokens) -> None:
    """The hf convention: the whole string at once, `<image>` a special token."""
    tag_id = tokenizer.convert_tokens_to_ids(IMAGE_TAG)
    ids, flags = _encode(tokenizer, text, target)
    k = 0
    for t, flag in zip(ids, flags):
        if t == tag_id and k < len(counts):
            _append(out, [image_token_index] * counts[k], [False] * counts[k], image=k)
            k += 1
        else:
            _append(out, [t], [flag])


def _encode(tokenizer: Tokenizer, text: str, target: bytearray) -> tuple[list[int], list[bool]]:
    """Ids of `text` (with special tokens) and whether each overlaps a trained character."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        return ids, [start < end and any(target[start:end]) for start, end in enc["offset_mapping"]]
    return _encode_by_prefixes(tokenizer, text, target)


def _encode_by_prefixes(tokenizer: Tokenizer, text: str, target: bytearray) -> tuple[list[int], list[bool]]:
    """Fallback without offsets: locate each trained span's edges by tokenising prefixes.

    Tokens shared by the tokenisation of `text[:edge]` and of `text` end before the edge;
    the first differing token straddles it and, like in the offset rule, counts as trained.
    """
    def encode(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=True)["input_ids"])

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    ids = encode(text)
    flags = [False] * len(ids)
    edges = [i for i in range(len(target) + 1)
             if (target[i - 1] if i else 0) != (target[i] if i < len(target) else 0)]
    for start, end in zip(edges[::2], edges[1::2]):
        first = common(encode(text[:start]), ids)
        head = encode(text[:end])
        last = common(head, ids)
        last += 0 if last == len(head) else 1
        for k in range(first, min(last, len(ids))):
            flags[k] = True
    return ids, flags
