"""How the synthetic world's questions are worded: caption and description prompts, and the
question templates of each family (the classic world's few, the varied world's many).

The first template of each classic family is the canonical (eval) wording. The varied world
trains on `VARIED_TRAINING_TEMPLATES`: `VARIED_TEMPLATES` (the wordings the out-of-style set
calls "train") and, composed from `PARAPHRASE_FRAMES`, the same questions in the words people
use for them (colour or color; image, picture, photo or drawing; object, thing, figure or
item; questions that do not offer "left or right"). The wordings the out-of-style set holds out
(`HELDOUT_TEMPLATES`) are removed from every pool, compared without case.
"""

from __future__ import annotations

import itertools
import string

# Captions requests: the brief-description prompts of the original's LLaVA-Pretrain set.
CAPTION_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
DETAIL_PROMPTS = (
    "Describe the image in detail.",
    "What is in this image? Describe it in detail.",
    "Give a detailed description of the image.",
)

# The first template of each list is the canonical (eval) phrasing.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What color is the {shape}?", "What is the color of the {shape}?", "Which color is the {shape}?"),
    "shape": ("What shape is the {color} object?", "What is the shape of the {color} object?",
              "Which shape is {color}?"),
    "count": ("How many {plural} are there?", "How many {plural} are in the image?",
              "How many {plural} can you see?"),
    "exist": ("Is there a {color} {shape} in the image?", "Is there a {color} {shape}?",
              "Does the image contain a {color} {shape}?"),
    "position": ("Is the {a} to the left or right of the {b}?", "Is the {a} on the left or the right of the {b}?"),
    "word": ("What word is written in the image?", "What does the text in the image say?",
             "Which word is printed in the image?"),
}
# The varied world's hand-written wordings: the classic ones and many more, plus questions about a
# lone object that name nothing. The out-of-style set asks these as its "train" wordings, so they
# stay fixed; training adds composed ones (`VARIED_TRAINING_TEMPLATES`, below).
VARIED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": TEMPLATES["color"] + (
        "What is the {shape}'s color?", "Tell me what color the {shape} is.", "What color does the {shape} have?",
        "Which color does the {shape} have?", "What color is the {shape} in the image?",
        "Can you tell me the color of the {shape}?", "What is the color of the {shape} in the picture?",
        "What color has the {shape} got?", "Name the color of the {shape}."),
    "color_single": ("What color is the object?", "What is the color of the object?",
                     "Which color is the object in the picture?", "What color is this object?",
                     "Tell me the object's color.", "What color is the thing in the image?"),
    "shape": TEMPLATES["shape"] + (
        "What shape is the {color} one?", "What is the {color} object?", "Which shape has the color {color}?",
        "What kind of shape is the {color} object?", "Tell me the shape of the {color} object.",
        "The {color} object is which shape?", "What shape is the {color} thing?"),
    "shape_single": ("What shape is the object?", "What is the shape of the object?", "What shape is this object?",
                     "Which shape is shown?", "What shape can you see?", "Tell me the shape of the object.",
                     "What is drawn in the image?", "What shape is pictured?"),
    "count": TEMPLATES["count"] + (
        "How many {plural} are in the picture?", "How many {plural} are there in the image?",
        "What is the total number of {plural}?", "Count how many {plural} there are.",
        "How many {plural} does the image have?", "How many {plural} can be seen?",
        "How many {plural} are visible?", "Tell me how many {plural} there are."),
    "exist": TEMPLATES["exist"] + (
        "Is there a {color} {shape} in the picture?", "Does the picture have a {color} {shape}?",
        "Is any {color} {shape} in the image?", "Can you see a {color} {shape}?",
        "Is there a {color} {shape} anywhere in the image?", "Does this image show a {color} {shape}?",
        "Is a {color} {shape} shown?"),
    "position": TEMPLATES["position"] + (
        "Is the {a} to the left or to the right of the {b}?", "Relative to the {b}, is the {a} on the left or the right?",
        "Is the {a} left of the {b} or right of it?", "On which side of the {b} is the {a}, left or right?",
        "Looking at the {b}, is the {a} on its left or its right?"),
    "word": TEMPLATES["word"] + ("What is written in the image?", "What word can you read in the picture?",
                                 "What does the word in the image say?"),
}

