"""Sharded checkpoints, one format for every engine: each rank writes its own shard with
torch.distributed.checkpoint (DCP); rank 0 commits once every shard is durable.

Layout of run_dir/checkpoints/step-00000120/:
    .metadata, __0_0.distcp, __1_0.distcp ...  model and optimizer, keyed by parameter name (DCP)
    train_state.pt                             rank 0: data position, every rank's RNG state,
                                               LR schedule, config, wandb id (weights_only)
    COMMITTED                                  sizes and sha256 of every file above

A save (every rank): copy what this rank writes to host memory (the only stall): its own shards,
and its share of the replicated tensors (a ddp model and its optimizer state are divided among the
ranks by size, so each rank stages and writes 1/world of them); the host buffers are kept and
reused by the next save (pinned when the state is on a GPU). Then, in a background thread, write
them into `.tmp-step-...`, hashing every file as it is written. DCP's final step gathers every
rank's result on rank 0 and writes `.metadata` only after every rank's files are written and
fsynced, so when it returns on rank 0 the whole checkpoint is durable; rank 0 then gathers the
ranks' checksums, writes train_state.pt, renames the directory into place, writes COMMITTED
(through a rename of its own) and only then rotates old checkpoints. Nothing is read back.
A crash at any point leaves the previous committed checkpoint as the latest.

Because tensors are keyed by name, not by rank, a checkpoint loads on any world size (DCP
reshards) and into any engine: ddp's full tensors and fsdp's shards are the same format.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist

from distributed_train.engines.base import Engine
from distributed_train.errors import UsageError
from distributed_train.files import disk_errors, error_text, failure_text
from distributed_train.storage import StorageError, Store
from distributed_train.training.checkpoints import commit, remote, staging

log = logging.getLogger("distributed_train")

TRAIN_STATE = commit.TRAIN_STATE
DCP_METADATA = ".metadata"
checkpoint_name = commit.checkpoint_name


def model_and_optimizer(engine: Engine) -> dict:
    """{"model", "optimizer"} keyed by parameter names: full tensors (ddp) or DTensor shards (fsdp)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = get_state_dict(engine.raw_model, engine.optimizer)
    return {"model": model, "optimizer": optimizer}


def load_model_and_optimizer(engine: Engine, path: Path) -> None:
    """Fill the engine's model and optimizer from checkpoint `path`, resharded to this world size."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from distributed_train.training.checkpoints import safe_load  # imports DCP: only when resuming

    state = model_and_optimizer(engine)
    safe_load.load(state, path)
    set_state_dict(engine.raw_model, engine.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def read_train_state(path: Path) -> dict:
    """Rank 0's train_state.pt (safe: weights_only)."""
    try:
        return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file is a usage problem, not a crash
        from distributed_train.training.checkpoints import safe_load

        raise UsageError(f"checkpoint file {path / TRAIN_STATE} cannot be loaded ({safe_load.why_not_loaded(exc)}); "
                         "refused: loading a checkpoint never runs code") from None


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """The full model state of a checkpoint, in one process without a process group (export)."""
    # DCP's own offline loader (what format_utils.dcp_to_torch_save uses): it builds the state
    # dict from the checkpoint's metadata, so no model is needed; only the model's keys are read.
    if not (path / DCP_METADATA).is_file():
        raise UsageError(f"checkpoint {path} has no {DCP_METADATA}: not a dtrain checkpoint, or one "
                         "written before the sharded format (dtrain < 0.4 cannot be exported)")
    from distributed_train.training.checkpoints import safe_load

    return safe_load.load_keys({"model"}, path)["model"]


# -- the commit protocol (commit.py's): train_state.pt, then the atomic rename ----------------
def write_train_state(directory: Path, train_state: dict) -> None:
    with open(directory / TRAIN_STATE, "wb") as f, disk_errors():
        torch.save(train_state, f)
        f.flush()
        os.fsync(f.fileno())


