"""``python -m evaluation.judge ...``: the LLM judge (``psa_adapter.evaluation.judge``)."""
