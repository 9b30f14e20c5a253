import sys

from psa_adapter.evaluation.judge.cli import main

sys.exit(main())
