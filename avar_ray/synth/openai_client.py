"""A teacher behind an OpenAI-compatible ``/chat/completions`` endpoint.

Bounded concurrency (a thread pool of ``concurrency`` requests per actor), a timeout per
request, and retries with exponential backoff and jitter on connection errors, timeouts, 429
and 5xx (honouring ``Retry-After``). Other 4xx answers fail at once. The API key is read from
the environment variable the config names and lives only inside a ``Secret``: it is sent in
the Authorization header and scrubbed from every error message, so it never reaches logs,
shards, quarantine records or provenance.
"""
from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import requests

from avar_ray.config import TeacherConfig
from avar_ray.synth.teachers import ChatRequest, TeacherError, teacher_name

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 20.0


class Secret:
    """A string that prints as ``***`` (repr, str, logs, pickled task arguments shown by Ray)."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def api_key_from_env(var: str, what: str) -> Optional[Secret]:
    """The key from ``$var``; None when no variable is configured (a server without auth)."""
    if not var:
        return None
    value = os.environ.get(var)
    if not value:
        raise ValueError(f"{what}: environment variable {var} (the API key) is not set")
    return Secret(value)


def backoff_delay(attempt: int, retry_after: Optional[str] = None, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): Retry-After when given, else
    exponential with full jitter, capped."""
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), BACKOFF_MAX_S)
        except ValueError:
            pass
    cap = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
    return (rng or random).uniform(cap / 2, cap)


class OpenAITeacher:
    def __init__(self, cfg: TeacherConfig, api_key: Optional[Secret]) -> None:
        if not cfg.base_url:
            raise ValueError("openai teacher: base_url is empty")
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.model = cfg.model
        self.name = teacher_name(cfg)
        self._key = api_key
        self.max_retries = cfg.max_retries
        self.timeout_s = cfg.timeout_s
        concurrency = max(1, cfg.concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-teacher")
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=concurrency)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def _scrub(self, text: str) -> str:
        if self._key is not None and self._key.reveal():
            text = text.replace(self._key.reveal(), "***")
        return text[:300]

    def _one(self, request: ChatRequest) -> str | TeacherError:
        body = {"model": self.model, "messages": request.messages, "max_tokens": request.max_tokens,
                "temperature": request.temperature, "seed": request.seed}
        headers = {"Authorization": f"Bearer {self._key.reveal()}"} if self._key is not None else {}
        last, retry_after = "no attempt", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(backoff_delay(attempt, retry_after))
                retry_after = None
            try:
                resp = self._session.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            except requests.Timeout:
                last = f"timeout after {self.timeout_s:g}s"
                continue
            except requests.RequestException as exc:
                last = f"connection error: {type(exc).__name__}"
                continue
            if resp.status_code == 200:
                try:
                    return str(resp.json()["choices"][0]["message"]["content"] or "")
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    return TeacherError("teacher error", f"malformed response: {type(exc).__name__}")
            last = f"HTTP {resp.status_code}: {self._scrub(resp.text)}"
            if resp.status_code not in RETRY_STATUS:
                return TeacherError("teacher error", last)
            retry_after = resp.headers.get("Retry-After")
        return TeacherError("teacher error", f"gave up after {self.max_retries + 1} attempts ({last})")

    def complete(self, requests_: list[ChatRequest]) -> list[str | TeacherError]:
        return list(self._pool.map(self._one, requests_))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()
