"""Stage 0a: a byte-level BPE tokenizer trained on the recipe's own corpus.

The same construction as `llava.tiny.tiny_tokenizer` (Llama-like specials, BOS added,
`</s>` as EOS, `<image>` last) but fitted to the synthetic captions and chats, so a
~1k vocabulary covers every word of the dataset in one or two tokens.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava.data.synth_scene import MAX_OBJECTS
from llava.processing.templates import get_template

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"


def record_texts(path: str | os.PathLike) -> Iterator[list[str]]:
    """The turns of each LLaVA JSON record, with the `<image>` placeholder removed."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    for rec in records:
        yield [t["value"].replace(IMAGE_TOKEN, "").strip() for t in rec["conversations"]]


def chat_texts(paths: Iterable[str | os.PathLike], template: str = "vicuna_v1") -> list[str]:
    """Every record rendered as the stage-2 template renders it (what the LM will later read)."""
    tmpl = get_template(template)
    return [tmpl.render(turns) for path in paths for turns in record_texts(path)]


Doc = tuple[str, list[tuple[int, int]]]  # rendered text, character spans the loss covers


def grounded_docs(seed: int, n_scenes: int, n_text: int = 0, template: str = "vicuna_v1",
                  text_mc: float = 0.0, max_objects: int = MAX_OBJECTS, world: str = "classic") -> list[Doc]:
    """Stage-2 chats and captions with each image replaced by its scene's description, in words.

    Scenes `0..n_scenes-1` of the synthetic training stream (the first `n` are exactly the
    dataset's images and chats; the rest are never rendered: text is cheap, pixels are not),
    plus `n_text` text-only chats (`text_mc` of their questions lettered multiple choice, as in
    `generate`; `max_objects` and `world` too), each with the spans of its assistant turns. An LM trained on
    these learns to answer from what precedes the question, where the image tokens will later
    sit. With a text-only corpus instead, the recipe's model ignored its image tokens entirely
    (same loss with real, shuffled or zero images); with this one it gets well above chance.
    """
    from llava.data.synth import _rng, chat, train_scene
    from llava.data.synth_text import CAPTION_PROMPTS, caption, description, text_conversation

    tmpl = get_template(template)

    def doc(turns: list[str]) -> Doc:
        return tmpl.render(turns), tmpl.target_spans(turns)

    docs = []
    for i in range(n_scenes):
        # the same draws, in the same order, as llava.data.synth.generate
        rng, scene = train_scene(seed, i, max_objects=max_objects, world=world)
        prompt, cap = rng.choice(CAPTION_PROMPTS), caption(scene)
        turns = [t for qa in chat(rng, scene, world) for t in qa]
        desc = description(scene)
        docs.append(doc([f"{desc}\n{prompt}", cap]))
        docs.append(doc([f"{desc}\n{turns[0]}"] + turns[1:]))
    for j in range(n_text):
        docs.append(doc([t for qa in text_conversation(_rng(seed, "text", j), text_mc) for t in qa]))
    return docs


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE with `<unk> <s> </s> <pad>` as ids 0-3 and `<image>` as the last id."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([IMAGE_TOKEN])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})
