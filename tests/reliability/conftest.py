"""Fixtures of the reliability suite: a tiny workspace (SD1.5-style model, SAGE split, embeddings, users CSV) and a
fresh accelerate state for in-process training runs. Helpers are in reltools.py."""

from __future__ import annotations

import pytest
from reltools import USERS


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tiny SD1.5-style pipeline, a SAGE ``train`` split of three users and their ``.npy`` embeddings (E = 16)."""
    from psa_adapter.data.synthetic import write_npy_embeddings, write_tiny_sage, write_users_csv
    from psa_adapter.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("workspace")
    write_tiny_sage(root / "sage", "train", USERS)
    write_npy_embeddings(root / "embeds", USERS, dim=16)
    write_users_csv(root / "users.csv", USERS)
    save_tiny_pipeline("sd15", root / "sd15")
    return root


