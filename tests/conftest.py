"""Shared fixtures: the offline data root, small random models, quiet logs."""
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Arrow caches of the tests' throw-away files go to a temporary folder, not the user's cache
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="twotower-test-datasets-"))
REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path | None:
    """$TWOTOWER_DATA (the Makefile and CI point it at ../shared/data when that exists)."""
    value = os.environ.get("TWOTOWER_DATA")
    return Path(value) if value and Path(value).is_dir() else None


@pytest.fixture
def shared_data_root() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("TWOTOWER_DATA is not set to the offline data folder")
    return root


@pytest.fixture(scope="session")
def tiny_encoder_factory():
    from twotower.common.model.encoder import tiny_bert

    return tiny_bert


@pytest.fixture
def encode_options_seen(monkeypatch) -> list:
    """The (bf16, compile) defaults each Encoder.encode call ran with (compiling itself is
    skipped: it takes tens of seconds)."""
    from twotower.common.model.encoder import Encoder

    seen = []
    original = Encoder.encode

    def spy(self, texts, *args, **kwargs):
        seen.append((self.encode_bf16, self.encode_compile))
        return original(self, texts, *args, **{**kwargs, "compile": False})
    monkeypatch.setattr(Encoder, "encode", spy)
    return seen
