"""Personalized Safety Alignment (PSA) adapters for Stable Diffusion 1.5 and SDXL."""

__version__ = "0.1.0"
__all__ = ["AdapterMismatchError", "PSAAdapter", "PSAAdapterConfig", "__version__"]


def __getattr__(name):
    # Lazy: `python -m psa_adapter.users ...` should not pay for importing torch and diffusers.
    if name in ("AdapterMismatchError", "PSAAdapter", "PSAAdapterConfig"):
        from psa_adapter import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module 'psa_adapter' has no attribute {name!r}")
