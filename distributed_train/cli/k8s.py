"""`dtrain k8s`: print the Kubernetes manifests that run a config as an N-node torchrun job.

    dtrain k8s --nodes 2 --gpus-per-node 8 --image REGISTRY/dtrain:0.1.0 [CONFIG] [--key=value ...]

Kinds: an Indexed Job (default), a Kubeflow Trainer TrainJob, or the legacy Kubeflow PyTorchJob;
docs/kubernetes.md compares them.

The config is validated here first (a bad one exits 2 before anything is printed); the
manifests carry it in a ConfigMap and the overrides on the container's command line.
`--write-examples DIR` regenerates the checked-in examples under k8s/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from distributed_train.cli import described
from distributed_train.errors import UsageError

from .k8s_kinds import render
from .k8s_render import KINDS, JobSpec, to_yaml

EXAMPLE_IMAGE = "ghcr.io/example/distributed-train:0.1.0"
EXAMPLE_CONFIG = {"task": "digits", "train": {"epochs": 20, "batch_size": 64, "lr": 0.002},
                  "checkpoint": {"every_steps": 50}, "log": {"wandb": "offline"}}
# File name -> the `dtrain k8s` arguments that render it (after --image and the config).
EXAMPLES = {
    "job-gpu.yaml": ["--nodes", "2", "--gpus-per-node", "8"],
    "job-cpu.yaml": ["--nodes", "2", "--cpu", "--procs-per-node", "2"],
    "trainjob-gpu.yaml": ["--nodes", "2", "--gpus-per-node", "8", "--kind", "trainjob"],
    "pytorchjob-gpu.yaml": ["--nodes", "2", "--gpus-per-node", "8", "--kind", "pytorchjob"],
    "job-cpu-elastic.yaml": ["--nodes", "1:3", "--cpu", "--queue", "team-a"],
}


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes become one `dtrain: error:` line (exit 2) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"k8s: {message}")


def _parser() -> _Parser:
    p = _Parser(prog="dtrain k8s", description=described(__doc__),
                epilog="Anything else on the command line is CONFIG and --section.key=value overrides, "
                       "validated now and passed to every node.")
    p.add_argument("--image", help="the image every node runs, with a fixed tag or digest (required)")
    p.add_argument("--nodes", default="1",
                   help="pods (machines) in the job: N, or MIN:MAX to go on with fewer when a node is "
                        "lost and grow when it returns (job, pytorchjob; default 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per pod = processes per pod (default 1; 0 = --cpu)")
    p.add_argument("--cpu", action="store_true", help="no GPUs: gloo; the job to try on kind/minikube")
    p.add_argument("--procs-per-node", type=int, default=1, help="with --cpu: processes per pod (default 1)")
    p.add_argument("--name", default="dtrain", help="job name, a DNS-1123 label (default dtrain)")
    p.add_argument("--kind", choices=KINDS, default="job",
                   help="job: batch/v1 Indexed Job + headless Service; trainjob: Kubeflow Trainer v2 "
                        "TrainJob; pytorchjob: Kubeflow training operator PyTorchJob (legacy)")
    p.add_argument("--runtime", default="torch-distributed",
                   help="trainjob: the ClusterTrainingRuntime to run on (default torch-distributed)")
    p.add_argument("--namespace", help="namespace of every object (default: kubectl's current one)")
    p.add_argument("--queue", help="Kueue LocalQueue: labels the workload kueue.x-k8s.io/queue-name")
    p.add_argument("--priority-class", help="PriorityClass of the pods (trainjob: a Kueue "
                                            "WorkloadPriorityClass, as label kueue.x-k8s.io/priority-class)")
    p.add_argument("--rdma", metavar="RESOURCE=COUNT",
                   help="request an RDMA device plugin's resource per pod (e.g. rdma/hca_shared_devices_a=1) "
                        "and add the IPC_LOCK capability RDMA needs to pin memory (InfiniBand, EFA, RoCE)")
    p.add_argument("--nccl-socket-ifname",
                   help="NCCL_SOCKET_IFNAME for the pods (default: unset, NCCL picks the interface)")
    p.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts of a node's workers")
    p.add_argument("--grace-period", type=int, default=120, dest="grace_period_s",
                   help="seconds from SIGTERM to SIGKILL: the SIGTERM checkpoint must fit (default 120)")
    p.add_argument("--run-dir-url", metavar="URL", help="run_dir in a bucket (s3://bucket/runs/NAME): no claim; "
                   "each pod works in an emptyDir (docs/storage.md)")
    p.add_argument("--storage-secret", metavar="NAME", help="a Secret whose keys become the pods' environment: "
                   "the bucket's credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)")
    p.add_argument("--pvc", help="an existing PersistentVolumeClaim for run dirs (default: render NAME-runs)")
    p.add_argument("--pvc-size", default="20Gi", help="size of the rendered claim (default 20Gi)")
    p.add_argument("--pvc-access-mode", help="ReadWriteMany (default with GPUs) or ReadWriteOnce (default --cpu)")
    p.add_argument("--storage-class", help="storage class of the rendered claim (default: the cluster's)")
    p.add_argument("--cpus-per-node", help="CPU request per pod (default 8 per GPU, 1 per CPU process)")
    p.add_argument("--memory-per-node",
                   help="memory request and limit per pod (default 32Gi per GPU, 2Gi per CPU process)")
    p.add_argument("--write-examples", metavar="DIR", help="write the k8s/ example manifests into DIR and exit")
    return p


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our flags, CONFIG and overrides) from one mixed command line, by our option names."""
    from distributed_train.cli import split_options

    return split_options(_parser(), argv)


