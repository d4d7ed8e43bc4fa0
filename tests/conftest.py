import os

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Fuzz tests (tests/test_fuzz_*.py) run a few dozen examples each in CI, the same ones every run
# (derandomized: CI stays reproducible); the long run draws new ones every time:
#   LLAVA_FUZZ=long python -m pytest -q tests/test_fuzz_*.py      (3000 per test)
# Each example has a deadline, so a hang is a failure, not a stuck suite. 15 s, not 5: a default
# generation took 6.7 s on a 2-core machine busy with other work, which failed CI as "flaky".
_FUZZ_COMMON = dict(deadline=15000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=True)
settings.register_profile("ci", max_examples=40, derandomize=True, **_FUZZ_COMMON)
settings.register_profile("long", max_examples=3000, **_FUZZ_COMMON)
settings.load_profile(os.environ.get("LLAVA_FUZZ", "ci"))


@pytest.fixture(scope="session")
def tiny_tok():
    from llava.tiny import tiny_tokenizer

    return tiny_tokenizer()
