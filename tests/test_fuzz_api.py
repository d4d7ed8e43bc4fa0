"""Fuzzing the Python API: prompts with any number of `<image>` tags, chat messages of any shape,
and sampling parameters of every type end in an answer or a `LlavaError`, never another exception.

A few dozen examples each in CI; `LLAVA_FUZZ=long` for the long run (tests/conftest.py).
The pipeline is the bundled model (context 512 tokens), so even a huge `max_new_tokens`
ends within the context in well under the per-example deadline.
"""

from pathlib import Path

import PIL.Image
import pytest
from fuzz_helpers import outcome
from hypothesis import given
from hypothesis import strategies as st

import llava
from llava.errors import LlavaError

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [str(ROOT / "examples" / "circles.png"), PIL.Image.new("RGB", (7, 3), "red"),
          (ROOT / "examples" / "shapes.png").read_bytes()]


@pytest.fixture(scope="module")
def pipe():
    return llava.load(device="cpu")



any_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=20), st.binary(max_size=8))
any_value = st.recursive(any_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=6)
text_with_tags = st.lists(st.one_of(st.text(max_size=30), st.just("<image>"), st.just("\n"),
                                    st.just("</s>"), st.just("<s>"), st.just("USER:")), max_size=6).map("".join)
images = st.one_of(st.none(), st.sampled_from(IMAGES), st.lists(st.sampled_from(IMAGES), max_size=3), any_value)


@given(prompt=st.one_of(text_with_tags, any_value), images=images, raw=st.booleans())
def test_prompts_and_images(pipe, prompt, images, raw):
    result = outcome(lambda: pipe.generate(prompt, images=images, raw=raw, max_new_tokens=3))
    assert isinstance(result, (str, list, LlavaError))


sampling_values = {
    "temperature": st.one_of(st.floats(min_value=0, max_value=5), any_scalar),
    "top_p": st.one_of(st.floats(min_value=0, max_value=1.5), any_scalar),
    "top_k": st.one_of(st.integers(min_value=-2, max_value=10**6), any_scalar),
    "max_new_tokens": st.one_of(st.integers(min_value=-1, max_value=10**12), any_scalar),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3), any_value),
    "seed": st.one_of(st.integers(), any_scalar),
}


@given(sampling=st.fixed_dictionaries({}, optional=sampling_values), extra=st.booleans())
def test_sampling_parameters_of_every_type(pipe, sampling, extra):
    if extra:
        sampling["not_a_parameter"] = 1
    result = outcome(lambda: pipe.generate("How many circles?", images=IMAGES[0], **sampling))
    assert isinstance(result, (str, LlavaError))


part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(text_with_tags, any_scalar)}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.one_of(st.fixed_dictionaries({"url": st.sampled_from(IMAGES[:1])}),
                                                  any_value)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "audio", None, 3]),
                           "image": st.one_of(st.sampled_from(IMAGES), any_scalar)}),
    any_value,
)
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant"]), any_scalar)},
    optional={"content": st.one_of(text_with_tags, st.lists(part, max_size=3), any_value), "images": images})
messages = st.one_of(st.lists(st.one_of(message, any_value), max_size=5), any_value)


@given(messages=messages)
def test_chat_messages_of_any_shape(pipe, messages):
    result = outcome(lambda: pipe.chat(messages, max_new_tokens=3))
    assert isinstance(result, (str, LlavaError))


@given(messages=st.lists(message, min_size=1, max_size=5))
def test_streaming_chat(pipe, messages):
    result = outcome(lambda: "".join(pipe.stream(messages, max_new_tokens=3)))
    assert isinstance(result, (str, LlavaError))
