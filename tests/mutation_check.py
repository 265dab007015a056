"""Mechanism-removal check: every guarantee's mechanism, removed, must make a test fail.

For each mutation below, a temporary copy of the repository gets one mechanism removed (one exact
text replacement in one file), then only the tests named for it run against that copy. A
mutation that no test catches means a guarantee nobody proves: the script exits 1 and says
which. A mutation whose text is no longer found also fails (the code moved: update the entry).

    python3 tests/mutation_check.py            # all mutations
    python3 tests/mutation_check.py --list     # names only
    python3 tests/mutation_check.py NAME ...   # some of them
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str  # the mechanism, in the words of the guarantee it supports
    path: str  # file relative to the repository root
    old: str  # exact text that implements the mechanism (must occur exactly once)
    new: str  # what replaces it: the mechanism removed
    tests: tuple[str, ...]  # pytest node ids expected to catch it


def load_mutations() -> list[Mutation]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mutations import MUTATIONS as listed  # noqa: E402 - the catalogue lives beside this script

    return listed


def copy_repository(target: Path) -> None:
    """The working tree without VCS data, caches and run outputs."""
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache", "runs", "wandb")
    shutil.copytree(REPO, target, ignore=ignore, dirs_exist_ok=True)


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name!r}: its text occurs {count} times in {mutation.path} "
                         "(expected once); update tests/mutations.py")
    path.write_text(text.replace(mutation.old, mutation.new))
    compile(path.read_text(), str(path), "exec")  # a syntax error would be caught for the wrong reason


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    """(caught, the first failing test) for `tests` run against the mutated copy."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(root)
    # -n 0: the few tests of one removal run in this process, without xdist workers to start
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return True, "timed out (a hang counts as caught)"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode in (4, 5):  # usage error / no tests collected: the entry is wrong, not caught
        raise SystemExit(f"pytest could not run {tests}: {' '.join(lines[-3:])}")
    failed = [line.split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return proc.returncode != 0, (failed[0] if failed else " ".join(lines[-1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutation")
    args = parser.parse_args(argv)
    mutations = load_mutations()
    if args.list:
        for m in mutations:
            print(f"{m.name}: {m.path} -> {', '.join(m.tests)}")
        return 0
    unknown = set(args.names) - {m.name for m in mutations}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    selected = [m for m in mutations if not args.names or m.name in args.names]
    missed = []
    with tempfile.TemporaryDirectory(prefix="dtrain-mutation-") as tmp:
        pristine = Path(tmp) / "pristine"
        copy_repository(pristine)
        for m in selected:
            root = Path(tmp) / "mutant"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(pristine, root)
            apply(m, root)
            start = time.monotonic()
            caught, by = run_tests(root, m.tests, args.timeout)
            took = time.monotonic() - start
            print(f"{'caught' if caught else 'MISSED'} ({took:.0f} s): {m.name}"
                  + (f" -- {by}" if caught else ""), flush=True)
            if not caught:
                missed.append(m.name)
    print(f"{len(selected) - len(missed)} caught, {len(missed)} missed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
