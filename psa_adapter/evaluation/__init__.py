"""Evaluation: metrics (InPro, FID, CLIPScore), the LLM judge, the driver and the tables.

Every metric and judge run writes per-image records (JSONL) and a ``summary.json`` holding ``n``, ``missing``
(or ``errors``), the value under the metric's own name and its 95% bootstrap interval (``<name>_ci``).
Statistics live in ``stats``; file writing in ``records``.
"""
