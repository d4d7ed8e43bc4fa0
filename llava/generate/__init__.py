"""Generation: a batched prefill + decode engine with sampling, stop strings and streaming."""

from llava._lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    **dict.fromkeys(["Completion", "ContextTooLong", "DecodeState", "Engine", "Request"], "llava.generate.engine"),
    "SamplingParams": "llava.generate.sampling",
})

__all__ = ["Completion", "ContextTooLong", "DecodeState", "Engine", "Request", "SamplingParams"]
