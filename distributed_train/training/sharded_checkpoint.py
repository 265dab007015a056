"""Sharded checkpoints, one format for every engine: each rank writes its own shard with
torch.distributed.checkpoint (DCP); rank 0 commits once every shard is durable.

Layout of run_dir/checkpoints/step-00000120/:
    .metadata, __0_0.distcp, __1_0.distcp ...  model and optimizer, keyed by parameter name (DCP)
    train_state.pt                             rank 0: data position, every rank's RNG state,
                                               LR schedule, config, wandb id (weights_only)
    COMMITTED                                  sizes and sha256 of every file above

A save (every rank): copy this rank's shard to host memory (the only stall), then in a background
thread write it into `.tmp-step-...`. DCP's final step gathers every rank's result on rank 0 and
writes `.metadata` only after every rank's files are written and fsynced, so when it returns on
rank 0 the whole checkpoint is durable; rank 0 then writes train_state.pt, renames the directory
into place, writes COMMITTED (through a rename of its own) and only then rotates old checkpoints.
A crash at any point leaves the previous committed checkpoint as the latest.

Because tensors are keyed by name, not by rank, a checkpoint loads on any world size (DCP
reshards) and into any engine: ddp's full tensors and fsdp's shards are the same format.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from distributed_train.errors import UsageError

MARKER = "COMMITTED"  # the commit record; the same name and fields as checkpoint.py's
TRAIN_STATE = "train_state.pt"
DCP_METADATA = ".metadata"
FORMAT_VERSION = 2


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def is_sharded(path: Path) -> bool:
    """A checkpoint in this format (older ones hold a single state.pt)."""
    return (path / DCP_METADATA).is_file()


def is_sharded_engine(engine: Any) -> bool:
    """Parameters are split across ranks (fsdp): no rank can save the whole state alone."""
    return torch_dist.is_initialized() and torch_dist.get_world_size() > 1 and \
        any(isinstance(p, DTensor) for p in engine.raw_model.parameters())


def _optimizer(engine: Any) -> torch.optim.Optimizer:
    # Accelerate wraps the optimizer; its state is keyed like the torch optimizer inside.
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def model_and_optimizer(engine: Any) -> dict:
    """{"model", "optimizer"} keyed by parameter names: full tensors (ddp) or DTensor shards (fsdp)."""
    model, optimizer = get_state_dict(engine.raw_model, _optimizer(engine))
    return {"model": model, "optimizer": optimizer}


def load_model_and_optimizer(engine: Any, path: Path) -> None:
    """Fill the engine's model and optimizer from checkpoint `path`, resharded to this world size."""
    state = model_and_optimizer(engine)
    dcp.load(state, checkpoint_id=str(path), no_dist=not torch_dist.is_initialized())
    set_state_dict(engine.raw_model, _optimizer(engine), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def read_train_state(path: Path) -> dict:
    """Rank 0's train_state.pt (safe: weights_only)."""
    try:
        return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file is a usage problem, not a crash
        raise UsageError(f"checkpoint {path} cannot be loaded: {type(exc).__name__}: {exc}") from exc


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """The full model state of a checkpoint, in one process without a process group (export)."""
    # DCP's own offline loader (what format_utils.dcp_to_torch_save uses): it builds the state
    # dict from the checkpoint's metadata, so no model is needed; only the model's keys are read.
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    return state["model"]


# -- the commit protocol -----------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_train_state(directory: Path, train_state: dict) -> None:
    with open(directory / TRAIN_STATE, "wb") as f:
        torch.save(train_state, f)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, final: Path, step: int) -> Path:
    """Rename the written `tmp` directory to `final` and write its commit record (rank 0 only,
    after every rank's files are durable)."""
    for file in tmp.iterdir():  # DCP fsyncs its files; make sure, cheaply, before they count
        _fsync(file)
    _fsync(tmp)
    if final.exists():  # an uncommitted leftover, or a re-save of the same step after a restart
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(final.parent)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(final.iterdir())}
    record = {"step": step, "format": FORMAT_VERSION, "time": time.time(), "files": files}
    record_tmp = final / f".{MARKER}.tmp"
    with open(record_tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    record_tmp.rename(final / MARKER)
    _fsync(final)
    return final


class ShardedWriter:
    """Writes one checkpoint at a time in the background on every rank; rank 0 commits and
    rotates. Errors surface on `wait()`. Its own gloo group keeps checkpoint traffic apart from
    training's collectives (and works next to NCCL)."""

    def __init__(self, directory: Path, is_main: bool, rotate: Any):
        self.directory, self.is_main, self.rotate = directory, is_main, rotate
        self.group = torch_dist.new_group(backend="gloo") if torch_dist.is_initialized() else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_write_s = 0.0

    def submit(self, step: int, engine: Any, train_state: dict | None, blocking: bool = False) -> None:
        """Collective: every rank stages its shard now; the write and the commit follow in the
        background (`blocking`: before returning). `train_state` matters on rank 0 only."""
        self.wait()
        tmp = self.directory / f".tmp-{checkpoint_name(step)}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.group is not None:
            torch_dist.barrier(group=self.group)  # the directory is empty before anyone writes
        start = time.perf_counter()
        future = dcp.async_save(model_and_optimizer(engine), checkpoint_id=str(tmp), process_group=self.group,
                                no_dist=self.group is None)
        self._start(lambda: self._finish(future, tmp, step, train_state), step, start)
        if blocking:
            self.wait()

    def save_alone(self, step: int, engine: Any, train_state: dict) -> Path:
        """Rank 0 writes and commits the whole state with no collective (after SIGTERM, when every
        rank holds the full model: ddp, accelerate, or one rank)."""
        self.wait()
        tmp = self.directory / f".tmp-{checkpoint_name(step)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        dcp.save(model_and_optimizer(engine), checkpoint_id=str(tmp), no_dist=True)
        write_train_state(tmp, train_state)
        final = commit(tmp, self.directory / checkpoint_name(step), step)
        self.rotate()
        return final

    def _finish(self, future: Future, tmp: Path, step: int, train_state: dict | None) -> None:
        future.result()  # every rank's shard is written and fsynced once this returns on rank 0
        if self.is_main:
            write_train_state(tmp, train_state)
            commit(tmp, self.directory / checkpoint_name(step), step)
            self.rotate()

    def _start(self, work: Any, step: int, start: float) -> None:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                self._error = exc
            self.last_write_s = time.perf_counter() - start

        self._thread = threading.Thread(target=run, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending checkpoint is committed; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed ({error}); the previous committed "
                               "checkpoint is intact") from error
