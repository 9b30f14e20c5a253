import sys

from psa_adapter.evaluation.cli import main

sys.exit(main())
