"""Tasks load the way Python runs code: `path/to/file.py:attr` like `python path/to/file.py`,
`package.module:attr` like `python -m` from the current folder; also in the launching process.

The same layouts under `dtrain launch`, torchrun and DataLoader workers: tests/e2e/test_task_layouts.py.
"""

import os
import pickle
import sys
import textwrap

import pytest

from distributed_train.errors import UsageError
from distributed_train.task import load_task, resolve_attr

TASK_BODY = textwrap.dedent("""
    import torch
    from torch.utils.data import Dataset

    class Squares(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            x = torch.tensor([float(i % 4)])
            return x, x * x

    class Task:
        criterion = torch.nn.MSELoss()

        def train_dataset(self):
            return Squares()

        def model(self):
            return NET()
""")


def write_project(root, model_module):
    """A project folder: a task file that imports a neighbour, and a package `NAMEpkg/tasks.py`."""
    root.mkdir()
    (root / f"{model_module}.py").write_text("import torch\n\ndef NET():\n    return torch.nn.Linear(1, 1)\n")
    (root / f"{model_module}_task.py").write_text(f"from {model_module} import NET\n" + TASK_BODY)
    package = root / f"{model_module}pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(f"from {model_module} import NET\n" + TASK_BODY)


@pytest.fixture
def isolated_imports(monkeypatch):
    """sys.path and sys.modules as they were, and no cached task, after the test."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    modules = dict(sys.modules)
    resolve_attr.cache_clear()
    yield
    resolve_attr.cache_clear()
    for name in set(sys.modules) - set(modules):
        del sys.modules[name]


def test_task_file_imports_its_neighbours_and_pickles_by_name(tmp_path, monkeypatch, isolated_imports):
    write_project(tmp_path / "proj", "netfile")
    monkeypatch.chdir(tmp_path)  # not the task's folder: like `dtrain launch proj/netfile_task.py:Task`
    task = load_task("proj/netfile_task.py:Task")
    assert sys.path[0] == str(tmp_path / "proj")  # as `python proj/netfile_task.py` would have it
    dataset = task.train_dataset()
    assert type(dataset).__module__ == "netfile_task"  # its own name: spawned DataLoader workers import it
    assert pickle.loads(pickle.dumps(dataset))[3][1].item() == 9.0
    assert task.loss(task.model(), dataset[0]).dim() == 0


def test_package_task_resolves_from_the_current_folder(tmp_path, monkeypatch, isolated_imports):
    write_project(tmp_path / "proj", "netpkg")
    monkeypatch.chdir(tmp_path / "proj")
    assert str(tmp_path / "proj") not in sys.path  # like the `dtrain` script: its own folder, not the cwd
    task = load_task("netpkgpkg.tasks:Task")
    assert sys.path[0] == str(tmp_path / "proj")
    assert type(task.train_dataset()).__module__ == "netpkgpkg.tasks"


def test_launch_checks_both_layouts_before_spawning(tmp_path, monkeypatch, isolated_imports):
    from distributed_train.cli.launch import _validate_before_spawn

    write_project(tmp_path / "proj", "netlaunch")
    monkeypatch.chdir(tmp_path / "proj")
    for spec in ["netlaunchpkg.tasks:Task", "netlaunch_task.py:Task"]:
        train, config = _validate_before_spawn([spec, "--train.max_steps=1"])
        assert config.task == spec and any(a.startswith("--run_dir=") for a in train)


def test_a_second_file_with_a_taken_name_still_loads(tmp_path, monkeypatch, isolated_imports):
    for folder in ("a", "b"):
        write_project(tmp_path / folder, "same")
    first = resolve_attr(f"{tmp_path}/a/same_task.py:Task")
    second = resolve_attr(f"{tmp_path}/b/same_task.py:Task")
    assert first.__module__ == "same_task" and second.__module__.startswith("dtrain_task_")
    assert first is not second and resolve_attr(f"{tmp_path}/a/same_task.py:Task") is first


def test_missing_package_says_where_it_looked(tmp_path, monkeypatch, isolated_imports):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=rf"task module 'nopkg_xyz.tasks' cannot be imported: "
                                         rf"ModuleNotFoundError: .* \(looked in the current folder {tmp_path}"):
        load_task("nopkg_xyz.tasks:Task")


def test_a_missing_dependency_of_the_package_is_named_without_the_folder_hint(tmp_path, monkeypatch,
                                                                              isolated_imports):
    (tmp_path / "deppkg").mkdir()
    (tmp_path / "deppkg" / "__init__.py").write_text("")
    (tmp_path / "deppkg" / "tasks.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"task module 'deppkg.tasks' cannot be imported: ModuleNotFoundError: "
                                         r"No module named 'no_such_dependency_xyz'$"):
        load_task("deppkg.tasks:Task")
