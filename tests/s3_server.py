"""A real S3-compatible server for tests: moto's server mode on a free local port (the way
s3fs's own tests run; ../shared/RUNTIMES.md). Never a mock of the client: the libraries talk HTTP
to it as they would to a bucket."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from typing import Iterator

import pytest

from tests.helpers import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(bucket: str = "runs", refuse_credentials: bool = False) -> Iterator[dict]:
    """Start `moto.server` on 127.0.0.1, create `bucket`, yield the environment a client needs
    (credentials and AWS_ENDPOINT_URL); the server is stopped on exit, whatever happened.
    `refuse_credentials`: no bucket; the server checks every request's signature against the keys
    it knows (none), as a real store refuses wrong credentials."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")
    port = free_port()
    server_env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"} if refuse_credentials else None
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=server_env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto.server did not start on port {port} (exit {proc.poll()})") from None
                time.sleep(0.1)
        env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        # fsspec keeps one client per set of arguments, and the endpoint comes from the environment:
        # a client of an earlier server (another module's, stopped since) must not be reused.
        s3fs.S3FileSystem.clear_instance_cache()
        if not refuse_credentials:
            s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="testing", secret="testing").mkdir(bucket)
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def s3(request) -> Iterator[dict]:
    """A server and a bucket `runs` for the module's tests; its environment is set while they run."""
    with s3_server() as env:
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class Cuttable:
    """A TCP forwarder in front of a server, which a test can cut like a failed network link:
    open connections are closed and new ones refused. Real sockets both ways, no mock."""

    def __init__(self, target_port: int):
        import threading

        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.is_cut = False
        self._cut_after: bytes | None = None  # cut_after()'s request pattern
        self._marked: socket.socket | None = None  # the client that sent it: its answer cuts the link
        self._heard = b""  # what the server answered it so far
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, request: bytes) -> None:
        """Cut the link when the server answers the first request that matches the regular
        expression `request` (e.g. a PUT of some object): the request reached the server and did
        whatever it does, its answer is lost."""
        self._cut_after = request

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self.is_cut:
                    client.close()
                    upstream.close()
                    continue
                self._open += [client, upstream]
            for a, b, request in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, client, request), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, client: socket.socket, request: bool) -> None:
        try:
            while data := source.recv(65536):
                if request and self._cut_after and re.search(self._cut_after, data):
                    self._cut_after, self._marked = None, client
                elif not request and client is self._marked and self._final_answer(data):
                    self.cut()  # the answer to the marked request never arrives
                    return
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _final_answer(self, data: bytes) -> bool:
        """Whether the marked request's answer so far (`data` added) begins the final answer: the
        server sends one or more "100 Continue" first (the client sends the body after them), split
        or joined in any way across reads."""
        self._heard += data
        rest = re.sub(rb"^(?:HTTP/1\.[01] 100 [^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n)+", b"", self._heard)
        # a whole status code, not a 1xx one (12 bytes: "HTTP/1.1 100")
        return len(rest) >= 12 and not rest.startswith((b"HTTP/1.1 100", b"HTTP/1.0 100"))

    def cut(self) -> None:
        with self._lock:
            self.is_cut = True
            self._listener.close()
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
