"""The task protocol and loading tasks by built-in name, `package.module:attr` or `file.py:attr`.

A task supplies a Dataset, a model and a loss, or a criterion for (inputs, targets) batches (see
README). `Task` wraps the user's object and checks what each method returns, so a mistake is
reported as the method that made it. Tasks load the way Python runs code: `path/to/file.py:attr`
like `python path/to/file.py` (its folder first on sys.path), `package.module:attr` like
`python -m` (the current folder first on sys.path).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import io
import math
import numbers
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distributed_train.batches import first_tensor
from distributed_train.errors import UsageError, refuse_signals_to_self, sigint_received
from distributed_train.files import path_problem

BUILTIN_TASKS = {
    "digits": "distributed_train.tasks.digits:DigitsTask",
    "charlm": "distributed_train.tasks.charlm:CharLMTask",
    "lm": "distributed_train.tasks.lm:LMTask",
}
REQUIRED_METHODS = ("train_dataset", "model", "loss")


def _put_first_on_sys_path(folder: str) -> None:
    # Workers resolve the task themselves, and DataLoader workers (fork, spawn, forkserver) inherit
    # sys.path, so doing this where the task is resolved covers every process of a job.
    if sys.path[0] != folder:
        sys.path.insert(0, folder)


def _import_module_from_file(path: Path) -> Any:
    """Import `path` the way `python path` sees it: its folder first on sys.path, so it can import
    its neighbours (`from model import GPT`), under its own name (`mytask`), so that what it defines
    pickles by reference into spawned DataLoader workers."""
    path = path.resolve()
    _put_first_on_sys_path(str(path.parent))
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
        return loaded
    if loaded is not None or not name.isidentifier():
        # Another module already has this name (or the name is no identifier): a private name
        # still trains, but classes in the file only pickle into forked DataLoader workers.
        name = "dtrain_task_" + "".join(c if c.isalnum() else "_" for c in str(path))
        if name in sys.modules:
            return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as exc:
        del sys.modules[name]
        raise UsageError(f"task file {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(where: str) -> Any:
    """Import `package.module` the way `python -m` sees it: the current folder first on sys.path."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        _put_first_on_sys_path(cwd)
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        hint = ""
        if missing and (where == missing or where.startswith(missing + ".")):  # not a dependency of it
            hint = (f" (looked in the current folder {cwd} and the installed packages; run from the "
                    "folder that holds the package, or pip install it)")
        raise UsageError(f"task module {where!r} cannot be imported: {type(exc).__name__}: {exc}{hint}") from exc


@functools.lru_cache(maxsize=None)
def resolve_attr(spec: str) -> Any:
    """The object `spec` names (a class, factory or instance), without calling it."""
    target = BUILTIN_TASKS.get(spec, spec)
    if ":" not in target:
        known = ", ".join(BUILTIN_TASKS)
        raise UsageError(f"task {spec!r} is not a built-in ({known}), module:attr or file.py:attr")
    where, attr = target.rsplit(":", 1)
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if problem := path_problem(path, "file"):
            raise UsageError(f"task file {where!r} {problem} (task={spec!r})")
        module = _import_module_from_file(path)
    elif spec in BUILTIN_TASKS:
        module = importlib.import_module(where)
    else:
        module = _import_module(where)
    try:
        return functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise UsageError(f"task {spec!r}: {where!r} has no attribute {attr!r}") from None


def config_defaults(spec: str) -> dict:
    """The task's `config_defaults` dict (class or instance attribute), or {}."""
    defaults = getattr(resolve_attr(spec), "config_defaults", None) or {}
    if not isinstance(defaults, dict):
        raise UsageError(f"task {spec!r}: config_defaults must be a dict of config sections")
    return defaults


