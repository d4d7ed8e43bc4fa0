"""Tiny, deterministic building blocks for tests, benchmarks and demos (no downloads).

`tiny_tokenizer()` trains a byte-level BPE tokenizer on a fixed built-in text in well under a
second; `tiny_model(preset)` builds a randomly initialised LLaVA whose vocabulary matches it.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava.config import LlavaConfig, preset
from llava.model.llava import LlavaModel

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"

_CORPUS = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. USER: ASSISTANT: What is shown in the image?
The image shows a red circle, a blue square and a green triangle on a white background. How many
circles are there? There are two circles. Is there a yellow star? Yes. No. Answer the question using
a single word or phrase. Answer with the option's letter from the given choices directly. left right
top bottom above below next to the small large big tiny word reads says printed text color colour shape
count one two three four five six seven eight nine ten zero red green blue yellow purple orange black
gray white pink brown circle square triangle star diamond hexagon cross heart describe the picture
in detail. What color is the circle? What shape is red? Where is the square? A B C D
"""


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama-like specials: BOS added, `</s>` as EOS, `<image>` the last id."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens([IMAGE_TOKEN])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})
    return fast


def tiny_model(name: str = "tiny", seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None,
               vocab_size: int | None = None, **overrides) -> tuple[LlavaModel, PreTrainedTokenizerFast]:
    """A random-weight LLaVA of a named preset, sized to the tiny tokenizer's vocabulary.

    `vocab_size` larger than the tokenizer gives the embedding and LM head unused rows, as real
    checkpoints pad theirs; benchmarks use it to pay a real model's head cost with the tiny tokenizer.
    """
    tokenizer = tokenizer or tiny_tokenizer()
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} ids)")
    config: LlavaConfig = preset(name)
    text = config.text_config.to_dict()
    text.update(vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = config.replace(text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                            **overrides)
    torch.manual_seed(seed)
    model = LlavaModel(config).eval()
    return model, tokenizer
