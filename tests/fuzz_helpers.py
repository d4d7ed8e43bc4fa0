"""What every fuzz test checks of a call: it answers, or raises the project's own error with a message."""

from llava.errors import LlavaError


def outcome(call):
    """The call's result, or the LlavaError it raised (with a message); any other exception fails the test."""
    try:
        return call()
    except LlavaError as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        return err
