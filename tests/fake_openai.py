"""A small OpenAI-compatible chat server for tests: ``POST /v1/chat/completions`` on 127.0.0.1.

It answers in the API's response format with text from a ``responder(request_json) -> str``
the test supplies, checks the bearer key, and can inject failures (HTTP 5xx / 429, slow
answers) to exercise the client's retries and timeouts. Bounded: loopback only, request
bodies capped, a socket timeout, a cap on requests served, and ``close()`` (or ``with``)
stops it.

    with FakeOpenAI(responder, api_key="k") as server:
        server.base_url   # http://127.0.0.1:PORT/v1
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_REQUESTS = 10_000
SOCKET_TIMEOUT_S = 30


def user_text(request: dict) -> str:
    """All text parts of the request's user messages, joined."""
    parts = []
    for message in request.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if p.get("type") == "text")
    return "\n".join(parts)


class FakeOpenAI:
    def __init__(self, responder: Callable[[dict], str], api_key: Optional[str] = None,
                 delay_s: float = 0.0, failures: Optional[Callable[[dict, int], Optional[int]]] = None) -> None:
        """``failures(request, attempt)`` may return an HTTP status to answer instead (attempt
        counts this request body's arrivals from 1); ``delay_s`` delays every answer."""
        self.responder, self.api_key, self.delay_s, self.failures = responder, api_key, delay_s, failures
        self.lock = threading.RLock()
        self.served = 0
        self.attempts: dict[str, int] = {}
        self.statuses: list[int] = []
        self.max_in_flight = 0
        self._in_flight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            timeout = SOCKET_TIMEOUT_S

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                with fake.lock:  # before the answer leaves: the client may check right after it
                    fake.statuses.append(status)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    return self._send(413, {"error": {"message": "request too large"}})
                with fake.lock:
                    if fake.served >= MAX_REQUESTS:
                        return self._send(503, {"error": {"message": "request cap reached"}})
                    fake.served += 1
                raw = self.rfile.read(length)
                if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                request = json.loads(raw)
                key = raw.decode(errors="replace")
                with fake.lock:
                    fake.attempts[key] = attempt = fake.attempts.get(key, 0) + 1
                    fake._in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake._in_flight)
                try:
                    status = fake.failures(request, attempt) if fake.failures else None
                    if fake.delay_s:
                        time.sleep(fake.delay_s)
                    if status:
                        return self._send(status, {"error": {"message": f"injected {status}"}})
                    text = fake.responder(request)
                    self._send(200, {
                        "id": f"chatcmpl-{fake.served}", "object": "chat.completion", "created": int(time.time()),
                        "model": request.get("model", ""),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                    })
                finally:
                    with fake.lock:
                        fake._in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-openai", daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAI":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
