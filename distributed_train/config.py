"""The configuration tree: dataclasses with defaults, a YAML file and `--section.key=value` on top.

Precedence: command line > config file > the task's `config_defaults` > the defaults below.
Every value is checked here, before any process group or worker starts; a mistake raises
UsageError naming the key (`train.lr`) and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distributed_train.errors import UsageError
from distributed_train.storage import has_credentials, is_url


def opt(default: Any, help: str) -> Any:
    """A config field with a default and a one-line help text (shown by `dtrain train --help`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


SEED_MAX = 2**32 - 1  # numpy's range; torch's generators also take seed * 100_003 + epoch


def _finite(key: str, value: float | int | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{key} must be a finite number, got {value}")


def _positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    _finite(key, value)
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class TrainConfig:
    batch_size: int = opt(64, "GLOBAL batch: samples per optimizer step across all ranks")
    micro_batch_size: Optional[int] = opt(None, "per-rank micro-batch; accumulation steps are derived")
    epochs: int = opt(1, "passes over the training set (ignored when max_steps is set)")
    max_steps: Optional[int] = opt(None, "optimizer steps in total; wins over epochs")
    lr: float = opt(1e-3, "peak learning rate")
    optimizer: Literal["adamw", "sgd"] = opt("adamw", "default optimizer when the task has none")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) or L2 (SGD)")
    grad_clip: float = opt(0.0, "clip the global gradient norm to this value; 0 = off")
    schedule: Literal["constant", "cosine"] = opt("constant", "LR schedule after warmup")
    warmup_steps: int = opt(0, "linear warmup steps")
    min_lr: float = opt(0.0, "final LR of the cosine schedule")
    precision: Literal["fp32", "bf16", "fp16", "fp64"] = opt(
        "fp32", "autocast dtype (fp16 adds a GradScaler); fp64: model and floating inputs in float64")
    compile: bool = opt(False, "torch.compile the model before DDP wraps it")
    nonfinite: Literal["error", "skip"] = opt("error", "what a NaN/inf loss does: stop, or skip the step")
    flush_denormal: bool = opt(True, "CPU: flush denormal floats to zero (denormals slow steps up to 100x)")
    tf32: bool = opt(
        True, "CUDA: fp32 matmuls and convolutions on TF32 tensor cores (A100 and newer); false = full fp32")
    profile_steps: int = opt(0, "record a torch.profiler trace of N steps (after the first) in run_dir/profile/")
    activation_checkpointing: Literal["none", "units"] = opt(
        "none", "units: recompute each unit's activations in backward (less memory, ~1/3 more compute)")

    def __post_init__(self) -> None:
        _positive("train.batch_size", self.batch_size)
        _positive("train.micro_batch_size", self.micro_batch_size)
        _positive("train.epochs", self.epochs)
        _positive("train.max_steps", self.max_steps)
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _positive("train.grad_clip", self.grad_clip, allow_zero=True)
        _positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("train.min_lr", self.min_lr, allow_zero=True)
        _positive("train.profile_steps", self.profile_steps, allow_zero=True)
        _positive("train.momentum", self.momentum, allow_zero=True)
        if self.min_lr > self.lr:
            raise UsageError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise UsageError(
                f"train.batch_size ({self.batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )


@dataclass
class DataConfig:
    num_workers: int = opt(0, "DataLoader worker processes per rank (0 = load in the training process)")
    pin_memory: Optional[bool] = opt(None, "pin host memory for faster copies; default: on with CUDA")
    worker_start_method: Literal["default", "fork", "forkserver", "spawn"] = opt(
        "forkserver", "how DataLoader workers start: forkserver (from a process without threads; the dataset is "
        "pickled into each worker), spawn, fork (shares memory but can hang at start in a rank with threads), "
        "default = Python's")

    def __post_init__(self) -> None:
        _positive("data.num_workers", self.num_workers, allow_zero=True)


@dataclass
class EvalConfig:
    every_steps: int = opt(0, "evaluate every N steps; 0 = only at the end")
    batch_size: Optional[int] = opt(None, "GLOBAL eval batch; default: train.batch_size")
    max_samples: Optional[int] = opt(
        None, "evaluate a fixed random subset of this many samples (the same on any world size)")

    def __post_init__(self) -> None:
        _positive("eval.every_steps", self.every_steps, allow_zero=True)
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.max_samples", self.max_samples)


@dataclass
class LogConfig:
    every_steps: int = opt(10, "log train metrics every N steps")
    wandb: Literal["auto", "online", "offline", "disabled"] = opt(
        "auto", "auto = online with an API key, else offline (disabled without the wandb package); never a login prompt"
    )
    wandb_project: str = opt("distributed_train", "wandb project name")
    progress_every_s: float = opt(10.0, "seconds between progress posts to a Kubeflow TrainJob (when its "
                                        "KUBEFLOW_TRAINER_SERVER_* variables are set)")
    peak_tflops: Optional[float] = opt(
        None, "peak TFLOP/s of one device for mfu; default: data sheet of known GPUs, none on CPU"
    )

    def __post_init__(self) -> None:
        _positive("log.every_steps", self.every_steps)
        _positive("log.progress_every_s", self.progress_every_s)
        _positive("log.peak_tflops", self.peak_tflops)


@dataclass
class CheckpointConfig:
    every_steps: int = opt(0, "commit a checkpoint every N steps; 0 = none")
    every_minutes: float = opt(0.0, "commit a checkpoint every N minutes of rank 0's clock, at the same "
                                    "step on every rank; 0 = none")
    interval: Literal["fixed", "auto"] = opt(
        "fixed", "auto: checkpoint at the interval in time that maximizes expected goodput, from the "
                 "measured save stall and checkpoint.mtbf_hours (Young/Daly); docs/goodput.md")
    mtbf_hours: float = opt(0.0, "with interval=auto: the job's mean time between failures; 0 = learned "
                                 "from this run directory's failures so far")
    grace_s: float = opt(25.0, "seconds a checkpoint after SIGTERM may take (torchrun and Kubernetes kill "
                               "30 s after it by default; dtrain k8s and dtrain slurm set it from their grace "
                               "period); when this attempt's last save says it would not fit, the last "
                               "committed checkpoint stands")
    keep_last: int = opt(2, "committed checkpoints kept after rotation")
    resume: str = opt("auto", "auto (latest committed in run_dir), never, or a checkpoint path")
    on_sigterm: bool = opt(True, "on SIGTERM, finish the step, commit a checkpoint and exit")
    overwrite: bool = opt(False, "with resume=never, allow replacing an existing run's checkpoints")
    allow_changes: bool = opt(False, "resume even if batch size, seed or task differ from the checkpoint")

    def __post_init__(self) -> None:
        _positive("checkpoint.every_steps", self.every_steps, allow_zero=True)
        _positive("checkpoint.every_minutes", self.every_minutes, allow_zero=True)
        _positive("checkpoint.mtbf_hours", self.mtbf_hours, allow_zero=True)
        _positive("checkpoint.grace_s", self.grace_s)
        _positive("checkpoint.keep_last", self.keep_last)
        if self.interval == "auto" and (self.every_steps or self.every_minutes):
            raise UsageError("checkpoint.interval=auto chooses the interval itself: leave checkpoint.every_steps "
                             f"({self.every_steps}) and checkpoint.every_minutes ({self.every_minutes:g}) at 0")

    @property
    def periodic(self) -> bool:
        """Checkpoints come during the run (by steps, by time or chosen), not only on a stop."""
        return bool(self.every_steps or self.every_minutes or self.interval == "auto")


@dataclass
class StorageConfig:
    cache_dir: str = opt("", "with run_dir=URL: the local folder each node works in; default "
                             "$DTRAIN_CACHE_DIR, else ~/.cache/dtrain")
    upload_every_s: float = opt(30.0, "with run_dir=URL: seconds between uploads of metrics.jsonl (also "
                                      "uploaded after each checkpoint) and refreshes of the lock's heartbeat")
    lock_stale_s: float = opt(300.0, "with run_dir=URL: a lock whose heartbeat is older than this is "
                                     "stale and taken over")

    def __post_init__(self) -> None:
        _positive("storage.upload_every_s", self.upload_every_s)
        _positive("storage.lock_stale_s", self.lock_stale_s)
        if self.lock_stale_s < 2 * self.upload_every_s:
            raise UsageError(f"storage.lock_stale_s ({self.lock_stale_s:g}) must be at least twice "
                             f"storage.upload_every_s ({self.upload_every_s:g}), the heartbeat's interval")


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = opt("auto", "auto = nccl with CUDA, else gloo")
    timeout_s: float = opt(300.0, "collective timeout; a missing rank fails the job after this long")

    def __post_init__(self) -> None:
        _positive("dist.timeout_s", self.timeout_s)


@dataclass
class DDPConfig:
    bucket_cap_mb: float = opt(25.0, "DDP gradient bucket size")
    gradient_as_bucket_view: bool = opt(True, "gradients alias the all-reduce buckets (saves a copy)")
    static_graph: bool = opt(False, "DDP static_graph: the same parameters are used every step")
    find_unused_parameters: bool = opt(False, "allow parameters that get no gradient in a step")
    sync_batchnorm: bool = opt(
        False, "BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only); false: per rank")
    comm_hook: Literal["none", "bf16", "fp16"] = opt(
        "none", "compress gradients for the all-reduce (bf16: GPUs only); changes the math slightly"
    )
    shm_allreduce: Literal["auto", "require", "never"] = opt(
        "auto", "CPU ranks on one host average gradients through /dev/shm, not gloo (same sums); "
        "auto: where possible"
    )
    wrap_one_rank: bool = opt(False, "wrap the model in DDP at world size 1 too (under torchrun): its reducer, "
                                     "no_sync and graph splitting under compile run as on N GPUs (checks; "
                                     "otherwise one rank trains the bare model, which is faster)")

    def __post_init__(self) -> None:
        _positive("ddp.bucket_cap_mb", self.bucket_cap_mb)
        if self.shm_allreduce == "require" and self.comm_hook != "none":
            raise UsageError(f"ddp.shm_allreduce=require cannot be combined with ddp.comm_hook={self.comm_hook} "
                             "(the compressed all-reduce runs on the backend); set one of them")


@dataclass
class FSDPConfig:
    """engine=fsdp: torch's FSDP2 (fully_shard) on each unit, then on the whole model."""

    units: list = opt([], "module class names to shard as units; default: the task's shard_units(), "
                          "else the blocks of the model's ModuleLists")
    reshard_after_forward: bool = opt(True, "free a unit's gathered parameters after its forward (less memory, "
                                            "one more all-gather in backward); the root's always stay: the "
                                            "backward needs them first")
    replicate: int = opt(1, "HSDP: replicate groups (e.g. nodes); parameters are sharded within each "
                            "group of world_size/replicate ranks; 1 = shard over all ranks")
    reduce_dtype: Literal["fp32", "bf16", "param"] = opt(
        "fp32", "dtype of the gradient reduce-scatter with train.precision=bf16/fp16 (param: the compute dtype)")
    cpu_offload: bool = opt(False, "keep sharded parameters, gradients and optimizer state in CPU memory (CUDA only)")

    def __post_init__(self) -> None:
        _positive("fsdp.replicate", self.replicate)
        bad = [u for u in self.units if not (isinstance(u, str) and u.isidentifier())]
        if bad:
            raise UsageError(f"fsdp.units must be module class names (e.g. [Block]); got {bad[0]!r}")


@dataclass
class AccelerateConfig:
    """Plugin settings for engine=accelerate on CUDA GPUs, passed as keyword arguments."""

    fsdp: dict = opt({}, "FullyShardedDataParallelPlugin kwargs, e.g. {fsdp_version: 2}")
    deepspeed: dict = opt({}, "DeepSpeedPlugin kwargs (needs deepspeed), e.g. {zero_stage: 2}")

    def __post_init__(self) -> None:
        if self.fsdp and self.deepspeed:
            raise UsageError("accelerate.fsdp and accelerate.deepspeed exclude each other; set only one")
        for name, kwargs in (("fsdp", self.fsdp), ("deepspeed", self.deepspeed)):
            bad = [k for k in kwargs if not (isinstance(k, str) and k.isidentifier())]
            if bad:
                raise UsageError(f"accelerate.{name} keys must be plugin argument names; got {bad[0]!r}")


@dataclass
class Config:
    task: str = opt("digits", "built-in name, package.module:attr, or path/to/file.py:attr")
    task_args: dict = opt({}, "free-form options passed to the task (its own keys)")
    seed: int = opt(0, "one seed for model init, data order and everything random")
    run_dir: Optional[str] = opt(None, "where this run writes everything; default runs/<task>-<time>")
    engine: Literal["ddp", "fsdp", "accelerate"] = opt("ddp", "ddp (torch DDP), fsdp (FSDP2 sharding) or accelerate")
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    accelerate: AccelerateConfig = field(default_factory=AccelerateConfig)

    def __post_init__(self) -> None:
        if not self.task:
            raise UsageError("task must name a built-in task, module:attr or file.py:attr")
        if is_url(self.run_dir) and has_credentials(self.run_dir):
            raise UsageError("run_dir must not carry credentials (it is written to config.yaml and the logs): "
                             "give them the standard way, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a "
                             "profile or the pod's identity (docs/storage.md)")
        if is_url(self.checkpoint.resume):  # never a local folder named "s3:"
            raise UsageError(f"checkpoint.resume={self.checkpoint.resume!r} is a URL; to continue a run in "
                             "object storage, give its URL as run_dir (checkpoint.resume=auto)")
        if not 0 <= self.seed <= SEED_MAX:
            raise UsageError(f"seed must be an integer from 0 to {SEED_MAX} (2**32-1), got {self.seed}")
        if (self.accelerate.fsdp or self.accelerate.deepspeed) and self.engine != "accelerate":
            raise UsageError("accelerate.fsdp / accelerate.deepspeed need engine=accelerate")
        # fsdp.units also names the units of train.activation_checkpointing under ddp.
        if dataclasses.replace(self.fsdp, units=[]) != FSDPConfig() and self.engine != "fsdp":
            raise UsageError("fsdp.reshard_after_forward / replicate / reduce_dtype / cpu_offload need engine=fsdp")


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts (file, task defaults) and `--key=value` strings.

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


_NOT_CONVERTED = object()  # a converter's answer for a value of the wrong type


def _to_bool(key: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    return _NOT_CONVERTED


def _to_int(key: str, value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(value.replace("_", "")) if isinstance(value, str) else _NOT_CONVERTED
    except ValueError:
        return _NOT_CONVERTED


def _to_float(key: str, value: Any) -> Any:
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return _NOT_CONVERTED
        number = float(value)
    except ValueError:
        return _NOT_CONVERTED
    _finite(key, number)
    return number


def _to_list(key: str, value: Any) -> Any:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, str):  # from the command line: A,B or [A, B]
        return [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    return _NOT_CONVERTED


_CONVERTERS = {
    bool: _to_bool, int: _to_int, float: _to_float, list: _to_list,
    str: lambda key, value: value if isinstance(value, str) else _NOT_CONVERTED,
    dict: lambda key, value: dict(value) if isinstance(value, dict) else _NOT_CONVERTED,
}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert `value` (a YAML value, or a raw string from the command line) to the field type."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.lower() in {"null", "none", ""}):
            return None
        return _coerce(key, value, inner)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise UsageError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
        return value
    converted = _CONVERTERS[hint](key, value) if hint in _CONVERTERS else _NOT_CONVERTED
    if converted is not _NOT_CONVERTED:
        return converted
    name = getattr(hint, "__name__", str(hint))
    raise UsageError(f"{key} must be {'a' if name != 'int' else 'an'} {name}; got {value!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(values, dict):
        raise UsageError(f"{prefix.rstrip('.') or 'config'} must be a mapping; got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(f"{prefix}{n}" for n in names))
            raise UsageError(f"unknown config key {full!r}; known keys here: {known}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, hint)
    return cls(**kwargs)


def _merge(base: dict, top: dict, prefix: str = "") -> dict:
    """Deep-merge `top` over `base` (both nested dicts); returns a new dict. A section given as a
    plain value in one and as keys in the other (`train: 5` and `--train.lr=0.1`) is an error,
    never one of the two silently dropped; free-form task_args values replace each other whole.
    An empty section (`train:` with every key commented out) is no keys."""
    merged = dict(base)
    for key, value in top.items():
        old = merged.get(key)
        if value is None and isinstance(old, dict):
            continue
        if old is None and isinstance(value, dict):
            old = {}
        if isinstance(value, dict) and isinstance(old, dict):
            merged[key] = _merge(old, value, f"{prefix}{key}.")
        elif (isinstance(value, dict) != isinstance(old, dict) and key in merged
              and not prefix.startswith("task_args.")):
            section, plain = (value, old) if isinstance(value, dict) else (old, value)
            first = next(iter(section), "key")
            raise UsageError(f"{prefix}{key} is given both as a section ({prefix}{key}.{first}) and as the "
                             f"value {plain!r}; a section takes keys: write {prefix}{key}.KEY=VALUE")
        else:
            merged[key] = value
    return merged


def parse_overrides(args: list[str]) -> dict:
    """Turn `--train.lr=0.1` / `--train.lr 0.1` arguments into a nested dict of raw strings."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UsageError(f"expected --section.key=value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise UsageError(f"{arg} needs a value: {arg}=VALUE")
        parts = key.replace("-", "_").split(".") if not key.startswith("task_args.") else key.split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--{key} conflicts with another override")
        # task_args and plugin kwargs have no declared type: read them as YAML scalars (12 -> int).
        free_form = parts[0] == "task_args" or parts[:2] in (["accelerate", "fsdp"],
                                                             ["accelerate", "deepspeed"])
        node[parts[-1]] = _yaml_value(key, value) if free_form else value
        i += 1
    return tree


def _yaml_value(key: str, value: str) -> object:
    """A free-form override's value read as YAML (`12` -> 12, `[1, 2]` -> a list); not YAML: one line."""
    try:
        return yaml.load(value, Loader=_UniqueKeyLoader)
    except UsageError as exc:  # a key twice
        raise UsageError(f"--{key}={value}: {exc}") from None
    except yaml.YAMLError as exc:
        problem = _yaml_problem(exc).split(": ", 1)[-1]
        raise UsageError(f"--{key}={value} is not a YAML value ({problem}); quote a string in YAML: "
                         f"--{key}=\"'{value}'\"") from None


MAX_YAML_VALUES = 100_000  # values in a config once its aliases are expanded


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping, a key that is not a
    plain value (`? [a, b]`) and aliases that expand past MAX_YAML_VALUES are errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise UsageError(f"the key at line {line} is a {kind}; keys are plain names")
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise UsageError(f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise UsageError(f"its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values; refused "
                             "(a YAML alias bomb?)")
        return self.construct_document(node)


def _expanded_size(node: yaml.Node, sizes: dict) -> int:
    """How many values `node` holds once every alias is replaced by a copy of what it names;
    linear in the document, however far the aliases expand (a node is sized once)."""
    if id(node) not in sizes:
        sizes[id(node)] = MAX_YAML_VALUES + 1  # a node inside itself (a recursive alias) is too big
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        total = 1
        for child in children:
            total += _expanded_size(child, sizes)
            if total > MAX_YAML_VALUES:
                break
        sizes[id(node)] = total
    return sizes[id(node)]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line L, column C: problem` from a PyYAML error (its str() spreads over several lines)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "'\\t'" in problem:
        problem += " (YAML indents with spaces, not tabs)"
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + problem


def read_config_file(path: str | Path) -> dict:
    """Read a YAML config file into a nested dict."""
    path = Path(path)
    name = repr(str(path))
    if path.is_dir():
        raise UsageError(f"config file {name} is a directory; pass a YAML file")
    if not path.is_file():
        raise UsageError(f"config file {name} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise UsageError(f"config file {name} is not UTF-8 text (line {line} has the byte "
                         f"0x{exc.object[exc.start]:02x}); save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"config file {name} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except UsageError as exc:
        raise UsageError(f"config file {name}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {name} is not valid YAML at {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {name} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None,
                task_defaults: Any = None) -> Config:
    """Resolve the configuration: defaults < task defaults < file < command line.

    `task_defaults` is a callable taking the task name and returning that task's
    `config_defaults` dict (or {}); it lets built-in tasks ship sensible epochs and lr.
    """
    user = _merge(read_config_file(path) if path else {}, parse_overrides(overrides or []))
    task_name = user.get("task", Config.task)
    defaults = task_defaults(task_name) if task_defaults and isinstance(task_name, str) else {}
    return _build(Config, _merge(defaults or {}, user))


def to_dict(config: Config) -> dict:
    """The resolved configuration as plain nested dicts (what config.yaml holds)."""
    return dataclasses.asdict(config)


def from_dict(values: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. the copy stored in a checkpoint)."""
    return _build(Config, values)


def dump_yaml(config: Config) -> str:
    """YAML text of the resolved configuration."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every config key, for `--help` and the README."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))

    walk(Config, "")
    return rows


TABLE_START, TABLE_END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def markdown_table() -> str:
    """The config keys as the Markdown table in docs/configuration.md."""
    rows = [f"| `{key}` | `{default}` | {help_text} |" for key, default, help_text in describe()]
    return "\n".join(["| key | default | meaning |", "| --- | --- | --- |", *rows]) + "\n"


if __name__ == "__main__":
    # `python3 -m distributed_train.config` prints the table; `... --write docs/configuration.md`
    # replaces the one between the markers in that file (a test checks it is current).
    if sys.argv[1:2] == ["--write"]:
        page = Path(sys.argv[2])
        head, rest = page.read_text().split(TABLE_START)
        page.write_text(f"{head}{TABLE_START}\n{markdown_table()}{TABLE_END}{rest.split(TABLE_END)[1]}")
    else:
        print(markdown_table(), end="")
