"""Config: defaults, YAML file, `--a.b=v` / `--a.b v` overrides, precedence, types and errors."""

import pytest

from distributed_train.config import (
    Config,
    describe,
    dump_yaml,
    from_dict,
    load_config,
    to_dict,
)
from distributed_train.errors import UsageError


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_without_file_or_overrides():
    config = load_config()
    assert config == Config()
    assert (config.task, config.train.batch_size, config.train.lr) == ("digits", 64, 1e-3)
    assert config.train.max_steps is None and config.checkpoint.every_steps == 0
    assert config.dist.backend == "auto" and config.log.wandb == "auto"


def test_file_and_both_override_forms(tmp_path):
    path = write(tmp_path, "seed: 5\ntrain:\n  lr: 0.5\n  epochs: 3\nlog:\n  every_steps: 7\n")
    config = load_config(path, ["--train.lr=0.1", "--log.every_steps", "2", "--train.grad_clip", "1"])
    assert config.seed == 5 and config.train.epochs == 3  # from the file
    assert config.train.lr == 0.1 and config.log.every_steps == 2  # CLI wins
    assert config.train.grad_clip == 1.0


def test_precedence_cli_over_file_over_task_defaults_over_defaults(tmp_path):
    task_defaults = {"train": {"lr": 0.3, "epochs": 9, "batch_size": 16, "weight_decay": 0.1}}
    path = write(tmp_path, "train:\n  epochs: 4\n  batch_size: 32\n")
    seen = []

    def defaults_of(task):
        seen.append(task)
        return task_defaults

    config = load_config(path, ["--train.batch_size=8", "--task=mytask:T"], task_defaults=defaults_of)
    assert seen == ["mytask:T"]  # the task named on the command line supplies the defaults
    assert config.train.batch_size == 8  # CLI
    assert config.train.epochs == 4  # file
    assert config.train.lr == 0.3 and config.train.weight_decay == 0.1  # task defaults
    assert config.train.momentum == 0.9  # built-in default


def test_values_are_coerced_to_field_types(tmp_path):
    config = load_config(None, [
        "--train.batch_size=1_024", "--train.lr=3e-4", "--train.compile=false", "--train.max_steps=none",
        "--data.pin_memory=yes", "--dist.timeout_s=5", "--task_args.hidden=12", "--task_args.name=abc",
    ])
    assert config.train.batch_size == 1024 and isinstance(config.train.batch_size, int)
    assert config.train.lr == 3e-4 and config.train.compile is False
    assert config.train.max_steps is None and config.data.pin_memory is True
    assert config.dist.timeout_s == 5.0 and isinstance(config.dist.timeout_s, float)
    assert config.task_args == {"hidden": 12, "name": "abc"}  # YAML scalars, not strings
    yaml_ints = load_config(write(tmp_path, "train:\n  lr: 1\n"))
    assert yaml_ints.train.lr == 1.0 and isinstance(yaml_ints.train.lr, float)


def test_round_trip_through_dict_and_yaml(tmp_path):
    config = load_config(None, ["--train.lr=0.01", "--task_args.hidden=3", "--run_dir=x"])
    assert from_dict(to_dict(config)) == config
    assert load_config(write(tmp_path, dump_yaml(config))) == config


@pytest.mark.parametrize("args, key", [
    (["--train.lrr=1"], "train.lrr"),
    (["--colour=red"], "colour"),
    (["--train=3"], "train"),
    (["--train.batch_size=abc"], "train.batch_size"),
    (["--train.batch_size=2.5"], "train.batch_size"),
    (["--train.lr=fast"], "train.lr"),
    (["--train.compile=maybe"], "train.compile"),
    (["--train.optimizer=adam"], "train.optimizer"),
    (["--dist.backend=mpi"], "dist.backend"),
    (["--train.lr=0"], "train.lr"),
    (["--train.lr=-0.1"], "train.lr"),
    (["--train.batch_size=0"], "train.batch_size"),
    (["--train.max_steps=0"], "train.max_steps"),
    (["--train.max_steps=-5"], "train.max_steps"),
    (["--train.epochs=0"], "train.epochs"),
    (["--train.micro_batch_size=0"], "train.micro_batch_size"),
    (["--train.batch_size=10", "--train.micro_batch_size=4"], "train.micro_batch_size"),
    (["--dist.timeout_s=0"], "dist.timeout_s"),
    (["--log.every_steps=0"], "log.every_steps"),
    (["--train.lr"], "--train.lr"),
    (["train.lr=1"], "train.lr"),
])
def test_bad_values_name_the_key(args, key):
    with pytest.raises(UsageError) as info:
        load_config(None, args)
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_bad_choice_lists_the_choices():
    with pytest.raises(UsageError, match=r"train\.optimizer must be one of adamw, sgd; got 'adam'"):
        load_config(None, ["--train.optimizer=adam"])


