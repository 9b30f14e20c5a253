"""A scriptable OpenAI-compatible chat-completions server on 127.0.0.1, for the judge's tests and benchmark.

``FakeChatServer(responder, latency=...)`` serves ``POST .../chat/completions`` from a thread; ``responder(body)``
(the parsed request body) returns ``(status, payload)`` or ``(status, payload, headers)``. Every request (path,
headers, raw body) is kept in ``server.requests`` so a test can check what was sent. ``completion`` and
``http_error`` build payloads; ``colour_responder`` is a deterministic judge that looks at the pixels it is sent
(bluer is better).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

Responder = Callable[[dict], tuple[int, object]]


def completion(content: str | dict) -> tuple[int, dict]:
    """A 200 chat completion whose message content is ``content`` (a dict is sent as its JSON text)."""
    text = json.dumps(content) if isinstance(content, dict) else content
    return 200, {"id": "fake", "object": "chat.completion", "model": "fake",
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


def http_error(status: int, message: str = "error", headers: dict | None = None) -> tuple:
    """An error reply in the OpenAI shape; ``headers`` (e.g. ``{"Retry-After": "2"}``) are sent with it."""
    payload = {"error": {"message": message, "type": "fake_error"}}
    return (status, payload) if headers is None else (status, payload, headers)


def request_images(body: dict) -> list[np.ndarray]:
    """The images of a request, decoded from their data URLs, as (H, W, 3) uint8 arrays in message order."""
    from PIL import Image

    images = []
    for message in body.get("messages", []):
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                data = base64.b64decode(url.split(",", 1)[1])
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return images


def request_text(body: dict) -> str:
    """All text of a request (system and user messages)."""
    parts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [p.get("text", "") for p in content or [] if p.get("type") == "text"]
    return "\n".join(parts)


def blueness(image: np.ndarray) -> float:
    """Mean blue minus mean red, in [-255, 255]."""
    return float(image[..., 2].astype(np.float64).mean() - image[..., 0].astype(np.float64).mean())


def colour_responder(body: dict) -> tuple[int, dict]:
    """A deterministic judge: one image is PASS when it is more blue than red; of two images the bluer one is
    better ("equal" when equally blue)."""
    images = request_images(body)
    if len(images) == 1:
        ok = blueness(images[0]) > 0
        return completion({"banned_categories_respected": ok, "banned_categories_found": [] if ok else ["Violence"],
                           "allowed_categories_respected": True, "quality_score": 70,
                           "appropriateness_score": 90 if ok else 20,
                           "overall_assessment": "PASS" if ok else "FAIL", "explanation": "colour rule"})
    if len(images) == 2:
        d = blueness(images[0]) - blueness(images[1])
        return completion({"better_image": "1" if d > 0 else "2" if d < 0 else "equal", "explanation": "colour"})
    return http_error(400, f"expected 1 or 2 images, got {len(images)}")


class FakeChatServer:
    """Context manager: a threaded HTTP server on 127.0.0.1 (a free port); ``base_url`` ends in ``/v1``."""

    def __init__(self, responder: Responder = colour_responder, *, latency: float = 0.0):
        self.responder = responder
        self.latency = latency
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeChatServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with owner._lock:
                    owner.requests.append({"path": self.path, "headers": dict(self.headers), "body": raw})
                if owner.latency:
                    time.sleep(owner.latency)
                if not self.path.split("?")[0].endswith("/chat/completions"):
                    status, payload = http_error(404, f"no route {self.path}")
                else:
                    try:
                        status, payload, *extra = owner.responder(json.loads(raw))
                    except Exception as err:  # a broken responder is a 500, as a real server would answer
                        status, payload, extra = *http_error(500, f"responder failed: {type(err).__name__}"), []
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def bodies(self) -> list[bytes]:
        with self._lock:
            return [r["body"] for r in self.requests]


__all__ = ["FakeChatServer", "blueness", "colour_responder", "completion", "http_error", "request_images",
           "request_text"]
