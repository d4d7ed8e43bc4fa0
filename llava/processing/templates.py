"""Conversation templates: turn a chat into the exact prompt string LLaVA checkpoints saw.

Checkpoints are sensitive to every space and separator of the prompt they were trained
with, so each template reproduces the original LLaVA renderings byte for byte (see
reference facts section 3).  ``segments`` additionally says which characters a training
loss covers, so label masking never has to re-parse the rendered string.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

from llava.errors import InputError

__all__ = [
    "SepStyle",
    "Template",
    "TEMPLATES",
    "get_template",
    "template_for_model",
    "image_first",
]


class SepStyle(enum.Enum):
    """How turns are joined; the names follow the original's separator styles."""

    SINGLE = enum.auto()  # "Role: msg" + sep after every turn
    TWO = enum.auto()  # sep after user turns, sep2 after assistant turns
    MPT = enum.auto()  # ChatML-like: role strings carry their own markup
    LLAMA_2 = enum.auto()  # [INST] ... [/INST] with an optional <<SYS>> block
    PLAIN = enum.auto()  # bare messages (stage-1 captioning)


_Segment = tuple[str, bool]


@dataclass(frozen=True)
class Template:
    """An immutable conversation format; render chats with ``render``/``segments``."""

    name: str
    system: str
    roles: tuple[str, str]  # (user, assistant)
    style: SepStyle
    sep: str
    sep2: str | None = None
    version: str = ""
    few_shot: tuple[str, ...] = ()  # canned example turns rendered before the real ones

    def render(self, turns: Sequence[str | None]) -> str:
        """Prompt text for ``turns`` (user, assistant, user, ...).

        A trailing ``None`` or an odd number of turns leaves the prompt open for the
        assistant (a generation prompt).  As in the original, an empty-string message is
        rendered like an open one.
        """
        return "".join(piece for piece, _ in self.segments(turns))

    def segments(self, turns: Sequence[str | None]) -> list[_Segment]:
        """``render(turns)`` cut into pieces; ``True`` marks text a training loss covers.

        Covered pieces are each real assistant answer plus the end separator that follows
        it, so labels can be built by tokenising piece by piece.  Few-shot example answers
        are never covered.
        """
        messages = self._messages(turns)
        n_shot = len(self.few_shot)
        if self.style is SepStyle.LLAMA_2:
            return self._llama2_segments(messages, n_shot)
        out: list[_Segment] = []
        if self.style is SepStyle.PLAIN:
            out.append((self.system, False))
        else:
            out.append((self.system + self.sep, False))
        for i, msg in enumerate(messages):
            is_answer = i % 2 == 1
            role = self.roles[i % 2]
            trained = is_answer and i >= n_shot
            if self.style is SepStyle.PLAIN:
                if msg:
                    out.append((msg + self._end_sep(i), trained))
                continue
            head = role if self.style is SepStyle.MPT else role + ":"
            if not msg:  # open turn: the model speaks next
                out.append((head, False))
                continue
            if self.style is not SepStyle.MPT:
                head += " "
            body = msg + self._end_sep(i)
            if is_answer:
                out.extend([(head, False), (body, trained)])
            else:
                out.append((head + body, False))
        return _merge(out)

    def target_spans(self, turns: Sequence[str | None]) -> list[tuple[int, int]]:
        """Character spans of ``render(turns)`` a model must generate, one per trained answer.

        A span starts where the generation prompt for that answer ends and stops after the
        answer's end separator.  It therefore includes text between the prompt and the
        answer, such as the space after ``"ASSISTANT:"`` that an inference prompt lacks,
        so a token carrying that space (SentencePiece's ``"▁A1"``) is trained, as in the
        original.  Few-shot and empty answers get no span.
        """
        full = self.render(turns)
        real = list(turns)
        spans: list[tuple[int, int]] = []
        for i in range(1, len(real), 2):
            if not real[i]:
                continue
            start = len(self.render(real[:i]))
            answered = self.render(real[:i + 1])
            if not full.startswith(answered) or start > len(answered):
                raise ValueError(f"{self.name}: turn {i} does not render as a prefix of the conversation")
            spans.append((start, len(answered)))
        return spans

    @property
    def system_prefix(self) -> str:
        """Markup a system prompt sits in: ChatML's header, which MPT-style systems carry."""
        return _CHATML_SYSTEM if self.style is SepStyle.MPT else ""

    def with_system(self, system: str) -> Template:
        """This template with another system prompt, in the template's own markup.

        ChatML (MPT style) keeps its ``<|im_start|>system\\n`` header, so a custom system
        message still renders as a system turn; other styles take the text as it is.
        """
        return replace(self, system=self.system_prefix + system)

    def chat_template(self) -> str:
        """A Jinja chat template that renders as this template does (see `chat_template.to_jinja`).

        Written into exported checkpoints so transformers' ``apply_chat_template``, vLLM and
        SGLang build the prompt the checkpoint was trained on.
        """
        from llava.processing.chat_template import to_jinja

        return to_jinja(self)

    @property
    def stop_str(self) -> str:
        """Text that ends an answer: sep for SINGLE/MPT/PLAIN, otherwise sep2.

        This is the rule of the original web worker; PLAIN is given ``sep`` because its
        sep2 is unset and its captions end with a newline.
        """
        if self.style in (SepStyle.SINGLE, SepStyle.MPT, SepStyle.PLAIN):
            return self.sep
        assert self.sep2 is not None
        return self.sep2

    # -- internals ---------------------------------------------------------------------

    def _messages(self, turns: Sequence[str | None]) -> list[str | None]:
        """Few-shot turns + real turns, padded with an open assistant turn if needed."""
        if isinstance(turns, str):
            raise TypeError("turns must be a sequence of messages, not a single string")
        real = list(turns)
        for i, msg in enumerate(real):
            if msg is None and i != len(real) - 1:
                raise ValueError(f"only the last turn may be None (turn {i} is None)")
            if msg is not None and not isinstance(msg, str):
                raise TypeError(f"turn {i} must be str or None, got {type(msg).__name__}")
        if real and real[0] is None:
            raise ValueError("the first turn must be a user message")
        messages: list[str | None] = [*self.few_shot, *real]
        if len(messages) % 2 == 1:
            messages.append(None)
        return messages

    def _end_sep(self, i: int) -> str:
        """Separator closing message ``i``; TWO/PLAIN close assistant turns with sep2."""
        if i % 2 == 1 and self.sep2 is not None and self.style in (SepStyle.TWO, SepStyle.PLAIN):
            return self.sep2
        return self.sep

    def _llama2_segments(self, messages: list[str | None], n_shot: int) -> list[_Segment]:
        """[INST] rendering; the system block rides inside the first user message."""
        assert self.sep2 is not None
        out: list[_Segment] = []
        for i, msg in enumerate(messages):
            if i == 0 and not msg:
                raise ValueError(f"{self.name}: the first user message must not be empty")
            if not msg:
                continue
            if i % 2 == 0:
                if i == 0 and self.system:
                    msg = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + msg
                out.append((f"{self.sep}[INST] {msg} [/INST]", False))
            else:
                out.append((f" {msg} {self.sep2}", i >= n_shot))
        if out and self.sep:
            # The original strips leading sep characters; only the first turn's sep
            # can be there, as every [INST] block starts with "[".
            first, trained = out[0]
            out[0] = (first.lstrip(self.sep), trained)
        return _merge(out)


