import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def upstream_data() -> Path:
    """The reference project's data files beside the checkout; tests that need them skip where it is absent."""
    path = SHARED / "upstream-data"
    if not path.is_dir():
        pytest.skip("../shared/upstream-data is not available")
    return path


@pytest.fixture
def fresh_accelerate():
    """train.py builds an Accelerator per run; accelerate's singletons must not leak between in-process runs. One
    torch thread meanwhile. Yields the reset function for runs in between."""
    from psa_adapter.testing import fresh_accelerate as fresh

    with fresh() as reset:
        yield reset


@pytest.fixture
def fake_accelerate_env(tmp_path) -> dict:
    """An environment whose ``accelerate`` prints its arguments instead of launching (launcher tests)."""
    fake = tmp_path / "bin" / "accelerate"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake.chmod(0o755)
    return dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
