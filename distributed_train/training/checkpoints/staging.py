"""What a save stalls for and what it reads back: as little as possible.

- `my_share`: a rank stages and writes only its share. DCP writes a replicated tensor (every
  plain tensor of the state: a ddp model, its optimizer state) once, from one rank, but stages it
  on every rank first; here the replicated tensors are divided among the ranks by size before
  staging (the same division on every rank, computed from shapes alone), so each rank copies 1/world
  of them. Sharded tensors (fsdp's DTensors) are each rank's own already.
- `Stager`: the host copies are kept and reused by the next save (torch's StateDictStager caches
  one host buffer per storage), pinned and copied without blocking per tensor when the state is on a
  GPU; one synchronisation at the end.
- `HashingWriter`: DCP's file writer that computes every file's sha256 while writing it, so the
  commit record needs no re-read of the checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from distributed_train.files import disk_errors

_Path = tuple  # a leaf's keys from the state's root


def my_share(state: dict, rank: int, world_size: int) -> dict:
    """`state` (nested dicts) without the replicated tensors that other ranks write: each plain
    tensor goes to the least-loaded rank, largest first (ties by name), the same on every rank.
    DTensors and values that are not tensors stay (DCP de-duplicates the small ones itself)."""
    if world_size <= 1:
        return state
    sizes: dict[_Path, int] = {}
    _tensor_sizes(state, (), sizes)
    owner, load = {}, [0] * world_size
    for path in sorted(sizes, key=lambda leaf: (-sizes[leaf], tuple(map(str, leaf)))):
        least = load.index(min(load))
        owner[path], load[least] = least, load[least] + sizes[path]
    return _without(state, (), {path for path, writer in owner.items() if writer != rank})


def _is_replicated(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, torch.Tensor) and not isinstance(value, DTensor)


def _tensor_sizes(tree: dict, prefix: _Path, sizes: dict) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _tensor_sizes(value, prefix + (key,), sizes)
        elif _is_replicated(value):
            sizes[prefix + (key,)] = value.numel() * value.element_size()


def _without(tree: dict, prefix: _Path, dropped: set) -> dict:
    return {key: _without(value, prefix + (key,), dropped) if isinstance(value, dict) else value
            for key, value in tree.items() if prefix + (key,) not in dropped}


class Stager:
    """Host copies of a state for a background write, in buffers reused from one save to the next
    (a save starts only after the previous write ended, so a buffer is never copied into while
    it is written). On a GPU: pinned buffers, non-blocking copies, one synchronisation.

    torch's StateDictStager does the copying (it keeps one host storage per source storage, and a
    model's and an optimizer's tensors keep their storages from step to step). Not through the
    public DefaultStager that wraps it: in torch 2.11 that closes it after every stage, which frees
    the buffers and makes the next save fail (KeyError: <class 'type'>)."""

    def __init__(self) -> None:
        self._stager = None
        self._gpu = False

    def stage(self, state: dict) -> dict:
        if self._stager is None:
            from torch.distributed.checkpoint._state_dict_stager import StateDictStager

            self._gpu = torch.cuda.is_available() and _any_on_gpu(state)
            self._stager = StateDictStager(pin_memory=self._gpu, share_memory=False)
        staged = self._stager.stage(state, non_blocking=self._gpu)
        if self._gpu:
            torch.cuda.synchronize()  # the one wait, for every copy enqueued above
        return staged


def _any_on_gpu(tree: dict) -> bool:
    return any(_any_on_gpu(value) if isinstance(value, dict) else
               isinstance(value, torch.Tensor) and value.device.type == "cuda" for value in tree.values())


class _HashingStream:
    """A file being written, with the sha256 of everything written to it so far."""

    def __init__(self, raw) -> None:
        self.raw, self.digest = raw, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def __getattr__(self, name):  # tell, flush, fileno: the file's own
        return getattr(self.raw, name)


def hashing_writer(path: Path):
    """A DCP FileSystemWriter for `path` whose `.facts` fill with {file name: {"size", "sha256"}}
    of every file it writes (DCP writes each file front to back, never seeking), `.metadata`
    included under its final name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        def __init__(self) -> None:
            super().__init__()
            self.facts: dict[str, dict] = {}
            self.lock = threading.Lock()  # DCP may write files from several threads

        @contextmanager
        def create_stream(self, path, mode: str):
            # disk_errors: a refused write reaches the other ranks as the OSError it was (DCP sends
            # them its failure pickled: torch.save's RuntimeError would arrive without its cause)
            with disk_errors(), super().create_stream(path, mode) as stream:
                if "w" not in mode:
                    yield stream
                    return
                hashing = _HashingStream(stream)
                yield hashing
            with self.lock:
                self.facts[Path(path).name] = {"size": os.path.getsize(path), "sha256": hashing.digest.hexdigest()}

        def rename(self, path, new_path) -> None:
            super().rename(path, new_path)
            with self.lock:
                if Path(path).name in self.facts:
                    self.facts[Path(new_path).name] = self.facts.pop(Path(path).name)

    writer = dcp.FileSystemWriter(str(path))
    writer.fs = HashingFileSystem()
    writer.facts = writer.fs.facts
    return writer