# The colour of a group drawn in one colour ("What color are the squares?" about three green squares): the varied
# world's second edition asks it (`VARIED_2_TRAINING_TEMPLATES`).
GROUP_COLOR_TEMPLATES: tuple[str, ...] = ("What color are the {plural}?", "What is the color of the {plural}?",
                                          "Which color are the {plural}?")

# Wordings no training pool may use: the out-of-style evaluation's held-out paraphrases of each
# family (`llava.eval.out_of_style` asks them; tests check no training chat does).
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What color is the {shape} in this picture?", "Tell me the color of the {shape}.",
              "What colour is the {shape}?", "The {shape} is what color?",
              "What color is the shape in the image?", "What color is it?"),
    "shape": ("What is the {color} shape?", "Name the shape that is {color}.", "What shape is in the image?",
              "What kind of shape is this?", "Which shape is drawn here?"),
    "count": ("How many {plural} do you see?", "Count the {plural}.", "What is the number of {plural} in the picture?",
              "How many {plural} are shown?"),
    "exist": ("Do you see a {color} {shape}?", "Is a {color} {shape} present?",
              "Can you find a {color} {shape} in the picture?", "Is there any {color} {shape} here?"),
    "position": ("Which side of the {b} is the {a} on?", "Where is the {a} relative to the {b}, left or right?",
                 "Is the {a} left or right of the {b}?"),
}

# Frames with vocabulary slots, each filled every way: {C} colour word, {I} picture noun, {O}
# object noun; the question's own fields ({shape}, {color}, {plural}, {a}, {b}) stay fields.
VOCABULARY: dict[str, tuple[str, ...]] = {"C": ("color", "colour"), "I": ("image", "picture", "photo", "drawing"),
                                          "O": ("object", "thing", "figure", "item", "shape")}
