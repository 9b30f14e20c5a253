"""Exceptions shared by modules that must not import each other (``adapter.py`` loads ``reference.py``'s format)."""


class AdapterMismatchError(ValueError):
    """An adapter does not fit a UNet or a checkpoint does not fit an adapter."""


__all__ = ["AdapterMismatchError"]
