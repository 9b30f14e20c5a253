"""The toy world: a synthetic SAGE in which the whole PSA method runs on a CPU in minutes (issue 5).

- ``world``: scenes (coloured shapes) with one visual mark per harmful category; captions; ``WorldConfig``.
- ``tokenizer``: a word-level CLIP BPE tokenizer (every world word is one token).
- ``sage``: SAGE-format export (splits, ``metadata.jsonl``, users.csv) and prompt-set CSVs.
- ``base_model``: a tiny SD1.5-architecture ``StableDiffusionPipeline`` trained from scratch.
- ``judge``: a small CNN that reads marks, shape and colour; plays InPro, CLIPScore, FID and the LLM judge.
- ``measure``: generate with the base model and judge the images.

Command line: ``python -m psa_adapter.toyworld {train-base,train-judge,measure,make-data} --help``.
Shipped weights: ``trained_models/toy/base`` and ``trained_models/toy/judge``.
"""

from psa_adapter.toyworld.world import CATEGORIES, MARK_DESCRIPTIONS, Scene, ToyWorld, WorldConfig, category_slug

__all__ = ["CATEGORIES", "MARK_DESCRIPTIONS", "Scene", "ToyWorld", "WorldConfig", "category_slug"]
