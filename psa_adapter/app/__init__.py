"""The interactive page: a user (profile or level preset) and a prompt in, base and PSA images side by side.

``python -m psa_adapter.app`` (``make app``) serves it on 127.0.0.1. ``engine`` holds the models and the
computation (no web code), ``ui`` the Gradio page, ``server`` the command line and the port handling.
"""

from psa_adapter.app.engine import AppError, AppSettings, Engine, Picture, Request, Result, form_profile

__all__ = ["AppError", "AppSettings", "Engine", "Picture", "Request", "Result", "form_profile"]
