"""The README's config table and quickstart stay true to the code."""

import re

from distributed_train.config import describe
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


def test_config_table_matches_the_code():
    table = README.split("<!-- config-table:start")[1].split("<!-- config-table:end -->")[0]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \| (.*) \|$", table, flags=re.M)
    assert rows == list(describe()), "README config table is stale: regenerate it from config.describe()"


def test_quickstart_has_the_two_commands_ci_runs():
    quickstart = README.split("## Quickstart")[1].split("## ")[0]
    assert "pip install -c .ci/constraints-cpu.txt -e \".[dev]\" && dtrain launch" in quickstart
    assert "python -m pytest" in quickstart
    ci = (REPO / ".ci" / "run").read_text()
    assert "-c .ci/constraints-cpu.txt -e \".[dev]\"" in ci and "pytest" in ci
