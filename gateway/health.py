"""HTTP endpoints for operations: ``/metrics``, ``/healthz`` and ``/readyz``.

:class:`HealthServer` runs a small threaded HTTP server on
``metrics.host:port``. The caller owns its life cycle (``start()`` /
``stop()``, or use it as a context manager).

- ``/metrics``: the Prometheus text exposition of :data:`gateway.metrics.REGISTRY`.
- ``/healthz``: 200 while the process can answer at all.
- ``/readyz``: runs every registered readiness check; 200 when all pass,
  503 otherwise. The body names the failing checks and nothing else: a check
  that raises is reported as failing, and its exception text (which might
  carry a value) is never written to the response.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway import metrics

#: A readiness check: returns True when ready. Raising counts as not ready.
Check = Callable[[], bool]

_CHECK_NAME: Final = re.compile(r"[a-z][a-z0-9_.:-]{0,63}")


class HealthServer:
    """Serve metrics, liveness and readiness over HTTP on a background thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9464,
        *,
        registry: CollectorRegistry = metrics.REGISTRY,
    ) -> None:
        """Prepare the server; nothing is bound until :meth:`start`.

        ``port`` 0 binds a free port, readable from :attr:`port` after start.
        """
        self._host = host
        self._requested_port = port
        self._registry = registry
        self._checks: dict[str, Check] = {}
        self._checks_lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_check(self, name: str, check: Check) -> None:
        """Register (or replace) a readiness check under a short plain name.

        Names such as ``listening``, ``spool-writable``, ``key-loaded`` or
        ``destination:PACS_A`` appear in the ``/readyz`` body, so they must
        not be built from data values.
        """
        if not _CHECK_NAME.fullmatch(name):
            raise ValueError("check name must be a short lowercase plain name")
        with self._checks_lock:
            self._checks[name] = check

    def remove_check(self, name: str) -> None:
        """Forget a readiness check; unknown names are ignored."""
        with self._checks_lock:
            self._checks.pop(name, None)

    def failing_checks(self) -> list[str]:
        """Run every check now and return the names of those that fail, sorted."""
        with self._checks_lock:
            checks = list(self._checks.items())
        failing: list[str] = []
        for name, check in checks:
            try:
                ok = check() is True
            except Exception:  # a broken check means not ready, whatever broke it
                ok = False
            if not ok:
                failing.append(name)
        return sorted(failing)

    @property
    def port(self) -> int:
        """The bound port; only valid while started."""
        if self._httpd is None:
            raise RuntimeError("server is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:9464``."""
        return f"http://{self._host}:{self.port}"

    def start(self) -> None:
        """Bind the socket and serve on a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("server is already started")
        httpd = ThreadingHTTPServer((self._host, self._requested_port), _make_handler(self))
        httpd.daemon_threads = True
        thread = threading.Thread(
            target=httpd.serve_forever, name="deid-gateway-health", daemon=True
        )
        thread.start()
        self._httpd, self._thread = httpd, thread

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call when not started."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _metrics_body(self) -> bytes:
        return generate_latest(self._registry)


def writable_directory_check(directory: Path) -> Check:
    """A readiness check that creates and removes a temporary file in ``directory``."""

    def check() -> bool:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".readyz-"):
            return True

    return check


def _make_handler(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "deid-gateway"
        sys_version = ""

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, server._metrics_body())
            elif path == "/healthz":
                self._send(HTTPStatus.OK, "text/plain; charset=utf-8", b"ok\n")
            elif path == "/readyz":
                failing = server.failing_checks()
                status = HTTPStatus.SERVICE_UNAVAILABLE if failing else HTTPStatus.OK
                body = {"status": "not ready" if failing else "ready", "failing": failing}
                self._send(status, "application/json", json.dumps(body).encode() + b"\n")
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Stay silent: scrapes every few seconds would flood the log."""

    return Handler