PARAPHRASE_FRAMES: dict[str, tuple[str, ...]] = {
    "color": ("What {C} is the {shape}?", "What is the {C} of the {shape}?", "Which {C} is the {shape}?",
              "What {C} is the {shape} in the {I}?", "What is the {C} of the {shape} in the {I}?",
              "What is the {shape}'s {C}?", "Tell me what {C} the {shape} is.", "What {C} does the {shape} have?",
              "Can you tell me the {C} of the {shape}?", "Name the {C} of the {shape}.",
              "The {shape} has which {C}?", "In the {I}, what {C} is the {shape}?", "What's the {C} of the {shape}?",
              "Identify the {C} of the {shape}.", "Which {C} is the {shape} here?", "Say the {C} of the {shape}.",
              "What {C} is the {shape} drawn in?", "Give the {C} of the {shape} in the {I}."),
    "color_single": ("What {C} is the {O}?", "What is the {C} of the {O}?", "What {C} is this {O}?",
                     "Which {C} is the {O} in the {I}?", "Tell me the {O}'s {C}.", "What {C} do you see?",
                     "What's the {C} of this {O}?", "Which {C} is shown in the {I}?", "What {C} is the {O} here?"),
    "color_group": ("What {C} are the {plural}?", "What is the {C} of the {plural}?", "Which {C} are the {plural}?",
                    "What {C} are the {plural} in the {I}?", "What {C} are all the {plural}?",
                    "Tell me the {C} of the {plural}.", "What {C} do the {plural} have?",
                    "Name the {C} of the {plural}."),
    "shape": ("What shape is the {color} {O}?", "What is the shape of the {color} {O}?", "Which shape is {color}?",
              "What kind of shape is the {color} {O}?", "Tell me the shape of the {color} {O}.",
              "The {color} {O} is which shape?", "What is the {color} {O}?", "Which shape has the {C} {color}?",
              "Which shape is the {color} {O} in the {I}?", "What shape is {color}?",
              "Name the shape of the {color} {O}.", "What does the {color} {O} look like?",
              "What's the {color} {O}?", "Identify the {color} {O}.", "What is the {color} {O} in the {I}?"),
    "shape_single": ("What shape is the {O}?", "What is the shape of the {O}?", "What shape is this {O}?",
                     "What kind of shape is the {O}?", "What shape is in the {I}?", "What is drawn in the {I}?",
                     "Which shape do you see in the {I}?", "Name the shape.", "Identify the shape in the {I}.",
                     "What shape is shown here?"),
    "count": ("How many {plural} are in the {I}?", "How many {plural} are there in the {I}?",
              "How many {plural} are in this {I}?", "How many {plural} does the {I} have?",
              "How many {plural} appear in the {I}?", "How many {plural} are drawn?", "How many {plural} do you count?",
              "Count the {plural} in the {I}.", "Give the number of {plural}.", "What is the count of {plural}?",
              "How many {plural} are present?", "What number of {plural} is in the {I}?",
              "How many {plural} are in the {I} in total?"),
    "exist": ("Is there a {color} {shape} in the {I}?", "Does the {I} contain a {color} {shape}?",
              "Does the {I} have a {color} {shape}?", "Does the {I} show a {color} {shape}?",
              "Is a {color} {shape} visible?", "Is there a {color} {shape} here?",
              "Does the {I} include a {color} {shape}?", "Is a {color} {shape} in the {I}?",
              "Can a {color} {shape} be seen?", "Is there any {color} {shape}?",
              "Is a {color} {shape} drawn in the {I}?", "Do we see a {color} {shape} in the {I}?"),
    "position": ("On which side of the {b} is the {a}?", "Which side of the {b} is the {a} on, left or right?",
                 "Where is the {a} compared to the {b}: left or right?",
                 "Which side is the {a} on relative to the {b}?", "Is the {a} on the {b}'s left or right?",
                 "Where is the {a}, left or right of the {b}?", "Is the {a} placed left or right of the {b}?",
                 "On what side of the {b} is the {a}?", "Which way from the {b} is the {a}, left or right?",
                 "Is the {a} to the left of the {b}, or to the right?",
                 "Does the {a} sit to the left or the right of the {b}?",
                 "In the {I}, is the {a} left or right of the {b}?"),
}


def compose(frames: tuple[str, ...], vocabulary: dict[str, tuple[str, ...]] = VOCABULARY) -> tuple[str, ...]:
    """Every frame with its vocabulary slots filled every way, in order, without repeats."""
    out: dict[str, None] = {}
    for frame in frames:
        slots = sorted({name for _, name, _, _ in string.Formatter().parse(frame) if name in vocabulary})
        for words in itertools.product(*(vocabulary[slot] for slot in slots)):
            text = frame
            for slot, word in zip(slots, words):
                text = text.replace("{" + slot + "}", word)
            out[text] = None
    return tuple(out)


def _without_heldout(pool: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    heldout = {t.lower() for ts in HELDOUT_TEMPLATES.values() for t in ts}
    return {family: tuple(t for t in templates if t.lower() not in heldout) for family, templates in pool.items()}


VARIED_TRAINING_TEMPLATES: dict[str, tuple[str, ...]] = _without_heldout({
    family: tuple(dict.fromkeys(templates + compose(PARAPHRASE_FRAMES.get(family, ()))))
    for family, templates in VARIED_TEMPLATES.items()})


# The second edition's pool: the first's, and the colour of a group drawn alike.
VARIED_2_TRAINING_TEMPLATES: dict[str, tuple[str, ...]] = {**VARIED_TRAINING_TEMPLATES, **_without_heldout({
    "color_group": tuple(dict.fromkeys(GROUP_COLOR_TEMPLATES + compose(PARAPHRASE_FRAMES["color_group"])))})}


__all__ = ["CAPTION_PROMPTS", "DETAIL_PROMPTS", "GROUP_COLOR_TEMPLATES", "HELDOUT_TEMPLATES", "PARAPHRASE_FRAMES",
           "TEMPLATES", "VARIED_TEMPLATES", "VARIED_TRAINING_TEMPLATES", "VARIED_2_TRAINING_TEMPLATES", "VOCABULARY",
           "compose"]
