"""The TrainJob progress client against a local HTTPS server with a test CA (trustme)."""

from __future__ import annotations

import json
import logging
import re
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distributed_train.config import load_config
from distributed_train.distributed import DistEnv
from distributed_train.training.reporting.metrics import MetricsLogger
from distributed_train.training.reporting.trainjob import (
    CA_VAR,
    TOKEN_VAR,
    URL_VAR,
    TrainJobProgress,
)

trustme = pytest.importorskip("trustme", reason="pip install trustme (a dev dependency)")

STATUS_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs/llm/status"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture
def caplog(caplog):
    """pytest's caplog, attached to the package logger itself, which does not propagate while
    it lasts: each record is caught once, whether or not an earlier test in this process ran
    setup_logging() (which stops the propagation to the root, where caplog listens)."""
    logger = logging.getLogger("distributed_train")
    logger.addHandler(caplog.handler)
    previous = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(previous[0])
    logger.propagate = previous[1]



class StatusServer:
    """The Trainer's status endpoint: records every request; answers `code`, or hangs `delay_s` first."""

    def __init__(self, ca):
        self.requests: list[dict] = []
        self.code, self.delay_s = 200, 0.0
        self.location: str | None = None  # answer with a redirect there (with code 302)
        self.answered = 0  # POSTs answered (a hanging one is not, until `release`)
        self.release = threading.Event()  # ends a hang early at teardown
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers["Authorization"],
                                        "type": self.headers["Content-Type"], "body": body})
                server.release.wait(server.delay_s)
                server.answered += 1
                status = {} if server.code == 200 else {"kind": "Status", "status": "Failure",
                                                        "message": "trainjob is not running", "code": server.code}
                payload = json.dumps(status).encode()
                self.send_response(server.code)
                if server.location:
                    self.send_header("Location", server.location)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):  # noqa: N802 - what urllib turns a redirected POST into
                server.requests.append({"path": self.path, "auth": self.headers["Authorization"]})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                # a client that gave up (the timeout tests) breaks the pipe: kept, not printed
                server.errors.append(sys.exc_info()[1])

        self.errors: list[BaseException] = []
        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}{STATUS_PATH}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def ca():
    return trustme.CA()


@pytest.fixture
def server(ca):
    s = StatusServer(ca)
    yield s
    s.close()


@pytest.fixture
def files(tmp_path, ca):
    """(CA file, token file) as the controller mounts them."""
    ca_file, token = tmp_path / "ca.crt", tmp_path / "token"
    ca.cert_pem.write_to_path(str(ca_file))
    token.write_text("token-1\n")
    return ca_file, token


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def metrics_of(body: dict) -> dict:
    return {m["name"]: m["value"] for m in body["trainerStatus"]["metrics"]}


def test_posts_progress_with_a_rotating_token_and_100_percent_at_the_end(server, files):
    ca_file, token = files
    reporter = TrainJobProgress(server.url, str(ca_file), str(token), total_steps=100, every_s=0.05)
    reporter.start()
    reporter.update(25, epoch=0, train_loss=0.5)
    wait_for(lambda: len(server.requests) >= 1)
    token.write_text("token-2\n")  # the projected token rotates: the next post must read it again
    reporter.update(50, epoch=1, eval_metrics={"accuracy": 0.875, "loss": 0.4})
    wait_for(lambda: any(r["auth"] == "Bearer token-2" for r in server.requests))
    posts_before = len(server.requests)
    time.sleep(0.3)  # nothing new: no repeated posts
    assert len(server.requests) == posts_before
    reporter.update(100, epoch=1, train_loss=0.25)
    reporter.close()

    first, last = server.requests[0], server.requests[-1]
    assert first["path"] == STATUS_PATH and first["type"] == "application/json"
    assert first["auth"] == "Bearer token-1" and last["auth"] == "Bearer token-2"
    assert first["body"]["trainerStatus"]["progressPercentage"] == 25
    assert metrics_of(first["body"]) == {"step": "25", "epoch": "0", "train_loss": "0.5"}
    status = last["body"]["trainerStatus"]
    assert status["progressPercentage"] == 100 and status["estimatedRemainingSeconds"] == 0
    assert RFC3339.match(status["lastUpdatedTime"])
    assert metrics_of(last["body"]) == {"step": "100", "epoch": "1", "train_loss": "0.25",
                                        "eval_accuracy": "0.875", "eval_loss": "0.4"}
    assert reporter.posts == len(server.requests)


def test_payload_estimates_remaining_time_from_the_measured_step_rate(files):
    now = [1000.0]
    reporter = TrainJobProgress("https://unused", "ca", "token", total_steps=200, start_step=40,
                                clock=lambda: now[0])
    assert "estimatedRemainingSeconds" not in reporter.payload()["trainerStatus"]  # no rate yet
    now[0] += 30.0
    reporter.update(100)  # 60 steps in 30 s since the resume at step 40: 100 steps left = 50 s
    status = reporter.payload()["trainerStatus"]
    assert (status["progressPercentage"], status["estimatedRemainingSeconds"]) == (50, 50)
    reporter.update(100, train_loss=float("nan"))  # not a number the server could show
    assert "train_loss" not in metrics_of(reporter.payload())


