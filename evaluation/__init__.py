"""``python -m evaluation ...`` from the repository root: thin entry points; the logic is in
``psa_adapter.evaluation``."""