def _takes_argument(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def load_task(spec: str, config: Any = None) -> "Task":
    """Load and check the task `spec`; a class or factory is called (with the config if it takes one)."""
    obj = resolve_attr(spec)
    if inspect.isclass(obj) or (callable(obj) and not (hasattr(obj, "loss") or hasattr(obj, "criterion"))):
        try:
            obj = obj(config) if _takes_argument(obj) else obj()
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"task {spec!r} failed to construct: {type(exc).__name__}: {exc}") from exc
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(obj, m, None))]
    if "loss" in missing and getattr(obj, "criterion", None) is not None:
        missing.remove("loss")
    if missing:
        raise UsageError(
            f"task {spec!r} has no {', '.join(m + '()' for m in missing)}; a task needs "
            "train_dataset(), model() and loss(model, batch) (or a criterion, for batches of "
            "(inputs, targets))"
        )
    return Task(obj, spec)


def check_model(model: Any) -> nn.Module:
    """`model` if it is a Module with something to train, else a UsageError saying what it is."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"task.model() must return a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError("task.model() returned a model without trainable parameters (none with "
                         "requires_grad=True): there is nothing to train")
    return model


# In-place writes of values only (random fills, and what torch.nn.init does with them): they keep a
# tensor's shape, dtype and device, so on the meta device, where there are no values, they can be
# skipped. Worth it: the meta kernels of several (normal_, trunc_normal_'s erfinv_ and clamp_) are
# Python references that import torch._dynamo on first use, ~1 s, and almost every transformer
# initialises with normal_.
_VALUE_FILLS = frozenset({
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.exponential_, torch.Tensor.cauchy_,
    torch.Tensor.log_normal_, torch.Tensor.geometric_, torch.Tensor.bernoulli_, torch.Tensor.random_,
    torch.Tensor.erfinv_, torch.Tensor.clamp_, torch.Tensor.fill_, torch.Tensor.zero_})


class _SkipFillsOnMeta(torch.overrides.TorchFunctionMode):
    """Skips value fills (above, and every torch.nn.init function) of meta tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
        if isinstance(target, torch.Tensor) and target.is_meta and (
                func in _VALUE_FILLS or (getattr(func, "__module__", None) == "torch.nn.init"
                                         and func.__name__.endswith("_"))):
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta_device():
    """Build modules on the meta device (shapes only, no memory), without running their
    initialisation: a model's structure in milliseconds, however its weights are initialised."""
    with torch.device("meta"), _SkipFillsOnMeta():
        yield