class ShardedWriter:
    """Writes one checkpoint at a time in the background on every rank; rank 0 commits and
    rotates. A failed write surfaces at the next step boundary (`raise_if_failed`) or `wait()`.
    Its own gloo group keeps checkpoint traffic apart from training's collectives (and works next
    to NCCL)."""

    def __init__(self, directory: Path, is_main: bool, rotate: Callable[[int], None], store: Store | None = None):
        self.directory, self.is_main, self.rotate, self.store = directory, is_main, rotate, store
        self.group = torch_dist.new_group(backend="gloo") if torch_dist.is_initialized() else None
        self.background = commit.AsyncWriter()
        self.stager = staging.Stager()  # host buffers kept from one save to the next
        self.last_committed = ""  # where the last checkpoint this rank committed is (a path or a URL)

    @property
    def last_write_s(self) -> float:
        return self.background.last_write_s

    @property
    def last_write_cpu_s(self) -> float:
        return self.background.last_write_cpu_s

    def submit(self, step: int, engine: Engine, train_state: dict | None, blocking: bool = False) -> None:
        """Collective: every rank stages its shard now; the write and the commit follow in the
        background (`blocking`: before returning). `train_state` matters on rank 0 only."""
        self.wait()
        tmp, folder = self._new_folder(step)
        import torch.distributed.checkpoint as dcp  # imported when a checkpoint is saved (~0.5 s)

        # One process alone (no group) saves in the background thread, where a `catch_warnings`
        # would not apply (nor be thread-safe): torch's "torch.distributed is disabled ... single
        # process" is filtered for the process instead (it states this intent, nothing else).
        if self.group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        state = model_and_optimizer(engine)
        if self.group is not None:
            state = staging.my_share(state, torch_dist.get_rank(self.group), torch_dist.get_world_size(self.group))
        staged = self.stager.stage(state)  # the stall: what follows runs beside training
        writer = staging.hashing_writer(tmp)

        def write() -> None:
            try:
                with disk_errors():
                    dcp.save(staged, storage_writer=writer, process_group=self.group, no_dist=self.group is None)
            except (Exception, dcp.CheckpointException) as exc:  # a full disk (any rank's), a rank that left
                if self.is_main:
                    commit.discard_failed_write(self.directory, step)
                raise commit.CheckpointWriteFailed(
                    f"writing checkpoint {self.directory / checkpoint_name(step)} failed: {failure_text(exc)}; "
                    "nothing of it was kept and the previous committed checkpoint is intact") from exc
            # every rank's shard is written and fsynced once dcp.save returns on rank 0
            self._finish(step, train_state, folder, writer.facts)

        self.background.run(step, write)
        if blocking:
            self.wait()

    def _new_folder(self, step: int) -> tuple[Path, str]:
        """Collective: the empty temporary folder of checkpoint `step` (every rank sees it empty
        before any writes) and, with object storage, the save's folder name, the same on every rank."""
        tmp = self.directory / f"{commit.TMP_PREFIX}{checkpoint_name(step)}"
        if self.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as exc:
                raise commit.CheckpointWriteFailed(f"cannot create {tmp}: {exc.strerror or exc}") from exc
        folder = remote.new_folder(step) if self.store else ""
        if self.group is not None:
            torch_dist.barrier(group=self.group)
            if self.store:  # each node stages in its own tmp
                box = [folder]
                torch_dist.broadcast_object_list(box, src=0, group=self.group)
                folder = box[0]
                tmp.mkdir(parents=True, exist_ok=True)
        return tmp, folder

    def save_alone(self, step: int, engine: Engine, train_state: dict) -> Path:
        """Rank 0 writes and commits the whole state with no collective (after SIGTERM, when every
        rank holds the full model: ddp, accelerate, or one rank)."""
        self.wait()
        tmp = self.directory / f"{commit.TMP_PREFIX}{checkpoint_name(step)}"
        known: dict = {}  # the checksums, computed while writing

        def write() -> None:
            import torch.distributed.checkpoint as dcp

            from distributed_train.training.checkpoints.safe_load import single_process_quietly

            writer = staging.hashing_writer(tmp)
            with single_process_quietly(), disk_errors():
                dcp.save(model_and_optimizer(engine), storage_writer=writer, no_dist=True)
            known.update(writer.facts)
            write_train_state(tmp, train_state)

        if self.store:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                write()
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise commit.CheckpointWriteFailed(f"writing checkpoint {tmp} failed: {error_text(exc)}; the "
                                                   "previous committed checkpoint is intact") from exc
            self._publish(step, tmp, remote.new_folder(step), alone=True, known=known)
            return Path(self.last_committed)
        final = commit.commit_directory(self.directory, step, write, known=known)
        self.rotate(step)
        self.last_committed = str(final)
        return final

    def _finish(self, step: int, train_state: dict | None, folder: str, facts: dict) -> None:
        """After every rank wrote its files (`facts`: their sizes and checksums): commit them."""
        tmp = self.directory / f"{commit.TMP_PREFIX}{checkpoint_name(step)}"
        if self.store:
            if self.is_main:
                write_train_state(tmp, train_state)
            self._publish(step, tmp, folder, known=facts)
            return
        every = [facts]
        if self.group is not None:
            every = [None] * torch_dist.get_world_size(self.group)
            torch_dist.all_gather_object(every, facts, group=self.group)
        if self.is_main:
            known = {name: meta for rank_facts in every for name, meta in rank_facts.items()}
            commit.commit_directory(self.directory, step, lambda: write_train_state(tmp, train_state),
                                    fresh=False, known=known)
            self.rotate(step)
            self.last_committed = str(self.directory / checkpoint_name(step))

    def _publish(self, step: int, tmp: Path, folder: str, alone: bool = False, known: dict | None = None) -> None:
        """Object storage: every rank uploads the files it wrote (`alone`: this rank wrote them
        all), their sizes and checksums (`known`: those computed while writing) go to rank 0,
        which creates the commit record last and rotates. The local staging folder is removed
        either way."""
        rank = 0 if alone or self.group is None else torch_dist.get_rank(self.group)
        mine = sorted(name for name in os.listdir(tmp) if alone or name.startswith(f"__{rank}_")
                      or (self.is_main and name in (DCP_METADATA, TRAIN_STATE)))
        facts, error = {}, None
        try:
            facts = remote.upload(self.store, folder, tmp, mine, known)
        except (StorageError, OSError) as exc:
            error = str(exc) if isinstance(exc, StorageError) else f"{tmp}: {error_text(exc)}"
        every = [(facts, error)]
        if self.group is not None and not alone:
            every = [None] * torch_dist.get_world_size(self.group)
            torch_dist.all_gather_object(every, (facts, error), group=self.group)
        try:
            failed = [problem for _, problem in every if problem]
            if failed:
                raise commit.CheckpointWriteFailed(f"uploading checkpoint {step} failed: {failed[0]}; nothing "
                                                   "of it was committed and the previous committed checkpoint "
                                                   "is intact")
            if self.is_main:
                files = {name: meta for rank_facts, _ in every for name, meta in rank_facts.items()}
                try:
                    remote.commit_folder(self.store, folder, step, files)
                except StorageError as exc:
                    # A write whose answer was lost may have landed: the bucket's listing decides.
                    raise commit.CheckpointWriteFailed(f"committing checkpoint {step} failed: {exc}; the "
                                                       "previous committed checkpoint is intact, and the next "
                                                       "start resumes from the newest one the bucket lists as "
                                                       "committed") from exc
                self.last_committed = self.store.url_of(f"{remote.PREFIX}/{folder}")
                try:
                    self.rotate(step)
                except StorageError as exc:  # committed all the same: older checkpoints stay a while
                    log.warning("checkpoint %d is committed; deleting older ones failed: %s (the next save "
                                "tries again)", step, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def raise_if_failed(self) -> None:
        """At a step boundary: raise if a background write has failed (never waits for one)."""
        self.background.raise_if_failed()

    def wait(self) -> None:
        """Block until the pending checkpoint is committed; raise if it failed."""
        self.background.wait()
