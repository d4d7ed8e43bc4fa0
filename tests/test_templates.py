"""Conversation templates must reproduce the original LLaVA prompt strings exactly."""

from __future__ import annotations

import warnings

import pytest

from llava.processing.templates import (
    TEMPLATES,
    SepStyle,
    Template,
    get_template,
    image_first,
    template_for_model,
)

Q = "<image>\nWhat is shown?"

HUMAN_SYS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
MMTAG_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "is able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language.The visual content will be provided "
    "with the following format: <Image>visual content</Image>."
)
LLAVA_L2_SYS = (
    "You are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of tasks "
    "using natural language."
)

# One-turn generation prompts, as produced by the original conversation.py (facts §3).
ONE_TURN = {
    "llava_v1": HUMAN_SYS + " USER: <image>\nWhat is shown? ASSISTANT:",
    "vicuna_v1": USER_SYS + " USER: <image>\nWhat is shown? ASSISTANT:",
    "v1": USER_SYS + " USER: <image>\nWhat is shown? ASSISTANT:",
    "plain": "<image>\nWhat is shown?\n",
    "v0_plain": "<image>\nWhat is shown?\n",
    "llava_llama_2": (
        "[INST] <<SYS>>\n" + LLAVA_L2_SYS + "\n<</SYS>>\n\n<image>\nWhat is shown? [/INST]"
    ),
    "mistral_instruct": "[INST] <image>\nWhat is shown? [/INST]",
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
        "<image>\nWhat is shown?<|im_end|><|im_start|>assistant\n"
    ),
    "mistral_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
        "<image>\nWhat is shown?<|im_end|><|im_start|>assistant\n"
    ),
    "v1_mmtag": MMTAG_SYS + " USER: <image>\nWhat is shown? ASSISTANT:",
    "llava_v0": HUMAN_SYS + "###Human: <image>\nWhat is shown?###Assistant:",
    "v0_mmtag": MMTAG_SYS + "###Human: <image>\nWhat is shown?###Assistant:",
}


@pytest.mark.parametrize("name", sorted(ONE_TURN))
@pytest.mark.parametrize("open_form", ["none", "odd"])
def test_one_turn_prompt_exact(name: str, open_form: str) -> None:
    turns = [Q, None] if open_form == "none" else [Q]
    assert get_template(name).render(turns) == ONE_TURN[name]


def test_required_names_present() -> None:
    required = {
        "vicuna_v1", "v1", "llava_v1", "plain", "v0_plain", "llava_llama_2", "llama_2",
        "mistral_instruct", "chatml_direct", "mistral_direct", "mpt", "v1_mmtag",
        "llava_v0", "v0", "default", "v0_mmtag",
    }
    assert required <= set(TEMPLATES)
    assert TEMPLATES["v1"] is TEMPLATES["vicuna_v1"]
    assert TEMPLATES["default"] is TEMPLATES["v0"]
    assert TEMPLATES["mistral_direct"] is TEMPLATES["chatml_direct"]


def test_template_fields() -> None:
    v1 = get_template("vicuna_v1")
    assert (v1.roles, v1.style, v1.sep, v1.sep2, v1.version) == (
        ("USER", "ASSISTANT"), SepStyle.TWO, " ", "</s>", "v1")
    mpt = get_template("mpt")
    assert mpt.system.startswith("<|im_start|>system\nA conversation between a user")
    assert get_template("chatml_direct").version == "mpt"
    assert get_template("llama_2").system.startswith("You are a helpful, respectful and honest")
    assert get_template("llava_llama_2").version == "llama_v2"
    with pytest.raises(Exception):
        v1.sep = "x"  # type: ignore[misc]  # frozen


def test_stop_str() -> None:
    assert get_template("vicuna_v1").stop_str == "</s>"
    assert get_template("llava_llama_2").stop_str == "</s>"
    assert get_template("mistral_instruct").stop_str == "</s>"
    assert get_template("chatml_direct").stop_str == "<|im_end|>"
    assert get_template("llava_v0").stop_str == "###"
    assert get_template("plain").stop_str == "\n"


# -- multi-turn ---------------------------------------------------------------------------