def _merge(segments: list[_Segment]) -> list[_Segment]:
    """Join neighbouring pieces with the same flag and drop empty ones."""
    merged: list[_Segment] = []
    for piece, flag in segments:
        if not piece:
            continue
        if merged and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + piece, flag)
        else:
            merged.append((piece, flag))
    return merged


# -- the templates ---------------------------------------------------------------------

_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# No space after "language." -- that is how the original string reads.
_MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: "
    "<Image>visual content</Image>."
)
_LLAVA_LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
# Standard Llama-2-chat safety prompt (note the double space after "safe.").
_LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe.  Your answers should not include any harmful, unethical, "
    "racist, sexist, toxic, dangerous, or illegal content. Please ensure that your "
    "responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why "
    "instead of answering something not correct. If you don't know the answer to a "
    "question, please don't share false information."
)
_CHATML_SYSTEM = "<|im_start|>system\n"
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
# Canned example of the v0/default template (the original's offset=2 example).  The
# reference facts do not spell it out; this text is the well-known Vicuna-v0 example,
# reproduced from memory of the original and cross-checked against public copies.
_V0_FEW_SHOT = (
    "What are the key differences between renewable and non-renewable energy sources?",
    "Renewable energy sources are those that can be replenished naturally in a relatively "
    "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
    "Non-renewable energy sources, on the other hand, are finite and will eventually be "
    "depleted, such as coal, oil, and natural gas. Here are some key differences between "
    "renewable and non-renewable energy sources:\n"
    "1. Availability: Renewable energy sources are virtually inexhaustible, while "
    "non-renewable energy sources are finite and will eventually run out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental "
    "impact than non-renewable sources, which can lead to air and water pollution, "
    "greenhouse gas emissions, and other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set up, but they "
    "typically have lower operational costs than non-renewable sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can be used in "
    "more remote locations than non-renewable sources.\n"
    "5. Flexibility: Renewable energy sources are often more flexible and can be adapted "
    "to different situations and needs, while non-renewable sources are more rigid and "
    "inflexible.\n"
    "6. Sustainability: Renewable energy sources are more sustainable over the long term, "
    "while non-renewable sources are not, and their depletion can lead to economic and "
    "social instability.\n",
)