def check_model_before_spawn(spec: str, config: Any) -> None:
    """Build the task's model on the meta device (no memory, no weights) so that a model without
    trainable parameters stops `dtrain launch` before any worker starts. Other failures here are
    left to the workers, which report them with the full context. What model() prints here is not
    shown: each worker builds the model once and shows it, with its rank."""
    task = load_task(spec, config)
    refuse_signals_to_self()  # a SIGTERM model() sent itself would stop the launcher
    try:
        with on_meta_device(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            model = task.obj.model()
    except SystemExit as exc:  # the launcher would exit 0 with it
        raise exited("task.model()", exc) from None
    except Exception:  # noqa: BLE001 - a model that needs a real device: the workers build it
        return
    finally:
        refuse_signals_to_self(False)
    check_model(model)


def exited(where: str, exc: SystemExit) -> UsageError:
    """Task code that called sys.exit(): a task error, never a finished job (exit code 0)."""
    return UsageError(f"{where} called sys.exit({exc.code!r}); task code must return or raise, "
                      "not end the process")


def _check_criterion(obj: Any) -> Any:
    """The task's criterion: an nn.Module or a function of (outputs, targets), maybe from criterion()."""
    criterion = obj.criterion
    static = inspect.getattr_static(obj, "criterion", None)
    if inspect.isfunction(static) and "." not in static.__qualname__ and not isinstance(obj, type):
        # `criterion = F.nll_loss` in a class body: Python binds it to the task object as a method;
        # a function written outside any class body is meant as it is, (outputs, targets).
        criterion = static
    if callable(criterion) and not isinstance(criterion, nn.Module) and not _takes_argument(criterion):
        criterion = criterion()  # `def criterion(self): return nn.CrossEntropyLoss()`, like model()
    if not callable(criterion):
        raise UsageError("task.criterion must be an nn.Module or a function of (outputs, targets), "
                         f"got {type(criterion).__name__}")
    if isinstance(criterion, nn.Module):
        names = [name for name, _ in criterion.named_parameters()]
        if names:
            # They would be in no optimizer and never synchronised across ranks.
            raise UsageError(
                f"task.criterion ({type(criterion).__name__}) has parameters ({', '.join(names)}) that "
                "dtrain would neither train nor keep in sync across ranks: move them into the model "
                "(or make constants buffers), or write loss(model, batch) instead"
            )
    return criterion


def _describe_batch(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"


def _first_parameter(method: Any) -> str | None:
    """The name of a bound method's first parameter (None when it takes none or cannot be read)."""
    try:
        names = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return None
    return names[0] if names else None


def not_from_the_user(exc: BaseException) -> bool:
    """A BaseException that is not the task's: a real Ctrl-C, or a generator closing."""
    return isinstance(exc, GeneratorExit) or (isinstance(exc, KeyboardInterrupt) and sigint_received())


def base_exception(where: str, exc: BaseException) -> UsageError:
    """A KeyboardInterrupt no Ctrl-C caused, or another BaseException, raised by task code: a task
    failure (exit 2), never a stop by the user (exit 130) or a crash without a name."""
    what = "KeyboardInterrupt without a Ctrl-C (SIGINT)" if isinstance(exc, KeyboardInterrupt) else \
        f"{type(exc).__name__} (a BaseException, not an Exception)"
    detail = f": {(str(exc).splitlines() or [''])[0]}" if str(exc) else ""
    return UsageError(f"{where} raised {what}{detail}; task code must return or raise an Exception")


def _guarded(where: str, function: Any, *args: Any) -> Any:
    """Call task code: whatever it raises becomes one line naming `where` (exit 2)."""
    try:
        return function(*args)
    except UsageError:
        raise
    except SystemExit as exc:  # exit code 0 from a worker would read as a finished job
        raise exited(where, exc) from None
    except Exception as exc:
        raise UsageError(f"{where} raised {type(exc).__name__}: {exc}") from exc
    except BaseException as exc:
        if not_from_the_user(exc):
            raise
        raise base_exception(where, exc) from None


def _checked_lr(function: Any, step: int) -> float:
    """The learning rate a task's schedule function gives for `step`: a finite number >= 0."""
    where = f"the function task.scheduler() returned (at step {step})"
    value = _guarded(where, function, step)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()  # once per optimizer step, on a schedule the task chose to compute so
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{where} must return the learning rate, a finite number >= 0; got {value!r:.60}")
    return float(value)


class Task:
    """The user's task with every result checked; the rest of the package only talks to this."""

    def __init__(self, obj: Any, name: str):
        self.obj = obj
        self.name = name
        # loss(model, batch) wins when a task has both (its loss may use its own criterion).
        self.criterion = None if callable(getattr(obj, "loss", None)) else _check_criterion(obj)
        self._criterion_on: dict[tuple[torch.device, bool], nn.Module] = {}  # per device, fp64 or not

    def _call(self, method: str, *args: Any) -> Any:
        return _guarded(f"task.{method}()", getattr(self.obj, method), *args)

    def _check_dataset(self, dataset: Any, method: str) -> Any:
        if isinstance(dataset, torch.utils.data.IterableDataset):
            if method == "train_dataset":
                return dataset  # a stream: training/iterable.py
            raise UsageError(f"task.{method}() returned an IterableDataset; evaluation counts every sample "
                             "exactly once on any world size, which needs a map-style Dataset (a list or "
                             "TensorDataset of the held-out samples)")
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise UsageError(
                f"task.{method}() must return a map-style Dataset (with __len__ and __getitem__) or, "
                f"for training, an IterableDataset; got {type(dataset).__name__}"
            )
        try:
            size = len(dataset)
        except Exception as exc:  # noqa: BLE001 - the task's __len__: one line naming it
            raise UsageError(f"task.{method}()'s dataset cannot tell its length: __len__ raised "
                             f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from None
        if size == 0:
            raise UsageError(f"task.{method}() returned an empty dataset")
        return dataset

    def train_dataset(self) -> Any:
        return self._check_dataset(self._call("train_dataset"), "train_dataset")

    def eval_dataset(self) -> Any | None:
        if not callable(getattr(self.obj, "eval_dataset", None)):
            return None
        dataset = self._call("eval_dataset")
        return None if dataset is None else self._check_dataset(dataset, "eval_dataset")

    def model(self) -> nn.Module:
        return check_model(self._call("model"))

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss over `batch`; checked for shape (no host sync)."""
        total, count = self.loss_terms(model, batch)
        return total if count is None else total / count.clamp_min(1).to(total.dtype)

    def loss_terms(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the mean loss, None), or (the summed loss, how many terms it sums) when task.loss
        returns a pair: then the step divides by the count over every rank and micro-batch (a
        token-mean loss of padded batches, exact on any world size and accumulation)."""
        if self.criterion is None:
            result = self.obj.loss(model, batch)
            if isinstance(result, (tuple, list)):
                return self._checked_sum(result)
            return self._checked_loss(result, "task.loss()"), None
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise UsageError(
                f"task.criterion needs batches of (inputs, targets), got {_describe_batch(batch)}: "
                "make train_dataset()[i] an (input, target) pair, or write loss(model, batch) instead"
            )
        inputs, targets = batch
        outputs = model(inputs)
        return self._checked_loss(self._criterion_for(outputs)(outputs, targets), "task.criterion"), None

    def _criterion_for(self, outputs: Any) -> Any:
        """The criterion with its buffers (class weights, ...) on the outputs' device, and in float64
        for float64 outputs (train.precision=fp64)."""
        criterion = self.criterion
        if not isinstance(criterion, nn.Module) or next(criterion.buffers(), None) is None:
            return criterion
        tensor = first_tensor(outputs)
        device = tensor.device if tensor is not None else torch.device("cpu")
        fp64 = tensor is not None and tensor.dtype == torch.float64
        if (device, fp64) not in self._criterion_on:  # a copy: FLOP counting runs it on the meta device
            moved = copy.deepcopy(criterion).to(device)
            self._criterion_on[device, fp64] = moved.to(torch.float64) if fp64 else moved
        return self._criterion_on[device, fp64]

    @staticmethod
    def _checked_loss(loss: Any, what: str, meaning: str = "the mean loss", returned: bool = True) -> torch.Tensor:
        """`loss` if it is a scalar tensor with grad (`what` returned it, or holds it: `returned`)."""
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise UsageError(f"{what} must {'return' if returned else 'be'} a scalar tensor ({meaning}), got {shape}")
        if not loss.requires_grad and torch.is_grad_enabled():
            raise UsageError(f"{what} {'returned' if returned else 'is'} a tensor without grad: "
                             "compute it from model(batch)")
        return loss

    @classmethod
    def _checked_sum(cls, pair: tuple | list) -> tuple[torch.Tensor, torch.Tensor]:
        """task.loss()'s (sum, count): the sum checked as a loss is; the count (a number, or a
        one-element tensor: tokens, or a sum of weights) as a float64 tensor on the sum's device,
        without a host sync."""
        if len(pair) != 2:
            raise UsageError(f"task.loss() must return the mean loss or a pair (sum, count), got a "
                             f"{type(pair).__name__} of {len(pair)}")
        total, count = pair
        cls._checked_loss(total, "the sum in task.loss()'s (sum, count)", "the summed loss", returned=False)
        if isinstance(count, torch.Tensor) and count.numel() == 1 and not count.is_complex():
            return total, count.reshape(()).to(total.device, torch.float64, non_blocking=True)
        if isinstance(count, numbers.Real) and not isinstance(count, bool) and count >= 0:
            # A fill kernel with the number as its argument: no copy from host memory to wait for.
            return total, torch.full((), float(count), dtype=torch.float64, device=total.device)
        shape = tuple(count.shape) if isinstance(count, torch.Tensor) else repr(count)
        raise UsageError("the count in task.loss()'s (sum, count) must be a number >= 0 or a one-element "
                         f"tensor (how many terms the sum adds up), got {shape}")

    @property
    def has_metrics(self) -> bool:
        return callable(getattr(self.obj, "metrics", None))

    def metrics(self, model: nn.Module, batch: Any) -> dict[str, tuple[Any, Any]]:
        result = self.obj.metrics(model, batch)
        if not isinstance(result, dict) or not all(
            isinstance(v, (tuple, list)) and len(v) == 2 for v in result.values()
        ):
            raise UsageError("task.metrics() must return a dict of name -> (sum, count)")
        return result

    def collate_fn(self) -> Any | None:
        fn = getattr(self.obj, "collate", None)
        return fn if callable(fn) else None

    def optimizer(self, model: nn.Module, config: Any) -> torch.optim.Optimizer | None:
        """The task's optimizer: `optimizer(model, config)` gets the module (nanoGPT's
        configure_optimizers groups by parameter name), `optimizer(params, config)` its parameters."""
        method = getattr(self.obj, "optimizer", None)
        if not callable(method):
            return None
        takes_model = _first_parameter(method) == "model"
        opt = self._call("optimizer", model if takes_model else model.parameters(), config)
        if not isinstance(opt, torch.optim.Optimizer):
            raise UsageError(f"task.optimizer() must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt

    def scheduler(self, optimizer: torch.optim.Optimizer, config: Any) -> Any | None:
        """The task's LR schedule, stepped once per optimizer step: an LRScheduler it built on
        `optimizer`, or a function of the step (0, 1, ...) giving the learning rate (nanoGPT's
        get_lr), applied to every parameter group. None: `train.schedule`."""
        if not callable(getattr(self.obj, "scheduler", None)):
            return None
        made = self._call("scheduler", optimizer, config)
        lr_scheduler = torch.optim.lr_scheduler
        if isinstance(made, lr_scheduler.ReduceLROnPlateau):
            raise UsageError("task.scheduler() returned ReduceLROnPlateau, which needs a metric at every step; "
                             "return a schedule of the step (an LRScheduler, or a function step -> lr)")
        if isinstance(made, lr_scheduler.LRScheduler):
            if made.optimizer is not optimizer:
                raise UsageError("task.scheduler(optimizer, config) must schedule the optimizer it is given")
            return made
        if callable(made) and not isinstance(made, type):
            return functools.partial(_checked_lr, made)
        raise UsageError("task.scheduler() must return a torch.optim.lr_scheduler.LRScheduler or a function "
                         f"of the step returning the learning rate, got {type(made).__name__}")

    def shard_units(self, model: nn.Module) -> list[nn.Module] | None:
        """The task's own fsdp / activation-checkpointing units of `model`, or None."""
        if not callable(getattr(self.obj, "shard_units", None)):
            return None
        units = self._call("shard_units", model)
        if not isinstance(units, (list, tuple)) or not all(isinstance(u, nn.Module) for u in units):
            raise UsageError("task.shard_units(model) must return a list of submodules of the model")
        return list(units)

    @property
    def tokens_per_sample(self) -> int | None:
        return getattr(self.obj, "tokens_per_sample", None)

    def flops_per_sample(self) -> float | None:
        fn = getattr(self.obj, "flops_per_sample", None)
        return fn() if callable(fn) else fn
