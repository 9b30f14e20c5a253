"""Command line of the page: ``python -m psa_adapter.app [--port N] [--sd_model ...]``.

With no flags it serves the embedded toy world: the committed toy base model, the committed toy PSA adapter
(``trained_models/toy/psa``, trained with ``make demo``'s setting), the sentence encoder and the toy judge. The model
flags are ``infer.py``'s. The page listens on 127.0.0.1 unless ``--host`` says otherwise; ``--share`` (a public
Gradio link) is off unless asked for. A port in use is an error when ``--port`` names it; without ``--port`` the
first free port from 7860 up is taken.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from psa_adapter.app.engine import DEFAULT_LEVEL, TOY_BASE, TOY_PSA, AppError, AppSettings

DEFAULT_PORT = 7860
PORT_TRIES = 100


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(host: str, port: int | None) -> int:
    """``port`` when free (an ``AppError`` when in use); with None, the first free port from 7860 up."""
    if port is not None:
        if not 0 < port < 65536:
            raise AppError(f"--port must be between 1 and 65535, got {port}")
        if not port_free(host, port):
            raise AppError(f"port {port} on {host} is in use: pass another --port, or leave --port out to take the "
                           "next free port")
        return port
    for candidate in range(DEFAULT_PORT, DEFAULT_PORT + PORT_TRIES):
        if port_free(host, candidate):
            return candidate
    raise AppError(f"no free port on {host} in {DEFAULT_PORT}-{DEFAULT_PORT + PORT_TRIES - 1}; pass --port")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m psa_adapter.app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    web = parser.add_argument_group("server")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=int, default=None,
                     help=f"port (default: the first free one from {DEFAULT_PORT}); a port in use is an error")
    web.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    model = parser.add_argument_group("model (as infer.py)")
    model.add_argument("--sd_model", default=str(TOY_BASE),
                       help="diffusers pipeline folder or hub id, SD1.5 or SDXL (default: the toy base model)")
    model.add_argument("--psa_path", default=str(TOY_PSA),
                       help="PSA adapter folder or reference psa_adapter.bin (default: the committed toy adapter)")
    model.add_argument("--embeds_folder", default=None,
                       help="embedding store or folder of <User_ID>.npy: the level users' embeddings come from it")
    from psa_adapter.users import ENCODER_NAMES

    model.add_argument("--encoder", choices=ENCODER_NAMES, default=None,
                       help="user encoder for typed profiles (default: the one the adapter was trained with)")
    model.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    model.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                       help="weights dtype; auto = fp16 on CUDA, fp32 on CPU")
    model.add_argument("--steps", type=int, default=None,
                       help="denoising steps (default: the toy adapter's recorded 20, else 50 as infer.py)")
    model.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    model.add_argument("--psa_uncond", choices=("null", "off"), default=None,
                       help="unconditional branch of guidance: null = proj(0) (the paper's), off = zero tokens (a "
                            "named variant); default: the toy adapter's recorded 'off', else null as infer.py")
    model.add_argument("--psa_scale", type=float, default=1.0, help="the page's initial PSA scale (default 1)")
    model.add_argument("--level", default=DEFAULT_LEVEL, help=f"the page's initial level preset ({DEFAULT_LEVEL})")
    model.add_argument("--judge", default=None,
                       help="toy judge folder for the readings under the images (default: the toy judge on the toy "
                            "world, none otherwise; 'none' turns it off)")
    return parser


def settings_from_args(args: argparse.Namespace) -> AppSettings:
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return AppSettings(sd_model=args.sd_model, psa_path=args.psa_path, embeds_folder=args.embeds_folder,
                       encoder=args.encoder, device=device, dtype=args.dtype, steps=args.steps,
                       guidance=args.guidance, psa_uncond=args.psa_uncond, psa_scale=args.psa_scale,
                       judge=args.judge, level=args.level)


def launch(engine, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True):
    """Serve ``engine``'s page (requests queue, one runs at a time); returns ``(page, url)``.

    With ``block=False`` it returns once the server is up (tests); otherwise it serves until interrupted.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from psa_adapter.app.ui import CSS, build_page

    page = build_page(engine)
    page.queue(default_concurrency_limit=1)
    port = choose_port(host, port)
    try:
        page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                    theme=gr.themes.Soft(), css=CSS, footer_links=["api"])
    except OSError as err:  # lost a race for the port
        raise AppError(f"cannot serve on {host}:{port}: {err}") from None
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
    print(f"PSA page: {url}  (Ctrl+C stops it)", flush=True)
    if block:
        try:
            page.block_thread()
        finally:
            page.close()
    return page, url


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    try:
        if args.port is not None:
            choose_port(args.host, args.port)  # fail before the models load
        from psa_adapter.app.engine import Engine

        engine = Engine.load(settings_from_args(args))
        launch(engine, args.host, args.port, args.share)
    except AppError as err:
        print(f"python -m psa_adapter.app: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


__all__ = ["build_parser", "choose_port", "launch", "main", "port_free"]