_S, _T, _M, _L, _P = (SepStyle.SINGLE, SepStyle.TWO, SepStyle.MPT,
                      SepStyle.LLAMA_2, SepStyle.PLAIN)
_UA = ("USER", "ASSISTANT")
_HA = ("Human", "Assistant")

_CANONICAL: tuple[Template, ...] = (
    Template("vicuna_v1", _USER_SYSTEM, _UA, _T, " ", "</s>", "v1"),
    Template("llava_v1", _HUMAN_SYSTEM, _UA, _T, " ", "</s>", "v1"),
    Template("v1_mmtag", _MMTAG_SYSTEM, _UA, _T, " ", "</s>", "v1_mmtag"),
    Template("plain", "", ("", ""), _P, "\n", None, "plain"),
    Template("llava_llama_2", _LLAVA_LLAMA2_SYSTEM, _UA, _L, "<s>", "</s>", "llama_v2"),
    Template("llama_2", _LLAMA2_SYSTEM, _UA, _L, "<s>", "</s>", "llama_v2"),
    Template("mistral_instruct", "", _UA, _L, "", "</s>", "llama_v2"),
    Template("chatml_direct", "<|im_start|>system\nAnswer the questions.",
             _CHATML_ROLES, _M, "<|im_end|>", None, "mpt"),
    Template("mpt", "<|im_start|>system\nA conversation between a user and an LLM-based "
             "AI assistant. The assistant gives helpful and honest answers.",
             _CHATML_ROLES, _M, "<|im_end|>", None, "mpt"),
    Template("llava_v0", _HUMAN_SYSTEM, _HA, _S, "###", None, "v0"),
    Template("v0", _HUMAN_SYSTEM, _HA, _S, "###", None, "v0", _V0_FEW_SHOT),
    Template("v0_mmtag", _MMTAG_SYSTEM, _HA, _S, "###", None, "v0_mmtag"),
)
_ALIASES = {
    "v1": "vicuna_v1",
    "v0_plain": "plain",
    "mistral_direct": "chatml_direct",
    "default": "v0",
}

TEMPLATES: dict[str, Template] = {t.name: t for t in _CANONICAL}
TEMPLATES.update({alias: TEMPLATES[target] for alias, target in _ALIASES.items()})


def get_template(name: str) -> Template:
    """Look a template up by name or alias; unknown names list the valid ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        valid = ", ".join(sorted(TEMPLATES))
        raise InputError(f"unknown conversation template {name!r}; valid: {valid}") from None


# First match wins, on the lower-cased model name (order matters: "v1.6-34b" before "v1").
_AUTO_RULES: tuple[tuple[str, str], ...] = (
    ("llama-2", "llava_llama_2"),
    ("mistral", "mistral_instruct"),
    ("v1.6-34b", "chatml_direct"),
    ("v1", "llava_v1"),
    ("mpt", "mpt"),
)


def template_for_model(model_name: str, requested: str | None = None) -> str:
    """Template name for a model, as the original's CLI picks it from the model name.

    An explicit ``requested`` template wins; if it differs from the automatic choice a
    warning names both, because a mismatched template silently degrades answers.
    """
    lowered = model_name.lower()
    auto = next((tpl for key, tpl in _AUTO_RULES if key in lowered), "llava_v0")
    if requested is None:
        return auto
    get_template(requested)  # validate
    if requested != auto:
        warnings.warn(
            f"conversation template {requested!r} was requested but {auto!r} is the one "
            f"inferred from model name {model_name!r}; using {requested!r}",
            UserWarning,
            stacklevel=2,
        )
    return requested


def image_first(text: str, image_token: str = "<image>") -> str:
    """Move the image tag to the front of a user message, as LLaVA's training data has it.

    Every occurrence of the tag is removed, the rest is stripped and the tag plus a
    newline is put in front (text without the tag is returned unchanged).  Models were
    trained on exactly this layout, so prompts built this way tokenise the same.
    """
    if image_token not in text:
        return text
    rest = text.replace(image_token, "").strip()
    return (image_token + "\n" + rest).strip()
