import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tokenizer, tiny_model  # noqa: E402


@pytest.fixture
def gpt2_model():
    return tiny_model("gpt2")


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine two threads made traces 80x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
