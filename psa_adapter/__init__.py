"""Personalized Safety Alignment (PSA) adapters for Stable Diffusion 1.5 and SDXL."""

__version__ = "0.1.0"
__all__ = [
    "AdapterMismatchError",
    "PSAAdapter",
    "PSAAdapterConfig",
    "PSAStableDiffusionPipeline",
    "PSAStableDiffusionXLPipeline",
    "__version__",
    "load_psa_adapter",
    "unload_psa_adapter",
]
_ADAPTER = ("AdapterMismatchError", "PSAAdapter", "PSAAdapterConfig")
_LOADERS = ("PSAStableDiffusionPipeline", "PSAStableDiffusionXLPipeline", "load_psa_adapter", "unload_psa_adapter")


def __getattr__(name):
    # Lazy: `python -m psa_adapter.users ...` should not pay for importing torch and diffusers.
    if name in _ADAPTER:
        from psa_adapter import adapter

        return getattr(adapter, name)
    if name in _LOADERS:
        from psa_adapter import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'psa_adapter' has no attribute {name!r}")