def test_vicuna_multi_turn() -> None:
    t = get_template("vicuna_v1")
    assert t.render(["<image>\nQ1", "A1", "Q2", None]) == (
        USER_SYS + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:")
    assert t.render(["<image>\nQ1", "A1", "Q2"]) == t.render(["<image>\nQ1", "A1", "Q2", None])
    full = t.render(["<image>\nQ1", "A1"])
    assert full == USER_SYS + " USER: <image>\nQ1 ASSISTANT: A1</s>"
    assert full.endswith("ASSISTANT: A1</s>")


def test_mistral_multi_turn() -> None:
    t = get_template("mistral_instruct")
    assert t.render(["<image>\nQ1", "A1", "Q2", None]) == (
        "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]")


def test_llava_llama_2_multi_turn() -> None:
    t = get_template("llava_llama_2")
    out = t.render(["<image>\nQ1", "A1", "Q2", None])
    assert out == (
        "[INST] <<SYS>>\n" + LLAVA_L2_SYS + "\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s>"
        "<s>[INST] Q2 [/INST]")
    assert " A1 </s><s>[INST] Q2" in out
    assert not out.startswith("<s>")


def test_llama_2_system_only_when_non_empty() -> None:
    assert "<<SYS>>" not in get_template("mistral_instruct").render(["hi", "yo", "more"])
    assert get_template("llama_2").render(["hi"]).startswith("[INST] <<SYS>>\nYou are a helpful")


def test_chatml_multi_turn() -> None:
    t = get_template("chatml_direct")
    assert t.render(["Q1", "A1", "Q2"]) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n")


def test_llava_v0_full() -> None:
    t = get_template("llava_v0")
    assert t.render(["Q1", "A1"]) == HUMAN_SYS + "###Human: Q1###Assistant: A1###"


def test_v0_few_shot_comes_first() -> None:
    t = get_template("v0")
    assert len(t.few_shot) == 2
    out = t.render([Q])
    assert out.startswith(HUMAN_SYS + "###Human: " + t.few_shot[0] + "###Assistant: ")
    assert out.endswith("###Human: <image>\nWhat is shown?###Assistant:")
    # few-shot answers are never trained
    trained = [p for p, m in t.segments(["Q", "A"]) if m]
    assert trained == ["A###"]


def test_plain_full() -> None:
    out = get_template("plain").render(["<image>", "a cat on a mat"])
    assert out == "<image>\na cat on a mat\n"


# -- segments -----------------------------------------------------------------------------

CONVERSATIONS = [
    ["<image>\nQ1"],
    ["<image>\nQ1", None],
    ["<image>\nQ1", "A1"],
    ["<image>\nQ1", "A1", "Q2"],
    ["<image>\nQ1", "A1", "Q2", "A2"],
    ["<image>\nQ1", "A1", "Q2", "A2", "Q3", None],
    ["<image>\nQ1", "A1", "Q2", "A2", "Q3", "A3"],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("turns", CONVERSATIONS, ids=lambda t: f"{len(t)}turns")
def test_segments_join_equals_render(name: str, turns: list[str | None]) -> None:
    t = get_template(name)
    segs = t.segments(turns)
    assert "".join(p for p, _ in segs) == t.render(turns)
    assert all(p for p, _ in segs)
    answers = [a for a in turns[1::2] if a]
    trained = [p for p, m in segs if m]
    assert len(trained) == len(answers)
    for piece, answer in zip(trained, answers):
        assert answer in piece


def _trained(name: str, turns: list[str | None]) -> list[str]:
    return [p for p, m in get_template(name).segments(turns) if m]


THREE = ["<image>\nQ1", "A1", "Q2", "A2", "Q3", "A3"]


def test_segments_vicuna() -> None:
    t = get_template("vicuna_v1")
    assert t.segments(["<image>\nQ1", "A1", "Q2", "A2"]) == [
        (USER_SYS + " USER: <image>\nQ1 ASSISTANT: ", False),
        ("A1</s>", True),
        ("USER: Q2 ASSISTANT: ", False),
        ("A2</s>", True),
    ]
    assert _trained("vicuna_v1", THREE) == ["A1</s>", "A2</s>", "A3</s>"]
    assert _trained("vicuna_v1", THREE[:5]) == ["A1</s>", "A2</s>"]


def test_segments_plain() -> None:
    assert get_template("plain").segments(["<image>", "a caption"]) == [
        ("<image>\n", False), ("a caption\n", True)]


def test_segments_llava_llama_2() -> None:
    segs = get_template("llava_llama_2").segments(["<image>\nQ1", "A1", "Q2", "A2"])
    assert segs == [
        ("[INST] <<SYS>>\n" + LLAVA_L2_SYS + "\n<</SYS>>\n\n<image>\nQ1 [/INST]", False),
        (" A1 </s>", True),
        ("<s>[INST] Q2 [/INST]", False),
        (" A2 </s>", True),
    ]


def test_segments_mistral() -> None:
    assert get_template("mistral_instruct").segments(["Q1", "A1", "Q2", "A2"]) == [
        ("[INST] Q1 [/INST]", False), (" A1 </s>", True),
        ("[INST] Q2 [/INST]", False), (" A2 </s>", True),
    ]
    assert _trained("mistral_instruct", THREE) == [" A1 </s>", " A2 </s>", " A3 </s>"]


def test_segments_chatml() -> None:
    assert get_template("chatml_direct").segments(["Q1", "A1"]) == [
        ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nQ1<|im_end|>"
         "<|im_start|>assistant\n", False),
        ("A1<|im_end|>", True),
    ]
    assert _trained("chatml_direct", THREE) == ["A1<|im_end|>", "A2<|im_end|>", "A3<|im_end|>"]


def test_generation_prompt_has_no_trained_piece() -> None:
    for name in TEMPLATES:
        assert not any(m for _, m in get_template(name).segments([Q, None]))


def test_bad_turns() -> None:
    t = get_template("vicuna_v1")
    with pytest.raises(ValueError):
        t.render(["Q1", None, "Q2"])
    with pytest.raises(ValueError):
        t.render([None])
    with pytest.raises(TypeError):
        t.render("Q1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        get_template("mistral_instruct").render(["", None])


def test_custom_template_is_a_plain_dataclass() -> None:
    t = Template("mine", "SYS", ("U", "A"), SepStyle.SINGLE, "\n")
    assert t.render(["hi", "yo"]) == "SYS\nU: hi\nA: yo\n"


# -- lookup and model-name rules ------------------------------------------------------------

def test_get_template_unknown_lists_names() -> None:
    with pytest.raises(ValueError) as err:
        get_template("nope")
    msg = str(err.value)
    assert "nope" in msg
    assert ", ".join(sorted(TEMPLATES)) in msg


@pytest.mark.parametrize(
    "model, expected",
    [
        ("llava-v1.5-7b", "llava_v1"),
        ("LLaVA-v1.5-13B", "llava_v1"),
        ("llava-v1.6-vicuna-7b", "llava_v1"),
        ("llava-v1.6-mistral-7b", "mistral_instruct"),
        ("llava-v1.6-34b", "chatml_direct"),
        ("llava-llama-2-13b-chat", "llava_llama_2"),
        ("llava-mpt-7b", "mpt"),
        ("foo", "llava_v0"),
    ],
)
def test_template_for_model(model: str, expected: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert template_for_model(model) == expected
        assert template_for_model(model, expected) == expected


def test_template_for_model_override_warns() -> None:
    with pytest.warns(UserWarning, match="vicuna_v1.*llava_v1"):
        assert template_for_model("llava-v1.5-7b", "vicuna_v1") == "vicuna_v1"
    with pytest.raises(ValueError):
        template_for_model("llava-v1.5-7b", "bogus")


# -- image_first --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("<image>\nWhat is this?", "<image>\nWhat is this?"),
        ("What is this?\n<image>", "<image>\nWhat is this?"),
        ("What is this? <image>", "<image>\nWhat is this?"),
        ("<image>", "<image>"),
        ("no image here", "no image here"),
    ],
)
def test_image_first(text: str, expected: str) -> None:
    assert image_first(text) == expected


def test_image_first_custom_token() -> None:
    assert image_first("Q\n<im>", image_token="<im>") == "<im>\nQ"
