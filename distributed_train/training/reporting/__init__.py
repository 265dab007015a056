"""What a run reports: per-step numbers (step_metrics, flops), metrics.jsonl, wandb and the console
(metrics, progress), progress posts to a Kubeflow TrainJob (trainjob), the profiler (profiling)."""
