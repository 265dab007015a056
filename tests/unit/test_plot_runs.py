"""`dtrain plot` writes a PNG matplotlib can read back; `dtrain runs` tabulates run directories."""

import json
import sys

import pytest

from distributed_train import cli
from distributed_train.cli import runs
from distributed_train.errors import UsageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, steps, total, resumed_at=None, summary=True, eval_every=10):
    """A run directory as the trainer leaves it: config.yaml, metrics.jsonl, maybe summary.json."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("task: digits\n")
    events = [{"kind": "start", "step": 0, "total_steps": total, "resumed": False, "world_size": 2,
               "task": "tests/tasks/x.py:Task", "time": 1000.0}]
    for step in range(1, steps + 1):
        if resumed_at is not None and step == resumed_at + 1:  # half a second after the last record
            events.append({"kind": "start", "step": resumed_at, "total_steps": total, "resumed": True,
                           "world_size": 2, "task": "tests/tasks/x.py:Task", "time": 1000.5 + resumed_at})
        events.append({"kind": "train", "step": step, "epoch": 0, "time": 1000.0 + step, "loss": 3.0 / step, "lr": 1e-3,
                       "samples_per_s": 1000.0 + step, "grad_norm": 1.0 / step, "mfu": 0.3})
        if step % eval_every == 0:
            events.append({"kind": "eval", "step": step, "loss": 3.5 / step, "accuracy": step / (steps + 1)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary:
        (run_dir / "summary.json").write_text(json.dumps({
            "global_step": steps, "world_size": 2, "train_loss": 3.0 / steps, "samples_per_s": 1234.0,
            "eval": {"accuracy": 0.9, "loss": 0.25}, "resumed_from": "ckpt" if resumed_at else None,
            "goodput": {"goodput": 0.75, "attempts": 1}}))
    return run_dir


def test_plot_writes_a_png_that_matplotlib_reads_back(tmp_path, capsys):
    image = pytest.importorskip("matplotlib.image")
    run_dir = write_run(tmp_path / "run", steps=30, total=30, resumed_at=20)
    assert cli.main(["plot", str(run_dir), "-o", str(tmp_path / "curves.png")]) == 0
    out = tmp_path / "curves.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 400
    assert pixels.std() > 0.05  # curves and text, not a blank canvas
    assert cli.main(["plot", str(run_dir)]) == 0  # default: RUN_DIR/metrics.png
    assert (run_dir / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_mistakes_are_usage_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(UsageError, match="does not exist"):
        cli.main(["plot", str(tmp_path / "missing"), "--debug"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="metrics.jsonl.*does not exist"):
        cli.main(["plot", str(tmp_path / "empty"), "--debug"])
    run_dir = write_run(tmp_path / "run", steps=3, total=3)
    with pytest.raises(SystemExit) as exit_info:  # the CLI path: one line, exit code 2
        cli.main(["plot", str(run_dir), "-o", str(tmp_path / "x.jpg")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dtrain: error: -o '{tmp_path / 'x.jpg'}': dtrain plot writes PNG files; name it FILE.png"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    with pytest.raises(UsageError, match=r"pip install 'distributed_train\[plot\]'"):
        cli.main(["plot", str(run_dir), "--debug"])


def test_runs_table_shows_each_run_once_with_its_numbers(tmp_path, capsys):
    write_run(tmp_path / "a-done", steps=20, total=20)
    write_run(tmp_path / "team" / "b-resumed", steps=30, total=40, resumed_at=20, summary=False)
    (tmp_path / "a-done" / "checkpoints").mkdir()  # a run's own subfolders are not runs
    assert cli.main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == runs.COLUMNS
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"a-done", "team/b-resumed"}
    done, resumed = rows["a-done"], rows["team/b-resumed"]
    assert done[1:8] == ["x.py:Task", "20/20", "done", "2", "no", "1,234", "0.1500"]
    assert " ".join(done[8:12]) == "accuracy 0.9000 loss 0.2500"
    assert done[12] == "75.0%"  # the summary's goodput
    assert resumed[1:6] == ["x.py:Task", "30/40", "incomplete", "2", "yes"]
    assert resumed[7] == "0.1000"  # the last train loss
    assert resumed[12] == "98.3%"  # from metrics.jsonl so far: 29.5 s of 30 s (0.5 s between attempts)
    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["run"]: r["step"] for r in records} == {"a-done": 20, "team/b-resumed": 30}


def test_a_run_reached_through_links_is_listed_once_under_its_own_name(tmp_path, capsys):
    write_run(tmp_path / "runs" / "7", steps=5, total=5)
    (tmp_path / "runs" / "latest").symlink_to("7")  # sorts after "7": the link is not what is shown
    (tmp_path / "a-latest").symlink_to(tmp_path / "runs" / "7")  # sorts first: still the real name
    (tmp_path / "runs" / "loop").symlink_to(tmp_path)  # a link back up ends at the depth limit
    outside = write_run(tmp_path.parent / f"{tmp_path.name}-outside" / "run", steps=3, total=3)
    (tmp_path / "b-elsewhere").symlink_to(outside)  # only reached through its link: shown under it
    (tmp_path / "c-elsewhere").symlink_to(outside)
    assert cli.main(["runs", str(tmp_path)]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(names) == ["b-elsewhere", "runs/7"]


def test_runs_on_a_missing_or_empty_folder(tmp_path, capsys):
    with pytest.raises(UsageError, match="does not exist"):
        cli.main(["runs", str(tmp_path / "nope"), "--debug"])
    assert cli.main(["runs", str(tmp_path)]) == 0
    assert "no runs under" in capsys.readouterr().out
