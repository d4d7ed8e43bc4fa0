"""What lmms-eval's LMMS_EVAL_PLUGINS lookup reads: {model name: class name in models/<model name>.py}."""

AVAILABLE_MODELS = {"llava_pkg": "LlavaPkg"}
