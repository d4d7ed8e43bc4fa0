"""Generation: a batched prefill + decode engine with sampling, stop strings and streaming."""

from llava.generate.engine import Completion, ContextTooLong, DecodeState, Engine, Request
from llava.generate.sampling import SamplingParams

__all__ = ["Completion", "ContextTooLong", "DecodeState", "Engine", "Request", "SamplingParams"]