def config_text(config_path: str | None, overrides: list[str], grace_period_s: int) -> tuple[str, list[str]]:
    """Validate CONFIG + overrides as `dtrain train` would; return the file's content for the
    ConfigMap, and the overrides to add: checkpoint.grace_s from the pods' grace period (torchrun
    SIGKILLs the workers 15 s before Kubernetes would, and the workers need a few seconds to exit)."""
    from distributed_train.cli.train import override_key, resolve_config, stop_budget
    from distributed_train.config import read_config_file

    if any(override_key(o) == "run_dir" for o in overrides):
        raise UsageError("--run_dir is set by dtrain k8s (the claim's /runs/NAME, so restarts resume); "
                         "drop it and choose --name / --pvc instead, or --run-dir-url for a bucket")
    config = resolve_config(config_path, overrides)
    if not config.checkpoint.periodic:
        print("dtrain k8s: warning: checkpoint.every_steps is 0, so a node lost without SIGTERM restarts "
              "the run from step 0; set checkpoint.every_steps", file=sys.stderr)
    added = stop_budget(config_path, overrides, config, grace_period_s - 20, f"--grace-period {grace_period_s}")
    data = read_config_file(config_path) if config_path else {}
    data.pop("run_dir", None)  # the command line sets it on the claim
    return (yaml.safe_dump(data, sort_keys=False) if data else "{}\n"), added


def manifests(argv: list[str], note: str = "", shown_argv: list[str] | None = None) -> str:
    """The YAML `dtrain k8s ARGV` prints (raises UsageError on bad input); the header shows
    `shown_argv` when given (the examples show config.yaml, not their temporary copy of it)."""
    ours, train = split_args(argv)
    options = vars(_parser().parse_args(ours))
    options.pop("write_examples")
    if not options["image"]:
        raise UsageError("--image is required: the image every node runs, e.g. REGISTRY/dtrain:0.1.0")
    from distributed_train.cli.train import split_config_args

    config_path, overrides, _ = split_config_args([a for a in train if a != "--debug"])
    if options["gpus_per_node"] is None:
        options["gpus_per_node"] = 0 if options["cpu"] else 1
    spec = JobSpec(overrides=overrides, **options)
    text, added = config_text(config_path, overrides, spec.grace_period_s)
    spec.overrides = [*added, *overrides]
    header = "\n".join(filter(None, [f"Generated by: dtrain k8s {' '.join(shown_argv or argv)}", note,
                                     "Apply: kubectl apply -f THIS_FILE"]))
    return to_yaml(render(spec, text), header)


def write_examples(directory: Path) -> list[Path]:
    """Render every entry of EXAMPLES (with EXAMPLE_CONFIG as config.yaml) into `directory`."""
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(EXAMPLE_CONFIG, sort_keys=False))
        for filename, args in EXAMPLES.items():
            argv = ["--image", EXAMPLE_IMAGE, *args]
            text = manifests([*argv, str(config)], note="Regenerate all examples: dtrain k8s --write-examples k8s",
                             shown_argv=[*argv, "config.yaml"])  # no temporary path, whatever TMPDIR is
            path = directory / filename
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        return 0
    ours, _ = split_args(argv)
    examples_dir = vars(_parser().parse_args(ours)).get("write_examples")
    if examples_dir:
        for path in write_examples(Path(examples_dir)):
            print(f"wrote {path}")
        return 0
    sys.stdout.write(manifests(argv))
    return 0
