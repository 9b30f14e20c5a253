"""Validate SAGE splits; the same as ``python -m psa_adapter.data validate``.

Example: python dataset/validate_sage.py --root ../shared/upstream-data/sage --split val test_seen test_unseen \
    --no-images --users ../shared/upstream-data/users/users.csv
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the package

from psa_adapter.data.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
