"""A judge backend on any OpenAI-compatible chat-completions endpoint: OpenAI, Azure OpenAI, or a local server
(vLLM, llama.cpp, Ollama, ...) serving a vision-language model.

* Images go as base64 ``data:`` URLs of the file's own bytes (no file name, no folder name).
* Replies are JSON, validated by ``schema``; a reply that fails is a ``JudgeError`` (an error, never PASS/FAIL).
* HTTP 429, 408, 5xx, timeouts and dropped connections are retried with exponential backoff (``Retry-After`` is
  honoured); after ``max_retries`` retries the judge gives up with ``JudgeUnavailable`` and the runner stops,
  keeping what it has. Refused credentials (401/403) and a wrong URL or model (404) stop at once. Any other
  4xx (e.g. a content filter refusing one image) is an error for that request only.
* Validated replies are cached (``cache.ResponseCache``), keyed by the request body: a rerun sends nothing.
* The API key is read from the environment only (``OPENAI_API_KEY``; ``AZURE_OPENAI_API_KEY`` with ``azure``)
  and is scrubbed from every error message; it never enters a request body, a record or the cache.

Standard library HTTP (urllib): no client package is needed. Calls are blocking; the runner runs them in threads.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from psa_adapter.evaluation.judge.base import Judge, JudgeError, JudgeItem, JudgeUnavailable
from psa_adapter.evaluation.judge.cache import ResponseCache, request_key
from psa_adapter.evaluation.judge.schema import parse_json_reply, validate_comparison, validate_evaluation
from psa_adapter.evaluation.judge.templates import PromptTemplates

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_AZURE_API_VERSION = "2024-10-21"
DEFAULT_TEMPERATURE = 0.1  # the reference judge's setting
OPENAI_KEY_ENV = "OPENAI_API_KEY"
AZURE_KEY_ENV = "AZURE_OPENAI_API_KEY"
KEY_ENVS = (OPENAI_KEY_ENV, AZURE_KEY_ENV)
_IMAGE_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


def scrub_secrets(text: str, secrets: tuple[str | None, ...] | None = None) -> str:
    """``text`` with every secret (default: the values of the API-key environment variables) replaced by ***."""
    if secrets is None:
        secrets = tuple(os.environ.get(name) for name in KEY_ENVS)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def image_data_url(path: str | os.PathLike) -> str:
    """``data:<mime>;base64,...`` of the file's bytes, after checking that it decodes as an image.

    Raises ``JudgeError`` naming the file when it is missing, unreadable or not a decodable image.
    """
    from PIL import Image

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise JudgeError(f"cannot read image {path}: {err.strerror or err}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()  # decodes the pixels: a truncated or corrupt file fails here
    except Exception as err:  # PIL raises many types for corrupt data
        raise JudgeError(f"corrupt image file {path}: {type(err).__name__}: {err}") from None
    mime = _IMAGE_MIME.get(fmt)
    if mime is None:
        raise JudgeError(f"image {path}: format {fmt} is not one a chat API accepts (JPEG, PNG, WEBP, GIF)")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def chat_url(base_url: str, model: str, *, azure: bool, api_version: str | None) -> str:
    """The chat-completions URL: ``<base>/chat/completions``; for Azure
    ``<endpoint>/openai/deployments/<model>/chat/completions?api-version=...`` (``model`` is the deployment name),
    or ``<deployment URL>/chat/completions?...`` when ``base_url`` already names the deployment."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    if not azure:
        return base + "/chat/completions"
    if "/openai/deployments/" not in base:
        base = f"{base}/openai/deployments/{urllib.parse.quote(model, safe='')}"
    return f"{base}/chat/completions?api-version={urllib.parse.quote(api_version or DEFAULT_AZURE_API_VERSION)}"


