"""Personalized Safety Alignment (PSA) adapters for Stable Diffusion 1.5 and SDXL."""

from psa_adapter.adapter import AdapterMismatchError, PSAAdapter, PSAAdapterConfig

__version__ = "0.1.0"
__all__ = ["AdapterMismatchError", "PSAAdapter", "PSAAdapterConfig", "__version__"]
