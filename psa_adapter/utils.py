"""Small helpers shared across the package: atomic file writes, image grids, torch thread counts."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch CPU threads, then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then move it over ``target``.

    Readers never see half a file, and an interrupted write leaves the previous ``target`` intact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class NotUTF8Error(ValueError):
    """A text file with bytes that are not UTF-8; the message names the file, the line and the byte."""


def not_utf8_message(path, data: bytes, err: UnicodeDecodeError) -> str:
    """``"<path> line N: not UTF-8 text (byte 0xE9 at column C) ..."`` for ``err`` raised decoding ``data``."""
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return (f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02X} at column {column}); "
            "save the file as UTF-8")


def read_utf8(path: str | os.PathLike, *, bom: bool = False, translate_newlines: bool = True) -> str:
    """The text of a UTF-8 file, as ``Path.read_text`` gives it (``\r\n`` and ``\r`` become ``\n`` unless
    ``translate_newlines`` is False; ``bom``: a leading byte-order mark is dropped); NotUTF8Error naming the file
    and the line otherwise. OSError (e.g. FileNotFoundError) passes through."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as err:
        raise NotUTF8Error(not_utf8_message(path, data, err)) from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if translate_newlines else text


def yaml_error_message(path: str | os.PathLike, err: Exception) -> str:
    """One line for a YAML parse error: ``"<path> line L, column C: <problem>"`` (PyYAML's own text spans several
    lines and draws a caret under a copy of the line)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{path}{where}: invalid YAML ({problem})"


def image_grid(images: Sequence, cols: int, *, border: int = 0, scale: int = 1, background="white"):
    """Tile equal-size images row by row, ``cols`` per row (the last row may be short), into one PIL RGB image.

    ``images``: PIL images or uint8 (H, W, 3) arrays. Each image gets ``border`` pixels of ``background`` on every
    side; the whole grid is then enlarged ``scale`` times by nearest neighbour (pixels stay sharp). The result is
    ``(cols * (W + 2 * border) * scale)`` wide and ``(rows * (H + 2 * border) * scale)`` high.
    (``diffusers.utils.make_image_grid`` is this with no border, no short row and no scaling.)
    """
    import numpy as np
    from PIL import Image

    pictures = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
    if not pictures or cols < 1:
        raise ValueError(f"image_grid needs at least one image and cols >= 1, got {len(pictures)} images, cols={cols}")
    width, height = pictures[0].size
    sizes = {im.size for im in pictures}
    if len(sizes) > 1:
        raise ValueError(f"image_grid needs images of one size, got {sorted(sizes)}")
    cell_w, cell_h = width + 2 * border, height + 2 * border
    rows = -(-len(pictures) // cols)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), background)
    for i, im in enumerate(pictures):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (c * cell_w + border, r * cell_h + border))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid
