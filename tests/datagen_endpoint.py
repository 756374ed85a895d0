"""A scripted OpenAI-compatible endpoint for datagen tests: a ThreadingHTTPServer on a free port that answers
GET /v1/models and POST /v1/chat/completions from a Python function, records every request, and can be told
to fail (HTTP status, malformed body) for a while."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

Answer = Callable[[str, dict], str]  # (last user message, request body) -> reply text


class ScriptedEndpoint:
    def __init__(self, answer: Answer, model: str = "scripted"):
        self.answer = answer
        self.model = model
        self.requests: list[dict] = []
        self.fail_with: Optional[int] = None  # answer every chat request with this status while set
        self.fail_next: list[int] = []  # statuses for the next requests, one each
        self.fail_after: Optional[int] = None  # from this many chat requests on, answer 500
        self.malformed = False
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedEndpoint":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if "messages" in r]

    def _status(self) -> Optional[int]:
        with self._lock:
            if self.fail_next:
                return self.fail_next.pop(0)
            if self.fail_after is not None and len(self.chat_requests()) > self.fail_after:
                return 500
            return self.fail_with

    def _handler(self):
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict | str) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": endpoint.model, "object": "model",
                                                             "created": 0, "owned_by": "test"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint._lock:
                    endpoint.requests.append(body)
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    time.sleep(endpoint.delay)
                    status, reply = self._reply(body)
                finally:
                    # before the reply goes out: once the client has it, it may send its next request at once
                    with endpoint._lock:
                        endpoint.in_flight -= 1
                self._send(status, reply)

            def _reply(self, body: dict) -> tuple[int, dict]:
                status = endpoint._status()
                if status is not None:
                    return status, {"error": {"message": f"scripted {status}", "type": "test"}}
                if endpoint.malformed:
                    return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": endpoint.model,
                                 "choices": []}
                text = endpoint.answer(body["messages"][-1]["content"], body)
                return 200, {
                    "id": "x", "object": "chat.completion", "created": 0, "model": endpoint.model,
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

        return Handler
