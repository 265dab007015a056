"""The README and docs/ stay true to the code: the config table, the quickstart CI runs, the example
task, the guarantees' tests, the links, the README's size, and no internal ticket numbers."""

import re

import pytest
import torch

from distributed_train.config import TABLE_END, TABLE_START, describe, markdown_table
from distributed_train.task import load_task
from tests.helpers import REPO

README = (REPO / "README.md").read_text()
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS, REPO / "tests" / "README.md", REPO / "benchmarks" / "README.md"]
# Topic pages other engineers are writing: their links are checked once the pages exist.
PAGES_IN_PROGRESS = {"kubernetes.md", "faults.md", "gpu.md", "sharding.md", "language-models.md"}


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n")[1].split("\n## ")[0]


def test_config_table_matches_the_code():
    page = (REPO / "docs" / "configuration.md").read_text()
    table = page.split(TABLE_START)[1].split(TABLE_END)[0]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \| (.*) \|$", table, flags=re.M)
    assert rows == list(describe()), \
        "docs/configuration.md is stale: python3 -m distributed_train.config --write docs/configuration.md"
    assert table.strip() == markdown_table().strip()


def test_quickstart_has_the_two_commands_ci_runs():
    quickstart = section(README, "Quickstart")
    assert "pip install -c .ci/constraints-cpu.txt -e \".[dev]\" && dtrain launch" in quickstart
    assert "python -m pytest" in quickstart
    ci = (REPO / ".ci" / "run").read_text()
    assert "-c .ci/constraints-cpu.txt -e \".[dev]\"" in ci and "pytest" in ci


def test_quickstart_names_the_torch_version_the_constraints_pin():
    pin = re.search(r"^torch==(\S+)$", (REPO / ".ci" / "constraints-cpu.txt").read_text(), flags=re.M)
    assert pin, "the constraints file pins torch"
    quickstart = section(README, "Quickstart")
    assert f"torch=={pin[1]}" in quickstart and f"pip install torch=={pin[1]} --index-url" in quickstart


def test_readme_is_short():
    assert len(README.encode()) <= 12 * 1024, f"README.md is {len(README.encode())} bytes; move detail to docs/"


def test_the_readme_example_task_trains(tmp_path):
    code = re.search(r"```python\n(import torch\n.*?class Task:.*?)```", section(README, "Writing a task"),
                     flags=re.S)[1]
    (tmp_path / "readme_example_task.py").write_text(code)
    task = load_task(f"{tmp_path / 'readme_example_task.py'}:Task")
    model = task.model()
    dataset = task.train_dataset()
    batch = torch.utils.data.default_collate([dataset[i] for i in range(64)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_every_guarantee_names_a_test_that_exists():
    table = section(README, "Guarantees, and the tests that prove them")
    names = re.findall(r"^\|.*\| `(test_\w+)` \|$", table, flags=re.M)
    assert len(names) >= 10
    defined = {m for path in (REPO / "tests").rglob("test_*.py")
               for m in re.findall(r"^def (test_\w+)\(", path.read_text(), flags=re.M)}
    assert not [n for n in names if n not in defined], "README names tests that do not exist"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_links_resolve_and_no_ticket_numbers(page):
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = (page.parent / target).resolve()
        if not path.exists() and path.name not in PAGES_IN_PROGRESS:
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files {broken}"
    assert not re.search(r"\b(issue|ticket)s? ?#?\d+", text, flags=re.I), f"{page.name} mentions a ticket number"


def test_docs_has_one_page_per_topic():
    names = {p.name for p in DOCS}
    assert {"configuration.md", "engines.md", "fault-tolerance.md", "robustness.md", "logging.md",
            "performance.md", "architecture.md"} <= names
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", section(README, "Documentation")))
    assert names <= linked, f"README does not link {sorted(names - linked)}"


def tree_paths(tree: str, root) -> list:
    """Every path a ```text file tree names: `name`, `name/` or `a.py, b.py` before its description
    (two or more spaces); an entry indented two more spaces lies in the folder above it."""
    folders, paths = {}, []
    for line in filter(str.strip, tree.splitlines()):
        indent = len(line) - len(line.lstrip())
        head = re.split(r"\s{2,}", line.strip())[0]
        for name in head.split(", "):
            assert re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", name), f"not a file or folder name: {line!r}"
            path = (folders[indent - 2] if indent else root) / name.rstrip("/")
            paths.append(path)
            if name.endswith("/"):
                folders[indent] = path
    return paths


def text_block(text: str, first_line: str) -> str:
    return re.search(rf"```text\n({re.escape(first_line)}.*?)```", text, flags=re.S)[1]


def test_the_file_trees_name_what_exists_and_architecture_names_every_module():
    readme = tree_paths(text_block(section(README, "Files"), "pyproject.toml"), REPO)
    package = REPO / "distributed_train"
    architecture = tree_paths(text_block((REPO / "docs" / "architecture.md").read_text(), "cli/"), package)
    assert len(readme) > 15 and len(architecture) > 40  # the parser read the trees
    assert [str(p.relative_to(REPO)) for p in readme + architecture if not p.exists()] == []
    modules = {p for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    folders = {p.parent for p in modules if p.parent != package}
    missing = sorted(str(p.relative_to(package)) for p in (modules | folders) - set(architecture))
    assert missing == [], "docs/architecture.md's tree does not name these"


def test_each_command_help_describes_it_in_full(capsys):
    """`dtrain COMMAND --help` shows the whole first paragraph of the command's docstring, not its
    first line cut mid-sentence."""
    import importlib

    from distributed_train import cli

    checked = []
    for name in set(cli.COMMANDS) - {"train", "launch"}:  # these two print their own help
        module = importlib.import_module(f"distributed_train.cli.{name.replace('-', '_')}")
        try:
            code = cli.main([name, "--help"])
        except SystemExit as exc:  # argparse's own exit after printing the help
            code = exc.code
        assert code == 0, name
        shown = " ".join(capsys.readouterr().out.split())
        assert cli.described(module.__doc__) in shown, name
        checked.append(name)
    assert set(checked) == set(cli.COMMANDS) - {"train", "launch"}
