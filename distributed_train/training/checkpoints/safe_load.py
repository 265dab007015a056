"""Reading DCP checkpoints without running code from them.

torch.distributed.checkpoint reads a checkpoint's `.metadata` with plain `pickle.load` and its
non-tensor entries (`param_groups` values, ...) with `torch.load(weights_only=False)`: anyone who
can write a checkpoint folder could make a resume or an export run code. Here `.metadata` is read
by an unpickler that builds only what DCP writes (its metadata classes, torch sizes, dtypes and
layouts, paths), and every entry with `torch.load(weights_only=True)`; anything else is refused in
one line naming the file or the entry. Tensors are already read with `weights_only=True` by DCP.

`load(state, path)` also turns DCP's CheckpointException (a BaseException that escapes ordinary
handlers) into one line: a checkpoint that does not fit the model (a changed architecture) is a
usage problem, not a crash.
"""

from __future__ import annotations

import contextlib
import enum
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from distributed_train.errors import UsageError

# What DCP pickles into .metadata besides the classes of torch.distributed.checkpoint.metadata
# (measured on torch 2.13 for ddp, fsdp, AdamW and SGD states) and torch's dtypes.
_ALLOWED = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
            ("pathlib", "PureWindowsPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


def _enum_member(cls: Any, name: Any) -> Any:
    """`getattr(cls, name)` as some Python releases pickle an enum member (Debian bookworm's 3.11.2
    writes DCP's `_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT` so): a member of an allowed enum only."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"getattr({getattr(cls, '__name__', type(cls).__name__)}, {name!r}) is not "
                                 "part of a DCP checkpoint's metadata")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _enum_member  # its class argument came through this allow-list too
        if (module, name) in _ALLOWED or (module == dcp_metadata.__name__ and isinstance(
                getattr(dcp_metadata, name, None), type)) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with `.metadata` unpickled through the allow-list above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        path = Path(self._get_metadata_path(rank))
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
            raise UsageError(f"checkpoint file {path} is not DCP metadata ({exc}); refused: loading a "
                             "checkpoint never runs code from it") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise UsageError(f"checkpoint file {path} holds a {type(metadata).__name__}, not DCP metadata; refused")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def why_not_loaded(exc: Exception) -> str:
    """Why `torch.load(weights_only=True)` refused a file, in a few words (torch's own message is
    several lines and suggests `weights_only=False`, which would run the payload)."""
    found = re.search(r"(?:[Uu]nsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
    if found:
        return f"it holds {found[1]}, which is not plain data"
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds objects that are not plain data"
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _plain_data(read_item: ReadItem, value: io.BytesIO, path: Path) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a payload, or damage: either way, refused in one line
        raise UsageError(f"checkpoint {path}: entry {read_item.dest_index.fqn} cannot be loaded "
                         f"({why_not_loaded(exc)}); refused: loading a checkpoint never runs code") from None


def _safe_planner(base: type) -> type:
    """`base` (a DCP load planner) with its non-tensor entries read by `torch.load(weights_only=True)`."""

    class Planner(base):  # type: ignore[misc, valid-type]
        def __init__(self, path: Path, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.path = path

        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            obj = _plain_data(read_item, value, self.path)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    Planner.__name__ = f"Safe{base.__name__}"
    return Planner


SafeLoadPlanner = _safe_planner(DefaultLoadPlanner)
SafeEmptyStateDictLoadPlanner = _safe_planner(_EmptyStateDictLoadPlanner)


def one_line(exc: CheckpointException, path: Path) -> UsageError:
    """The first rank's failure of a DCP load as one line (its own UsageError as it is)."""
    failures = [failure for failure, _ in exc.failures.values()]
    for failure in failures:
        if isinstance(failure, UsageError):
            return failure
    first = failures[0] if failures else exc
    text = (str(first).strip().splitlines() or [type(first).__name__])[0]
    return UsageError(f"checkpoint {path} does not fit this model ({type(first).__name__}: {text}); resume "
                      "it with the model that wrote it, or start over (checkpoint.resume=never)")


@contextlib.contextmanager
def single_process_quietly() -> Iterator[None]:
    """DCP without a process group warns "torch.distributed is disabled ... assuming the intent is
    to load/save in a single process": here that is the intent, so the line says nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def load(state: dict, path: Path) -> None:
    """`dcp.load(state, path)` in place, reading nothing that could run code; a failure is one line."""
    SafeReader(str(path)).read_metadata()  # refused here in our words, not inside DCP's fallbacks
    try:
        with single_process_quietly():
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(path),
                     no_dist=not torch_dist.is_initialized())
    except CheckpointException as exc:
        raise one_line(exc, path) from None


def load_keys(keys: set[str], path: Path) -> dict:
    """Entries `keys` of a checkpoint as saved, in one process without a model (export)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    SafeReader(str(path)).read_metadata()  # refused here in our words, not inside DCP's fallbacks
    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=SafeReader(str(path)),
                         planner=SafeEmptyStateDictLoadPlanner(path, keys=keys), no_dist=True)
    except CheckpointException as exc:
        raise one_line(exc, path) from None
    return state
