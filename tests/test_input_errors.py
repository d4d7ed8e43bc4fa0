"""Bad input to the Python API and the `llava` command: one typed error naming the problem.

API: a `llava.errors.LlavaError` subclass (that also subclasses the fitting builtin). CLI: one
line on stderr, exit 2, no traceback, and argument checks before the model loads.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llava
from llava.errors import (
    ContextTooLong,
    DeviceError,
    ImageError,
    InputError,
    InputTypeError,
    LlavaError,
    PromptError,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "examples" / "circles.png")
GREEDY = dict(temperature=0.0, max_new_tokens=4)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


@pytest.fixture(scope="module")
def pipe():
    return llava.load(device="cpu")


def _cli(*args, stdin=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "llava.cli", *args], capture_output=True, text=True, input=stdin,
                          env=ENV, timeout=timeout, cwd=ROOT)


def test_every_error_is_a_llava_error_and_its_builtin():
    assert issubclass(ImageError, ValueError) and issubclass(ImageError, LlavaError)
    assert issubclass(InputTypeError, TypeError) and issubclass(ContextTooLong, PromptError)
    from llava.errors import CheckpointNotFound, OutputPathError
    assert issubclass(CheckpointNotFound, FileNotFoundError) and issubclass(OutputPathError, OSError)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(device="cuda:0" if not __import__("torch").cuda.is_available() else "cuda:99"), DeviceError, "cuda"),
    (dict(device="mps"), DeviceError, "mps"),
    (dict(device="gpu"), DeviceError, "unknown device 'gpu'"),
    (dict(device=3), InputTypeError, "device"),
    (dict(dtype="float99"), InputError, "unknown dtype 'float99'"),
    (dict(quantize="3bit"), InputError, "unknown quantize mode '3bit'"),
    (dict(template="no-such-template"), InputError, "unknown conversation template"),
    (dict(path=123), InputTypeError, "path must be"),
])
def test_load_arguments_are_checked_before_the_weights(kwargs, error, words, tmp_path):
    if kwargs.get("device") == "mps" and __import__("torch").backends.mps.is_available():
        pytest.skip("this machine has MPS")
    kwargs.setdefault("path", tmp_path / "no-such-model")  # were it looked at first, this would be the error
    with pytest.raises(error, match=words):
        llava.load(**kwargs)


@pytest.mark.parametrize("call, error, words", [
    (lambda p: p.generate("What?", images=123), InputTypeError, "images must be a path"),
    (lambda p: p.generate("What?", images=[IMAGE, 4.5]), InputTypeError, r"images\[1\]"),
    (lambda p: p.generate(None), InputTypeError, "prompts must be a string"),
    (lambda p: p.generate(["a", None]), InputTypeError, "prompt must be a string"),
    (lambda p: p.generate(["a", "b"], images=IMAGE), InputTypeError, "one entry per prompt"),
    (lambda p: p.generate(["a", "b"], images=[None]), InputError, "2 prompts but 1 image"),
    (lambda p: p.generate("What?", stop=123), InputTypeError, "stop must be a string or a list"),
    (lambda p: p.generate("What?", temperature="hot"), InputTypeError, "temperature must be a number"),
    (lambda p: p.generate("What?", temperature=float("nan")), InputError, "temperature must be a finite"),
    (lambda p: p.generate("What?", max_new_tokens=0), InputError, "max_new_tokens must be >= 1"),
    (lambda p: p.generate("What?", max_new_tokens=2.5), InputTypeError, "max_new_tokens must be an integer"),
    (lambda p: p.generate("What?", top_p=0), InputError, "top_p"),
    (lambda p: p.generate("What?", seed=2**80), InputError, "seed must fit"),
    (lambda p: p.generate("What?", temprature=0.1), InputTypeError, "unknown sampling argument"),
    (lambda p: p.chat([{"role": "user"}]), PromptError, "message 0 .user. has no content"),
    (lambda p: p.chat([{"role": "user", "content": "  "}]), PromptError, "has no content"),
    (lambda p: p.chat("hi"), InputTypeError, "messages must be a list"),
    (lambda p: p.chat([]), PromptError, "the last message must be the user's"),
    (lambda p: p.chat(["hi"]), InputTypeError, "message 0 must be a dict"),
    (lambda p: p.chat([{"role": "user", "content": 5}]), InputTypeError, "content must be a string"),
    (lambda p: p.chat([{"role": "bot", "content": "x"}]), PromptError, "expected role 'user'"),
    (lambda p: p.chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                       {"role": "user", "content": "c"}]), PromptError, "expected role 'assistant'"),
    (lambda p: p.chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "images": [IMAGE]},
                       {"role": "user", "content": "c"}]), PromptError, "images belong in user messages"),
    (lambda p: p.chat([{"role": "user", "content": [{"type": "audio"}]}]), PromptError, "content.0. must be a text"),
    (lambda p: p.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), PromptError,
     "without an image"),
    (lambda p: p.generate("<image> <image>", images=IMAGE), PromptError, "2 <image> tag"),
    (lambda p: p.generate("word " * 2000), ContextTooLong, "context length"),
    (lambda p: p.generate("What?", images=str(ROOT / "examples")), ImageError, "examples"),
])
def test_api_errors_are_typed_and_name_the_problem(pipe, call, error, words):
    with pytest.raises(error, match=words):
        call(pipe)


def test_content_parts_and_tiny_temperatures_work(pipe):
    parts = [{"type": "image_url", "image_url": {"url": IMAGE}},
             {"type": "text", "text": "How many circles are there?"}]
    as_parts = pipe.prepare_chat([{"role": "user", "content": parts}])
    as_images = pipe.prepare_chat([{"role": "user", "content": "How many circles are there?", "images": [IMAGE]}])
    assert as_parts.prompt == as_images.prompt and as_parts.request.input_ids == as_images.request.input_ids
    greedy = pipe.generate("Say it.", images=IMAGE, **GREEDY)
    assert pipe.generate("Say it.", images=IMAGE, temperature=1e-300, max_new_tokens=4) == greedy
    assert pipe.generate("Say it.", images=IMAGE, temperature=1.0, top_p=1e-300, max_new_tokens=4) == greedy
    assert isinstance(pipe.generate("Say it.", temperature=1e300, max_new_tokens=4, seed=1), str)


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cases = [
        (["run", "--device", "cuda:7" if not __import__("torch").cuda.is_available() else "cuda:99", "--query", "hi"],
         "cuda"),
        (["run", "--image", str(folder), "--query", "hi"], "is a directory"),
        (["run", "--image", str(tmp_path / "missing.png"), "--query", "hi"], "missing.png"),
        (["run", "--query", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["run", "--query", "hi", "--template", "nope"], "unknown conversation template 'nope'"),
        (["run", "--model", str(tmp_path / "no-model"), "--query", "hi"], "no-model"),
    ]
    for args, words in cases:
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and lines[0].startswith("llava run: error:"), (args, out.stderr)


def test_arguments_fail_before_the_model_loads(tmp_path):
    """The model path is bad too: the image and sampling errors win because they are checked first."""
    missing_model = str(tmp_path / "no-model")
    out = _cli("run", "--model", missing_model, "--image", str(tmp_path / "missing.png"), "--query", "hi")
    assert out.returncode == 2 and "missing.png" in out.stderr and "no-model" not in out.stderr
    out = _cli("run", "--model", missing_model, "--query", "hi", "--top-p", "2")
    assert out.returncode == 2 and "top_p" in out.stderr
    out = _cli("run", "--model", missing_model, "--query", "hi", "--device", "tpu")
    assert out.returncode == 2 and "tpu" in out.stderr


@pytest.mark.parametrize("command", [["run", "--query", "hi"], ["chat"]])
def test_a_missing_image_fails_without_importing_torch(command, tmp_path):
    """Well under a second: neither torch nor transformers is imported before the image is checked.

    Importing them is ~3 s of a cold start, so this is what "fails at once" means, without a timed test.
    """
    code = ("import sys\nfrom llava.cli import main\n"
            f"rc = main({command + ['--image', str(tmp_path / 'missing.png')]!r})\n"
            "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert out.stdout.split("\n")[0] == "2 []", out.stdout + out.stderr
    assert "missing.png" in out.stderr


def test_ctrl_c_ends_without_a_traceback():
    """A real SIGINT during start-up and right after the answer: a quiet end, never a traceback."""
    command = [sys.executable, "-m", "llava.cli", "run", "--image", IMAGE, "--query", "How many circles?",
               "--max-new-tokens", "4"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    time.sleep(1.0)  # importing torch / loading the model
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode in (130, -signal.SIGINT) or (proc.returncode == 0 and out.strip()), (proc.returncode, err)

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    answer = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)  # during interpreter shut-down, when torch's exit hooks run
    _, err = proc.communicate(timeout=60)
    assert answer.strip() and "Traceback" not in err and "Exception ignored" not in err, err


def test_ctrl_c_inside_a_finaliser_still_stops_the_command_quietly(tmp_path):
    """A SIGINT that lands in a `__del__` (as one did in regex's, while transformers imported) ends the run.

    Python cannot raise from a finaliser: unhandled, it prints "Exception ignored in" with a
    traceback and goes on as if Ctrl-C had never been pressed; here the 30-s sleep must be cut short.
    """
    script = tmp_path / "finaliser.py"
    script.write_text(
        "import signal, time\n"
        # as in a terminal: a launcher that runs the suite in the background (`cmd &` without job control)
        # leaves SIGINT ignored, and the child would inherit that (seen in session 40)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from llava.console import exit_with, run_command\n"
        "class Finaliser:\n"
        "    def __del__(self):\n"
        "        signal.raise_signal(signal.SIGINT)  # handled at the next bytecode, still in here\n"
        "        sum(range(1000))\n"
        "def command():\n"
        "    Finaliser()\n"
        "    time.sleep(30)\n"
        "    print('not interrupted')\n"
        "    return 0\n"
        "exit_with(run_command('demo', command))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=20)
    assert (out.returncode, out.stdout, out.stderr.strip()) == (130, "", "demo: interrupted"), out


def test_chat_takes_multi_line_messages_and_short_toggle(pipe):
    from llava.serve.cli import SHORT_ANSWER, chat_loop

    inputs = iter(["How many \\", "circles are there?", "/short", "And now?", ""])
    written, seen = [], []
    original_stream = pipe.stream

    def spy(messages, **kw):
        seen.append(messages[-1]["content"])
        return original_stream(messages, **kw)

    pipe.stream = spy
    try:
        chat_loop(pipe, [IMAGE], dict(GREEDY), read=lambda _: next(inputs), write=written.append)
    finally:
        del pipe.stream
    assert seen == ["How many \ncircles are there?", "And now?" + SHORT_ANSWER]
    assert "[short answers on;" in "".join(written)


def test_chat_keeps_going_after_a_bad_turn(pipe):
    from llava.serve.cli import chat_loop

    inputs, written = iter(["<image> twice <image>", "How many circles?", ""]), []
    chat_loop(pipe, [IMAGE], dict(GREEDY), read=lambda _: next(inputs), write=written.append)
    text = "".join(written)
    assert "<image> tag" in text and text.count("ASSISTANT:") == 2 and text.rstrip().endswith("exit...")


def test_cli_chat_accepts_continued_lines():
    out = _cli("chat", "--image", IMAGE, "--temperature", "0", "--max-new-tokens", "4", "--short",
               stdin="How many \\\ncircles are there?\n\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ASSISTANT:") == 1 and "... " in out.stdout


def test_internal_bugs_are_reported_in_one_line(capsys):
    from llava.console import run_command

    def buggy() -> int:
        raise ZeroDivisionError("division by zero")

    assert run_command("llava x", buggy) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" in err and "LLAVA_DEBUG=1" in err
