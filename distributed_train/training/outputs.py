"""What a run leaves behind: config.yaml first, final_model.pt as soon as training ends, then
summary.json.

The model is written before the final evaluation (and anything else that runs after the last
step), so a late failure never loses the training: summary.json then says `"status": "failed"`
with the error, next to a final_model.pt that is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distributed_train import distributed
from distributed_train.distributed.diagnose import describe
from distributed_train.engines.base import Engine
from distributed_train.errors import UsageError
from distributed_train.files import atomic_write, atomic_write_text, make_directory
from distributed_train.storage import StorageError
from distributed_train.training.mirror import RunMirror
from distributed_train.training.reporting.metrics import log


class RunOutputs:
    """Rank 0 writes run_dir/final_model.pt and run_dir/summary.json, each atomically; with a
    run_dir URL, into the local working folder and then to the bucket (`mirror`). Used as a
    context manager around the job: leaving it uploads the last metrics and releases the bucket's lock."""

    def __init__(self, env: distributed.DistEnv, run_dir: Path, mirror: RunMirror | None = None):
        self.env, self.run_dir, self.mirror = env, run_dir, mirror
        self.model_path = run_dir / "final_model.pt"
        self.shown_model_path = f"{mirror.url}/final_model.pt" if mirror else str(self.model_path)

    def prepare(self, config_yaml: str) -> None:
        """Rank 0 creates run_dir and writes config.yaml (and, with a URL, checks the bucket and
        takes its lock); an error there stops every rank."""
        distributed.main_computes(self.env, self._prepare, config_yaml)

    def _prepare(self, config_yaml: str) -> None:
        make_directory(self.run_dir, "run_dir")
        atomic_write_text(self.run_dir / "config.yaml", config_yaml, "the resolved config")
        if self.mirror:
            self.mirror.open()
            self._publish("config.yaml", "the resolved config")

    def _publish(self, name: str, what: str) -> None:
        """Rank 0, with a run_dir URL: upload the local file `name`; a failure is a UsageError."""
        if self.mirror:
            try:
                self.mirror.upload(name)
            except StorageError as exc:
                raise UsageError(f"cannot upload {what}: {exc}; it is kept in {self.run_dir / name}") from None

    def __enter__(self) -> "RunOutputs":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.mirror and self.env.is_main:
            self.mirror.close()

    def write_model(self, engine: Engine) -> None:
        """final_model.pt: plain CPU state_dict, no `module.` prefix (collective: every rank calls it,
        so a full disk stops every rank with one line instead of leaving peers waiting)."""
        model_state = engine.model_state_dict()  # every rank: gathering the shards is a collective under fsdp
        distributed.main_computes(self.env, self._write_model, model_state)

    def _write_model(self, model_state: dict) -> None:
        atomic_write(self.model_path, lambda f: torch.save(model_state, f), "the final model")
        self._publish("final_model.pt", "the final model")

    def write_summary(self, summary: dict) -> None:
        """summary.json with `"status": "done"` (rank 0 only)."""
        distributed.on_main(self.env, self._write_json, {**summary, "status": "done"})

    def write_failed(self, summary: dict, error: BaseException) -> None:
        """summary.json marked failed, with the error; the model written before stays (rank 0 only)."""
        if not self.env.is_main:
            return
        try:
            self._write_json({**summary, "status": "failed", "error": describe(error)})
        except UsageError:  # the disk that failed may fail this write too; the error still reaches the user
            return
        log.warning("training finished but a later step failed; the trained model is in %s and "
                    "summary.json records the error", self.model_path)

    def _write_json(self, summary: dict) -> None:
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self._publish("summary.json", "the summary")