@pytest.mark.parametrize("text, needle", [
    ("train: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("train: 5\n", "train must be a mapping"),
    ("train:\n  lrr: 1\n", "train.lrr"),
    ("train:\n  batch_size: [12]\n", "train.batch_size"),
    ("train:\n  compile: 1\n", "train.compile"),
])
def test_bad_config_files(tmp_path, text, needle):
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML whose aliases expand to 9**levels strings."""
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "task_args:\n" + "".join(f"  {line}\n" for line in lines)


def test_yaml_that_is_not_a_plain_config_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"config file '.*': the key at line 1 is a list; keys are plain names$"):
        load_config(write(tmp_path, "? [a, b]\n: 1\n"))
    with pytest.raises(UsageError, match=r"^--task_args.x=\{\[1\]: 2\}: the key at line 1 is a list"):
        load_config(None, ["--task_args.x={[1]: 2}"])
    bomb = alias_bomb(8)  # 43 million values from about 500 bytes
    assert len(bomb) < 600
    for text in (bomb, "task_args:\n  a: &x [*x]\n"):  # and an alias inside itself
        with pytest.raises(UsageError, match=r"aliases \(\*name\) expand to more than 100,000 values; refused"):
            load_config(write(tmp_path, text))
    assert load_config(write(tmp_path, alias_bomb(3))).task_args["l3"][0][0][0] == ["x"] * 9  # 6,561 values: fine


def test_a_section_given_as_a_value_and_as_keys_is_refused_never_dropped(tmp_path):
    with pytest.raises(UsageError, match=r"^train is given both as a section \(train.lr\) and as the value 5; "):
        load_config(write(tmp_path, "train: 5\n"), ["--train.lr=0.1"])
    with pytest.raises(UsageError, match=r"^train is given both as a section \(train.lr\) and as the value '5'; "):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n"), ["--train=5"])
    # an empty section is no keys; task_args values replace each other whole
    config = load_config(write(tmp_path, "train:\n  # lr: 1\ntask_args:\n  a: [1]\n"),
                         ["--train.lr=0.1", "--task_args.a.b=2"])
    assert config.train.lr == 0.1 and config.task_args == {"a": {"b": 2}}


def test_a_url_is_a_run_dir_in_object_storage_and_checkpoint_resume_takes_a_path_only():
    """A run_dir URL is kept as it is (the bucket is the run directory); checkpoint.resume=URL is
    refused with the way to continue such a run, never taken as a local folder named "s3:"."""
    assert load_config(None, ["--run_dir=s3://bucket/runs/x"]).run_dir == "s3://bucket/runs/x"
    url = "file:///runs/x/checkpoints/step-00000004"
    with pytest.raises(UsageError, match=rf"^checkpoint.resume='{url}' is a URL; to continue a run in object "
                                         r"storage, give its URL as run_dir \(checkpoint.resume=auto\)$"):
        load_config(None, [f"--checkpoint.resume={url}"])
    assert load_config(None, ["--run_dir=runs/s3:x"]).run_dir == "runs/s3:x"  # a path with a colon is a path
    with pytest.raises(UsageError, match=r"^run_dir must not carry credentials \(it is written to config.yaml"):
        load_config(None, ["--run_dir=s3://AKIA:secret@bucket/x"])


def test_missing_config_file_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UsageError, match="nope.yaml.*does not exist"):
        load_config(str(missing))


def test_empty_config_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def cli_text(value) -> str:
    """How a user writes `value` after `--key=`."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[" + ",".join(value) + "]"
    return str(value)


def test_describe_lists_every_key_with_default_and_help():
    rows = describe()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    for key in ["task", "seed", "run_dir", "train.batch_size", "train.micro_batch_size", "train.epochs",
                "train.max_steps", "train.lr", "train.optimizer", "train.weight_decay", "train.grad_clip",
                "train.schedule", "train.warmup_steps", "train.precision", "checkpoint.every_steps",
                "checkpoint.keep_last", "checkpoint.resume", "eval.every_steps", "log.every_steps",
                "log.wandb", "engine", "dist.backend", "dist.timeout_s"]:
        assert key in keys
    assert all(help_text and "\n" not in help_text for _, _, help_text in rows)
    by_key = {key: default for key, default, _ in rows}
    assert by_key["train.lr"] == "0.001" and by_key["task"] == "'digits'" and by_key["task_args"] == "{}"
    # every described key is the field's real default, and is accepted on the command line with it
    flat = to_dict(Config())
    for key, described, _ in rows:
        node = flat
        for part in key.split("."):
            node = node[part]
        assert described == repr(node), key
        assert load_config(None, [f"--{key}={cli_text(node)}"]) == Config(), key
