"""How the synthetic world's questions are worded: caption and description prompts, and the
question templates of each family (the classic world's few, the varied world's many).

The first template of each classic family is the canonical (eval) wording.
"""

from __future__ import annotations

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
# The varied world's wordings: the classic ones and many more, plus questions about a lone object
# that name nothing. The out-of-style evaluation's held-out wordings
# (`llava.eval.out_of_style.HELDOUT_TEMPLATES`) must never appear here: a test checks.
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


__all__ = ["CAPTION_PROMPTS", "DETAIL_PROMPTS", "TEMPLATES", "VARIED_TEMPLATES"]
