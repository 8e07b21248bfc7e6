"""The one client for OpenAI-compatible servers: vLLM, ``transformers serve``, OpenAI itself.

Whatever asks a served model (``orpo compare``'s judge, ``orpo pairs``) goes through ``Endpoint``:
``chat`` and ``complete`` send one request, ``chat_many`` many at once (a few threads, the order
kept). A connection error, a 429 or a 5xx is retried a bounded number of times with a growing
pause (servers drop requests while they load a model or are full); anything else, and the last
retry, is one ``EndpointError`` line naming the URL, the status and the server's own message,
which the command line turns into exit status 2 (it is a ``ConfigError``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from orpo.config import ConfigError

RETRIES = 3
BACKOFF_S = 0.5
# a server's message is cut here: an HTML error page must stay one readable line
MAX_MESSAGE = 300
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class EndpointError(ConfigError):
    """A served model could not answer: one line with the URL, the status and the server's message.

    ``status`` (None when no HTTP reply came) and ``detail`` (the server's message) let a caller
    tell one refusal from another, e.g. a model that has no chat template."""

    def __init__(self, message: str, *, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


@dataclass
class _Session:
    """What an ``Endpoint`` learns and keeps while it is used: one HTTP client, the served model's name."""

    # re-entrant: ``served_model`` holds it while its first request makes the client
    lock: threading.RLock = field(default_factory=threading.RLock)
    client: httpx.Client | None = None
    model: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server; ``url`` with or without the trailing ``/v1``."""

    url: str
    model: str | None = None
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = RETRIES
    _session: _Session = field(default_factory=_Session, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise EndpointError(f"{self.url}: not an http(s) URL (e.g. http://localhost:8000/v1)")

    @property
    def base(self) -> str:
        """The API root every path is under: ``.../v1``."""
        base = self.url.strip().rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"

    def models(self) -> list[str]:
        """The names the server serves (``GET /models``): also the cheap check that it is there at all."""
        reply = self._request("GET", "/models")
        data = reply.get("data")
        if not isinstance(data, list):
            raise EndpointError(f"{self.base}/models: the reply has no 'data' list of models")
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    def served_model(self) -> str:
        """``model``, or the first model the server lists (asked once)."""
        if self.model is not None:
            return self.model
        with self._session.lock:
            if self._session.model is None:
                names = self.models()
                if not names:
                    raise EndpointError(f"{self.base}/models: the server lists no model; name one")
                self._session.model = names[0]
            return self._session.model

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
             top_p: float = 1.0) -> str:
        """The assistant's reply to ``messages`` (``POST /chat/completions``)."""
        body = self._body(max_tokens, temperature, seed, top_p) | {"messages": messages}
        choice = self._choice(self._request("POST", "/chat/completions", body), "/chat/completions")
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else ""

    def complete(self, prompt: str, *, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 top_p: float = 1.0) -> str:
        """The text that follows ``prompt`` (``POST /completions``): for models without a chat template."""
        body = self._body(max_tokens, temperature, seed, top_p) | {"prompt": prompt}
        text = self._choice(self._request("POST", "/completions", body), "/completions").get("text")
        return text if isinstance(text, str) else ""

    def chat_many(self, conversations: list[list[dict]], *, concurrency: int = 4, **kw: Any) -> list[str]:
        """``chat`` for each conversation, ``concurrency`` requests in flight; the replies in the same order."""
        return self._many(lambda messages: self.chat(messages, **kw), conversations, concurrency)

    def complete_many(self, prompts: list[str], *, concurrency: int = 4, **kw: Any) -> list[str]:
        """``complete`` for each prompt, ``concurrency`` requests in flight; the replies in the same order."""
        return self._many(lambda prompt: self.complete(prompt, **kw), prompts, concurrency)

    def close(self) -> None:
        with self._session.lock:
            if self._session.client is not None:
                self._session.client.close()
                self._session.client = None

    def _many(self, ask: Callable[[Any], str], items: list, concurrency: int) -> list[str]:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if concurrency == 1 or len(items) <= 1:
            return [ask(item) for item in items]
        # resolved once here, not by every thread at its first request
        self.served_model()
        with ThreadPoolExecutor(max_workers=min(concurrency, len(items))) as pool:
            return list(pool.map(ask, items))

    def _body(self, max_tokens: int, temperature: float, seed: int | None, top_p: float) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.served_model(), "max_tokens": max_tokens, "temperature": temperature,
                                "top_p": top_p}
        # sent only when asked: some servers refuse the field
        if seed is not None:
            body["seed"] = seed
        return body

    def _choice(self, reply: dict[str, Any], path: str) -> dict[str, Any]:
        choices = reply.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise EndpointError(f"{self.base}{path}: the reply has no 'choices'")
        return choices[0]

    def _client(self) -> httpx.Client:
        with self._session.lock:
            if self._session.client is None:
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                self._session.client = httpx.Client(timeout=self.timeout, headers=headers)
            return self._session.client

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON request, retried on what a busy or starting server answers; the reply's JSON object."""
        url = self.base + path
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._client().request(method, url, json=body)
            except httpx.TransportError as e:
                if last:
                    raise EndpointError(f"{url}: cannot reach the server ({_one_line(str(e)) or type(e).__name__})"
                                        ) from e
            else:
                if response.status_code < 400:
                    try:
                        reply = response.json()
                    except ValueError as e:
                        raise EndpointError(f"{url}: status {response.status_code} but the reply is not JSON") from e
                    if not isinstance(reply, dict):
                        raise EndpointError(f"{url}: the reply is not a JSON object")
                    return reply
                if last or response.status_code not in RETRY_STATUS:
                    detail = server_message(response)
                    raise EndpointError(f"{url}: status {response.status_code}: {detail}",
                                        status=response.status_code, detail=detail)
            time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")


def server_message(response: httpx.Response) -> str:
    """The server's own words: OpenAI's ``error.message``, FastAPI's ``detail``, or the text, on one line."""
    try:
        data = response.json()
    except ValueError:
        return _one_line(response.text) or response.reason_phrase
    message: Any = data
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            message = error["message"]
        elif error is not None:
            message = error
        elif "detail" in data:
            message = data["detail"]
        elif "message" in data:
            message = data["message"]
    return _one_line(message if isinstance(message, str) else str(message)) or response.reason_phrase


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."