def test_server_errors_are_logged_once_per_kind_and_training_goes_on(server, files, caplog):
    ca_file, token = files
    server.code = 500
    # A generous timeout: on a loaded machine a slow answer must not add a "timed out" warning.
    reporter = TrainJobProgress(server.url, str(ca_file), str(token), total_steps=10, every_s=60, timeout_s=60)
    with caplog.at_level(logging.WARNING, logger="distributed_train"):
        assert reporter.post(reporter.payload()) is False
        assert reporter.post(reporter.payload()) is False
        server.code = 403
        assert reporter.post(reporter.payload()) is False
    # Only this reporter's answers: a reporter thread of an earlier test may still log its own.
    warnings = [r.getMessage() for r in caplog.records if "HTTP" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "HTTP 500" in warnings[0] and "trainjob is not running" in warnings[0]
    assert "HTTP 403" in warnings[1]
    server.code = 200
    assert reporter.post(reporter.payload()) is True and len(server.requests) == 4


def test_a_hanging_server_never_slows_the_training_thread(server, files, caplog):
    ca_file, token = files
    server.delay_s = 60
    reporter = TrainJobProgress(server.url, str(ca_file), str(token), total_steps=1000, every_s=0.01,
                                timeout_s=60)
    reporter.start()
    wait_for(lambda: server.requests)  # the poster is now stuck in a request
    for step in range(1, 1001):
        reporter.update(step, train_loss=1.0 / step)
    # No clock: all 1000 updates returned while the one post still waits for its answer.
    assert server.answered == 0 and len(server.requests) == 1 and reporter.posts == 0
    server.release.set()  # the server answers; close() then ends with that post
    reporter.close()
    assert server.answered >= 1
    # A post that times out is logged once, and the next one is tried.
    server.release.clear()
    hung = TrainJobProgress(server.url, str(ca_file), str(token), total_steps=10, timeout_s=0.2)
    with caplog.at_level(logging.WARNING, logger="distributed_train"):
        assert hung.post(hung.payload()) is False and hung.post(hung.payload()) is False
    timeouts = [r.getMessage() for r in caplog.records if "timed out" in r.getMessage().lower()]
    assert len(timeouts) == 1, [r.getMessage() for r in caplog.records]


def test_wrong_ca_and_refused_connection_fail_quietly(server, files, tmp_path, caplog):
    _, token = files
    other_ca = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with caplog.at_level(logging.WARNING, logger="distributed_train"):
        wrong = TrainJobProgress(server.url, str(other_ca), str(token), total_steps=10)
        assert wrong.post(wrong.payload()) is False and wrong.post(wrong.payload()) is False
        closed = TrainJobProgress("https://127.0.0.1:9/status", str(other_ca), str(token), total_steps=10)
        assert closed.post(closed.payload()) is False
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "TLS" in messages[0] and "CERTIFICATE_VERIFY_FAILED" in messages[0]
    assert "connection" in messages[1]
    assert server.requests == []  # nothing reached a server the client could not verify


def test_the_token_goes_only_to_the_configured_https_endpoint(server, ca, files, caplog):
    ca_file, token = files
    target = StatusServer(ca)  # where a redirect would send the token
    try:
        server.code, server.location = 302, target.url
        reporter = TrainJobProgress(server.url, str(ca_file), str(token), total_steps=10, timeout_s=60)
        with caplog.at_level(logging.WARNING, logger="distributed_train"):
            assert reporter.post(reporter.payload()) is False  # reported as failed, not as posted
        assert len(server.requests) == 1 and target.requests == [] and reporter.posts == 0
        assert "HTTP 302" in caplog.text
    finally:
        target.close()
    plain = {URL_VAR: "http://127.0.0.1:8080/status", CA_VAR: str(ca_file), TOKEN_VAR: str(token)}
    with caplog.at_level(logging.WARNING, logger="distributed_train"):
        assert TrainJobProgress.from_environ(plain, 10, 0, 10.0) is None
    assert "is not an https:// URL" in caplog.text and "token-1" not in caplog.text


def test_reporter_only_with_all_three_variables(files, caplog):
    ca_file, token = files
    full = {URL_VAR: "https://x/status", CA_VAR: str(ca_file), TOKEN_VAR: str(token)}
    assert TrainJobProgress.from_environ({}, 10, 0, 10.0) is None
    reporter = TrainJobProgress.from_environ(full, 10, 3, 7.5)
    assert (reporter.url, reporter.every_s, reporter.total_steps) == ("https://x/status", 7.5, 10)
    with caplog.at_level(logging.WARNING, logger="distributed_train"):
        assert TrainJobProgress.from_environ({URL_VAR: "https://x/status"}, 10, 0, 10.0) is None
    assert TOKEN_VAR in caplog.text


def test_metrics_logger_reports_train_and_eval_events_from_rank_0(server, files, tmp_path, monkeypatch):
    ca_file, token = files
    monkeypatch.setenv(URL_VAR, server.url)
    monkeypatch.setenv(CA_VAR, str(ca_file))
    monkeypatch.setenv(TOKEN_VAR, str(token))
    config = load_config(None, ["--log.wandb=disabled", "--log.progress_every_s=60"])
    other_rank = MetricsLogger(config, DistEnv(rank=1, world_size=2), tmp_path / "r1", 8)
    assert other_rank.trainjob is None
    logger = MetricsLogger(config, DistEnv(), tmp_path, 8)
    logger.start()
    assert logger.trainjob is not None and logger.trainjob.every_s == 60
    for step in range(1, 9):
        logger.step_done(step)
    logger.log({"kind": "train", "step": 8, "epoch": 2, "loss": 0.125, "lr": 0.1})
    logger.log({"kind": "eval", "step": 8, "epoch": 2, "accuracy": 0.5, "loss": 0.75})
    logger.close({"global_step": 8})
    assert len(server.requests) == 1  # every 60 s at most: only the final post in this short run
    body = server.requests[0]["body"]
    assert body["trainerStatus"]["progressPercentage"] == 100
    assert metrics_of(body) == {"step": "8", "epoch": "2", "train_loss": "0.125",
                                "eval_accuracy": "0.5", "eval_loss": "0.75"}
