"""Streaming tasks: the toy regression as an IterableDataset, with and without state.

Load with `--task=tests/tasks/streams.py:StreamingRegression` (`task_args.n`: samples per pass,
`task_args.stateful`: the torchdata state protocol)."""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset

from tests.tasks.toy import Regression, regression_data


class RegressionStream(IterableDataset):
    """`n` regression samples per pass, in an order that depends on the pass (set_epoch) only."""

    reads = [0]  # samples yielded by any instance of either class in this process (re-reading shows)

    def __init__(self, n: int):
        self.x, self.y = regression_data(n, seed=0)
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(1000 + self.epoch)).tolist()

    def __iter__(self):
        for i in self.order():
            self.reads[0] += 1
            yield self.x[i], self.y[i]


class StatefulRegressionStream(RegressionStream):
    """The same stream, resumable where it was (state_dict / load_state_dict) without re-reading."""

    def __init__(self, n: int):
        super().__init__(n)
        self.position, self._start = 0, 0

    def __iter__(self):
        order, start = self.order(), self._start
        self._start = 0
        for k in range(start, self.n):
            self.position = k + 1
            self.reads[0] += 1
            yield self.x[order[k]], self.y[order[k]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._start = state["epoch"], state["position"]


class StreamingRegression(Regression):
    def __init__(self, config=None):
        super().__init__(config)
        args = dict(getattr(config, "task_args", None) or {})
        self.n, self.stateful = args.get("n", 100), args.get("stateful", False)

    def train_dataset(self):
        return (StatefulRegressionStream if self.stateful else RegressionStream)(self.n)


class StreamingEval(StreamingRegression):
    def eval_dataset(self):
        return RegressionStream(10)


class HFJsonStream(Regression):
    """The toy regression from a JSON-lines file through Hugging Face `datasets` streaming (an
    IterableDataset with its own state_dict); `task_args.path`, `task_args.split_by_node`."""

    def __init__(self, config=None):
        super().__init__(config)
        args = dict(getattr(config, "task_args", None) or {})
        self.path, self.split_by_node = args["path"], args.get("split_by_node", False)

    def train_dataset(self):
        import datasets

        # rows as they are; collate() makes the tensors
        stream = datasets.load_dataset("json", data_files=self.path, split="train", streaming=True)
        if self.split_by_node:
            from datasets.distributed import split_dataset_by_node

            stream = split_dataset_by_node(stream, rank=0, world_size=2)
        return stream

    def collate(self, samples):
        if isinstance(samples[0], dict):  # the stream's rows; the eval set's are (x, y, id) tuples
            return torch.tensor([s["x"] for s in samples]), torch.tensor([s["y"] for s in samples])
        return torch.utils.data.default_collate(samples)


def write_json_lines(path, n: int = 100) -> None:
    """The toy regression's first `n` samples as JSON lines {"x": [4 floats], "y": float}."""
    import json

    x, y = regression_data(n, seed=0)
    path.write_text("".join(json.dumps({"x": row.tolist(), "y": float(t)}) + "\n" for row, t in zip(x, y)))
