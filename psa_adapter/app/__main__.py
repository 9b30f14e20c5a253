"""``python -m psa_adapter.app``: serve the interactive page (see ``psa_adapter.app.server``)."""

import sys

from psa_adapter.app.server import main

if __name__ == "__main__":
    sys.exit(main())
