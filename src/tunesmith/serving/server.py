"""`tunesmith serve`: build the app for a run (or model) plus extra adapters, and run it with uvicorn.

`serve(...)` blocks like the CLI; `BackgroundServer(...)` runs the same server in a thread (a notebook, a
test, the bench) and stops it on exit. Everything a user can get wrong is checked before the model loads.
"""
from __future__ import annotations

import errno
import socket
import threading
import time

import uvicorn

from ..errors import TunesmithError
from ..inference import load_for_inference, resolve_target, stop_token_ids
from .engine import Engine
from .handlers import Serving
from .registry import build_registry, check_same_base, parse_adapter_specs
from .routes import create_app

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
API_KEY_ENV = "TUNESMITH_API_KEY"


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server other machines can reach without a key."""
    if host in LOOPBACK or api_key:
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this machine can use the model; "
            f"set --api-key or {API_KEY_ENV}")


def check_settings(port: int, max_batch: int, max_queue: int) -> None:
    if not 0 <= port <= 65535:
        raise TunesmithError(f"--port {port}: must be between 0 and 65535 (0 picks a free port)")
    if max_batch < 1:
        raise TunesmithError(f"--max-batch {max_batch}: must be 1 or more")
    if max_queue < 1:
        raise TunesmithError(f"--max-queue {max_queue}: must be 1 or more")


def check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
            raise TunesmithError(f"--port {port} on {host} {why}: pick another port with --port") from None


def build_app(target: str, adapters: list[str] = (), base: bool = False, api_key: str | None = None,
              max_batch: int = 16, max_queue: int = 64):
    """The FastAPI app serving `target` (run folder, trained recipe or model) and `--adapter NAME=RUN` extras."""
    check_settings(0, max_batch, max_queue)
    extras = parse_adapter_specs(list(adapters))
    config, _ = resolve_target(target, base)
    check_same_base(config.model if config else target, extras)
    loaded = load_for_inference(target, base=base)
    registry = build_registry(loaded, target, extras)
    tok = loaded.tokenizer
    engine = Engine(loaded.model, tok.pad_token_id, stop_token_ids(tok), max_batch, max_queue)
    engine.adapters.prepare([m.stack for m in registry.models.values()] + [registry.as_loaded.stack])
    context = getattr(loaded.model.config, "max_position_embeddings", None) or tok.model_max_length
    return create_app(Serving(tok, engine, registry, context), api_key)


def serve(target: str, adapters: list[str] = (), host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, base: bool = False, max_batch: int = 16, max_queue: int = 64,
          on_ready=None) -> None:
    """Serve until interrupted. `on_ready(url, model_ids)` is called once the server listens."""
    check_settings(port, max_batch, max_queue)
    check_port_free(host, port)
    app = build_app(target, adapters, base, api_key, max_batch, max_queue)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    if on_ready is not None:
        _when_started(server, lambda: on_ready(_url(server, host), app.state.serving.registry.ids()))
    server.run()


def _url(server, host: str) -> str:
    port = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def _when_started(server, callback) -> None:
    def wait():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            callback()

    threading.Thread(target=wait, daemon=True).start()


class BackgroundServer:
    """The server in a background thread on a free local port: `with BackgroundServer(run) as s: s.url`."""

    def __init__(self, target: str, adapters: list[str] = (), api_key: str | None = None, base: bool = False,
                 max_batch: int = 16, max_queue: int = 64, host: str = "127.0.0.1", port: int = 0):
        check_settings(port, max_batch, max_queue)
        self.app = build_app(target, adapters, base, api_key, max_batch, max_queue)
        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise TunesmithError(f"the server did not start on {self.host}")
            time.sleep(0.02)
        self.url = _url(self.server, self.host)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
