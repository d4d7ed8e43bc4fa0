"""LLaVA: Large Language and Vision Assistant.

    import llava
    pipe = llava.load()                       # the bundled tiny model; or a folder / hub name
    print(pipe.generate("What is shown?", images="examples/shapes.png"))
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """See `llava.api.load` (imported lazily so `import llava` stays fast)."""
    from llava.api import load as _load

    return _load(*args, **kwargs)


__all__ = ["load", "__version__"]