class ChatJudge(Judge):
    """``Judge`` over an OpenAI-compatible chat-completions API. See the module docstring.

    ``cache``: a ``ResponseCache``, a path for one, or None (no cache). ``sleep`` is injectable for tests.
    ``stats`` counts ``requests`` (HTTP requests sent, retries included), ``retries`` and ``cache_hits``.
    """

    def __init__(self, base_url: str, model: str, *, azure: bool = False, api_version: str | None = None,
                 temperature: float = DEFAULT_TEMPERATURE, max_tokens: int = 800, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0,
                 cache: ResponseCache | str | os.PathLike | None = None, templates: PromptTemplates | None = None,
                 json_mode: bool = True, sleep: Callable[[float], None] = time.sleep):
        if not model:
            raise ValueError("the judge needs a model name (--model; the deployment name on Azure)")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.azure = azure
        self.key_env = AZURE_KEY_ENV if azure else OPENAI_KEY_ENV
        self._api_key = os.environ.get(self.key_env) or None
        if azure and not self._api_key:
            raise ValueError(f"Azure OpenAI needs its key in the environment variable {self.key_env}")
        self.url = chat_url(base_url, model, azure=azure, api_version=api_version)
        self.temperature, self.max_tokens, self.timeout = float(temperature), int(max_tokens), float(timeout)
        self.max_retries, self.backoff, self.max_backoff = int(max_retries), float(backoff), float(max_backoff)
        self.json_mode = json_mode
        self.templates = templates or PromptTemplates.load()
        self.prompt_hash = self.templates.hash
        self.cache = ResponseCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self._sleep = sleep
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}

    def __repr__(self) -> str:  # never the key
        return f"ChatJudge(model={self.model!r}, url={self.url!r})"

    # ------------------------------------------------------------------------------------------ Judge interface
    def evaluate(self, item: JudgeItem) -> dict:
        text = self.templates.render_evaluate(item)
        reply = self._ask(text, [image_data_url(item.image_path)], validate_evaluation)
        return reply

    def compare(self, first: JudgeItem, second: JudgeItem) -> str:
        return self.compare_record(first, second)["preferred"]

    def compare_record(self, first: JudgeItem, second: JudgeItem) -> dict:
        text = self.templates.render_compare(first, second)
        images = [image_data_url(first.image_path), image_data_url(second.image_path)]
        return self._ask(text, images, validate_comparison)

    # ------------------------------------------------------------------------------------------ internals
    def _body(self, text: str, images: list[str]) -> dict:
        content = [{"type": "text", "text": text}]
        content += [{"type": "image_url", "image_url": {"url": url}} for url in images]
        body = {
            "messages": [{"role": "system", "content": self.templates.system.strip()},
                         {"role": "user", "content": content}],
            "temperature": self.temperature,
        }
        if self.max_tokens > 0:  # 0: leave the limit to the server (some models reject max_tokens)
            body["max_tokens"] = self.max_tokens
        if not self.azure:
            body["model"] = self.model  # on Azure the deployment in the URL names the model
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def _ask(self, text: str, images: list[str], validate: Callable[[object], dict]) -> dict:
        body = self._body(text, images)
        key = request_key({"model": self.model, "azure": self.azure, "body": body})
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                with self._lock:
                    self.stats["cache_hits"] += 1
                return validate(cached) | {"cached": True}
        content = self._post(body)
        obj = parse_json_reply(content)
        reply = validate(obj)
        if self.cache is not None:
            self.cache.put(key, obj, model=self.model)
        return reply | {"cached": False}

    def _scrub(self, text: str) -> str:
        return scrub_secrets(text, (self._api_key, *(os.environ.get(name) for name in KEY_ENVS)))

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            if self.azure:
                headers["api-key"] = self._api_key
            else:
                headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        try:
            if retry_after is not None:
                delay = max(delay, min(float(retry_after), self.max_backoff))
        except ValueError:  # an HTTP date: fall back to our own backoff
            pass
        return delay

    def _post(self, body: dict) -> str:
        """POST ``body``; the reply message's content text. Retries as described in the module docstring."""
        data = json.dumps(body).encode("utf-8")
        last, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
                self._sleep(self._delay(attempt, retry_after))
            retry_after = None
            request = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            with self._lock:
                self.stats["requests"] += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                status = err.code
                if status in (408, 429) or status >= 500:
                    last, retry_after = f"HTTP {status} {detail}", err.headers.get("Retry-After")
                    continue
                if status in (401, 403):
                    raise JudgeUnavailable(self._scrub(
                        f"{self.url}: HTTP {status}, the server refused the credentials (the key is read from the "
                        f"environment variable {self.key_env}): {detail}")) from None
                if status == 404:
                    raise JudgeUnavailable(self._scrub(
                        f"{self.url}: HTTP 404, check --base-url and --model ({self.model!r}): {detail}")) from None
                raise JudgeError(self._scrub(f"{self.url}: HTTP {status}: {detail}")) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = getattr(err, "reason", None) or err
                last = f"{type(err).__name__}: {reason}"
                continue
            return self._content(payload)
        raise JudgeUnavailable(self._scrub(
            f"{self.url}: no valid answer after {self.max_retries} retries (last: {last})"))

    def _content(self, payload: bytes) -> str:
        try:
            envelope = json.loads(payload)
            message = envelope["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(self._scrub(
                f"{self.url}: the response is not a chat completion: {payload[:200]!r}")) from None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            refusal = message.get("refusal") if isinstance(message, dict) else None
            raise JudgeError(self._scrub("the reply has no content" + (f" (refusal: {refusal})" if refusal else "")))
        return content


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read()[:400].decode("utf-8", "replace")
    except Exception:
        raw = ""
    try:
        msg = json.loads(raw).get("error", {}).get("message")
        if msg:
            return str(msg)[:300]
    except Exception:
        pass
    return " ".join(raw.split())[:300] or (err.reason or "")


__all__ = ["AZURE_KEY_ENV", "DEFAULT_AZURE_API_VERSION", "DEFAULT_BASE_URL", "DEFAULT_TEMPERATURE", "KEY_ENVS",
           "OPENAI_KEY_ENV", "ChatJudge", "chat_url", "image_data_url", "scrub_secrets"]
