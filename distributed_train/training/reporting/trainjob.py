"""Live progress in a Kubeflow TrainJob: rank 0 posts it to the Trainer's status server.

When the TrainJob progress feature is on, the controller gives every trainer container
KUBEFLOW_TRAINER_SERVER_URL (HTTPS), KUBEFLOW_TRAINER_SERVER_CA_CERT (the CA file that signs it)
and KUBEFLOW_TRAINER_SERVER_TOKEN (a bearer-token file that rotates). `kubectl get trainjob` then
shows PROGRESS %. Reporting must never disturb training: the training thread only stores numbers;
a daemon thread posts them at most every `log.progress_every_s` seconds, each failure kind is
logged once, and a server that hangs costs at most one timeout, off the training thread.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import Callable, Mapping

log = logging.getLogger("distributed_train")

URL_VAR = "KUBEFLOW_TRAINER_SERVER_URL"
CA_VAR = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
TOKEN_VAR = "KUBEFLOW_TRAINER_SERVER_TOKEN"
MAX_VALUE_LENGTH = 64  # the TrainJob schema's limit on a metric's name and value


def _text(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


class TrainJobProgress:
    """Posts {progressPercentage, estimatedRemainingSeconds, metrics} from a background thread."""

    def __init__(self, url: str, ca_cert: str, token_file: str, total_steps: int, start_step: int = 0,
                 every_s: float = 10.0, timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.url, self.ca_cert, self.token_file = url, ca_cert, token_file
        self.total_steps, self.every_s, self.timeout_s, self.clock = total_steps, every_s, timeout_s, clock
        # Latest numbers, written by the training thread, read by the poster (under the lock).
        self._lock = threading.Lock()
        self._step, self._epoch = start_step, 0
        self._train_loss: float | None = None
        self._eval: dict[str, float] = {}
        self._changed = True
        # Step rate since this process started (a resumed run does not count the steps it skipped).
        self._start_step, self._start_time = start_step, clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures_logged: set[str] = set()
        self.posts = 0  # successful posts, for tests and the final log line

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], total_steps: int, start_step: int,
                     every_s: float) -> TrainJobProgress | None:
        """A reporter when the TrainJob controller set all three variables, else None."""
        values = [environ.get(name) for name in (URL_VAR, CA_VAR, TOKEN_VAR)]
        if not all(values):
            if any(values):
                log.warning("TrainJob progress off: %s must all be set",
                            ", ".join((URL_VAR, CA_VAR, TOKEN_VAR)))
            return None
        url, ca_cert, token_file = values
        if urllib.parse.urlsplit(url).scheme != "https":
            log.warning("TrainJob progress off: %s=%s is not an https:// URL, and the bearer token is never "
                        "sent without TLS", URL_VAR, url)
            return None
        return cls(url, ca_cert, token_file, total_steps, start_step, every_s)

    # -- the training thread: cheap, never blocks on the network ------------------------------

    def update(self, step: int, epoch: int | None = None, train_loss: float | None = None,
               eval_metrics: Mapping[str, float] | None = None) -> None:
        """Record the latest step and numbers; the poster sends them on its next turn."""
        with self._lock:
            self._step = step
            if epoch is not None:
                self._epoch = epoch
            if train_loss is not None:
                self._train_loss = train_loss
            if eval_metrics:
                self._eval = dict(eval_metrics)
            self._changed = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trainjob-progress", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Post the final state (100% when training finished) and stop, waiting one timeout at most."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1)
            self._thread = None

    # -- the poster thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._post_if_changed()
        self._changed = True  # always one last post at the end
        self._post_if_changed()

    def _post_if_changed(self) -> None:
        with self._lock:
            if not self._changed:
                return
            self._changed = False
            body = self.payload()
        self.post(body)

    def payload(self) -> dict:
        """The request body (call with the lock held or from one thread)."""
        step, total = self._step, max(1, self.total_steps)
        status: dict = {"progressPercentage": max(0, min(100, math.floor(100 * step / total)))}
        elapsed, done = self.clock() - self._start_time, step - self._start_step
        if done > 0 and elapsed > 0:
            status["estimatedRemainingSeconds"] = max(0, round((total - step) * elapsed / done))
        metrics = {"step": step, "epoch": self._epoch}
        if self._train_loss is not None and math.isfinite(self._train_loss):
            metrics["train_loss"] = self._train_loss
        metrics.update({f"eval_{name}": value for name, value in self._eval.items()})
        status["metrics"] = [{"name": name[:MAX_VALUE_LENGTH], "value": _text(value)[:MAX_VALUE_LENGTH]}
                             for name, value in metrics.items()]
        status["lastUpdatedTime"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"trainerStatus": status}

    def post(self, body: dict) -> bool:
        """One POST with a freshly read token, verified against the CA; never raises."""
        try:
            with open(self.token_file) as f:  # re-read every time: the projected token rotates
                token = f.read().strip()
            context = ssl.create_default_context(cafile=self.ca_cert)
            request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                             headers={"Authorization": f"Bearer {token}",
                                                      "Content-Type": "application/json"})
            # Only to the configured endpoint: a redirect is a failed post, never followed with the token.
            opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirects())
            with opener.open(request, timeout=self.timeout_s) as response:
                response.read()
            self.posts += 1
            return True
        except urllib.error.HTTPError as exc:
            self._failed(f"HTTP {exc.code}", _status_message(exc))
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self._failed("TLS", str(exc))
        except urllib.error.URLError as exc:
            kind = "TLS" if isinstance(exc.reason, ssl.SSLError) else "connection"
            self._failed(kind, str(exc.reason))
        except (TimeoutError, OSError) as exc:
            self._failed(type(exc).__name__, str(exc) or type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - reporting must never stop training
            self._failed(type(exc).__name__, str(exc))
        return False

    def _failed(self, kind: str, detail: str) -> None:
        """Log each kind of failure once; training goes on either way."""
        if kind in self._failures_logged:
            return
        self._failures_logged.add(kind)
        log.warning("TrainJob progress: post to %s failed (%s: %s); training continues, "
                    "later failures of this kind are not logged", self.url, kind, detail)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ARG002 - urllib's names
        return None  # urllib then raises HTTPError(3xx): reported as a failed post


def _status_message(exc: urllib.error.HTTPError) -> str:
    """The `message` of a Kubernetes Status body, else the HTTP reason."""
    try:
        return json.loads(exc.read().decode() or "{}").get("message") or exc.reason
    except Exception:  # noqa: BLE001 - any body at all
        return str(exc.reason)
