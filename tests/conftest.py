import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tokenizer, tiny_model  # noqa: E402


@pytest.fixture
def gpt2_model():
    return tiny_model("gpt2")


@pytest.fixture
def tokenizer():
    return make_tokenizer()
