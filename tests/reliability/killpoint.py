"""Run a script and SIGKILL it at a named point: ``python killpoint.py SPEC [SPEC ...] -- script.py ARGS...``.

Test-only; nothing in the library knows about it. It wraps one library function in this (child) process, then runs
the script as ``__main__``; when the wrapped function reaches the named point the process sends itself SIGKILL,
so nothing is cleaned up, flushed or closed, exactly as after ``kill -9`` or a lost machine. Deterministic: the
point is a call count or a file name, never a timer.

SPEC is ``WHEN:MODULE:ATTR[:ARG]``:

* ``call:M:A:N``   - kill on entering the N-th call of ``M.A`` (1-based)
* ``return:M:A:N`` - kill right after the N-th call of ``M.A`` returns
* ``torn:torch:save:SUBSTR`` - a ``torch.save`` to a path containing SUBSTR writes half its bytes, then kill
* ``torn:safetensors.torch:save_file:SUBSTR`` - the same for safetensors files
* ``torn:PIL.Image:Image.save:N`` - the N-th image save writes half its bytes, then kill
* ``torn:psa_adapter.evaluation.records:JsonlAppender.write:NAME#N`` - the N-th JSONL record appended to a file
  named NAME is written half, then kill

ATTR may be dotted (``Class.method``). Kill points fire at most once.
"""

from __future__ import annotations

import importlib
import io
import os
import runpy
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: max(1, len(data) // 2)])
        f.flush()
        os.fsync(f.fileno())


def _resolve(module: str, attr: str):
    owner = importlib.import_module(module)
    *parents, name = attr.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name, getattr(owner, name)


def install(spec: str) -> None:
    when, module, attr, *rest = spec.split(":", 3)
    arg = rest[0] if rest else "1"
    owner, name, original = _resolve(module, attr)
    state = {"calls": 0}

    def count() -> bool:
        state["calls"] += 1
        return state["calls"] == int(arg)

    if when == "call":
        def wrapper(*args, **kwargs):
            if count():
                _die()
            return original(*args, **kwargs)
    elif when == "return":
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            if count():
                _die()
            return result
    elif when == "torn" and (module, attr) == ("torch", "save"):
        def wrapper(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and arg in os.fspath(f):
                buf = io.BytesIO()
                original(obj, buf, *args, **kwargs)
                _write_half(f, buf.getvalue())
                _die()
            return original(obj, f, *args, **kwargs)
    elif when == "torn" and (module, attr) == ("safetensors.torch", "save_file"):
        def wrapper(tensors, filename, metadata=None, *args, **kwargs):
            if arg in os.fspath(filename):
                from safetensors.torch import save

                _write_half(filename, save(tensors, metadata=metadata))
                _die()
            return original(tensors, filename, metadata, *args, **kwargs)
    elif when == "torn" and attr == "Image.save":
        def wrapper(self, fp, *args, **kwargs):
            if count():
                buf = io.BytesIO()
                kwargs.setdefault("format", "PNG")
                original(self, buf, *args, **kwargs)
                _write_half(fp, buf.getvalue())
                _die()
            return original(self, fp, *args, **kwargs)
    elif when == "torn" and attr == "JsonlAppender.write":
        import json

        file_name, _, arg = arg.rpartition("#")

        def wrapper(self, record):
            if self.path.name == file_name and count():
                line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
                self._f.write(line[: len(line) // 2])
                self._f.flush()
                os.fsync(self._f.fileno())
                _die()
            return original(self, record)
    else:
        raise SystemExit(f"killpoint: unknown spec {spec!r}")
    setattr(owner, name, wrapper)


def main(argv: list[str]) -> None:
    split = argv.index("--")
    specs, target = argv[:split], argv[split + 1:]
    for spec in specs:
        install(spec)
    sys.argv = list(target)
    if target[0] == "-m":
        sys.argv = target[1:]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
