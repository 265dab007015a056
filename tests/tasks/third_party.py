"""Tiny versions of code nobody here wrote, in the shapes it comes in:
a nanoGPT-style GPT (tied embedding and head, configure_optimizers grouping by dimension, a get_lr
warmup-cosine schedule), a torchvision-style ResNet (BatchNorm), padded variable-length batches,
text samples (strings in the batch; a tokenizer's BatchEncoding-shaped mapping), causal-LM batches
padded with labels of -100 (a loss summed over tokens, with its count).

Load by module: `--task=tests.tasks.third_party:NanoGPT`."""

from __future__ import annotations

import collections
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, TensorDataset, default_collate

VOCAB, CTX = 32, 8


def token_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, CTX + 1), generator=g)
    x[:, 1:] = (x[:, :-1] * 3 + 1) % VOCAB  # learnable: the next token follows from the last
    return TensorDataset(x[:, :-1], x[:, 1:])


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _GPT(nn.Module):
    """nanoGPT's layout: transformer.{wte, wpe, h, ln_f}, lm_head tied to wte."""

    def __init__(self, d: int = 16, layers: int = 2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(VOCAB, d), wpe=nn.Embedding(CTX, d),
                                              h=nn.ModuleList(_Block(d) for _ in range(layers)), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        return logits, loss


class NanoGPT:
    def __init__(self, config=None):
        self.max_steps = getattr(getattr(config, "train", None), "max_steps", None) or 8

    def train_dataset(self) -> Dataset:
        return token_data(96, seed=0)

    def eval_dataset(self) -> Dataset:
        return token_data(16, seed=1)

    def model(self) -> nn.Module:
        return _GPT()

    def loss(self, model, batch):
        return model(*batch)[1]  # nanoGPT's model returns (logits, loss)

    def shard_units(self, model):
        return list(model.transformer.h)

    def optimizer(self, model, config):  # nanoGPT's configure_optimizers: decay only >= 2-D tensors
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))

    def scheduler(self, optimizer, config):  # nanoGPT's get_lr: linear warmup, cosine decay
        warmup, max_lr, min_lr = 2, 1e-2, 1e-3

        def get_lr(it: int) -> float:
            if it < warmup:
                return max_lr * (it + 1) / (warmup + 1)
            ratio = min(1.0, (it - warmup) / max(1, self.max_steps - warmup))
            return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
        return get_lr


class _BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet:
    """torchvision's resnet shape: conv-bn stem, basic blocks, global pool, fc; a criterion."""

    criterion = nn.CrossEntropyLoss()

    def train_dataset(self) -> Dataset:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, 8, 8, generator=g)
        return TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long())

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             _BasicBlock(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


class _Sequences(Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = [torch.randn(int(torch.randint(2, 9, (1,), generator=g)), 4, generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        seq = self.items[i]
        return seq, seq.sum()


class PaddedSequences:
    """Variable-length sequences padded per batch with a mask; each sample's loss is a mean over
    its own tokens, and the batch loss the mean over samples (so it does not depend on how the
    batch is split across ranks)."""

    def train_dataset(self) -> Dataset:
        return _Sequences(48, seed=0)

    def collate(self, samples):
        seqs, targets = zip(*samples)
        lengths = torch.tensor([len(s) for s in seqs])
        padded = pad_sequence(list(seqs), batch_first=True)
        mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
        return padded, mask, torch.stack(targets)

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def loss(self, model, batch):
        padded, mask, targets = batch
        per_token = model(padded).squeeze(-1) * mask
        per_sample = per_token.sum(1) / mask.sum(1) * mask.sum(1).to(per_token.dtype).sqrt()
        return F.mse_loss(per_sample, targets / 4)


WORDS = ["good", "bad", "fine", "awful", "great", "poor"]


class _Reviews(Dataset):
    """Samples as a text dataset gives them: {"text": str, "label": int}."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (4,), generator=g))
                      for _ in range(n)]

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        text = self.texts[i]
        return {"text": text, "label": int(sum(w in ("good", "fine", "great") for w in text.split()) >= 2)}


def _ids(texts) -> torch.Tensor:
    return torch.tensor([[WORDS.index(w) for w in t.split()] for t in texts])


class TextReviews:
    """Strings reach the loss: default_collate gives {"text": [str, ...], "label": tensor}."""

    def train_dataset(self) -> Dataset:
        return _Reviews(48, seed=0)

    def eval_dataset(self) -> Dataset:
        return _Reviews(13, seed=1)  # 13 samples: uneven shards on 2 and 3 ranks

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Embedding(len(WORDS), 4), nn.Flatten(), nn.Linear(16, 1))

    def loss(self, model, batch):
        logits = model(_ids(batch["text"]).to(batch["label"].device)).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype))


class Encoding(collections.UserDict):
    """The shape of transformers' BatchEncoding: a mapping that is not a dict."""


class TokenizedReviews(TextReviews):
    """A tokenizer-style collate: the batch is an Encoding of input_ids and labels."""

    def collate(self, samples):
        batch = default_collate(samples)
        return Encoding(input_ids=_ids(batch["text"]), labels=batch["label"].double())

    def loss(self, model, batch):
        logits = model(batch["input_ids"]).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits.dtype))


class _TokenSequences(Dataset):
    """Token sequences of 3 to 12 tokens: batches hold very different numbers of real tokens."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = [torch.randint(0, VOCAB, (int(torch.randint(3, 13, (1,), generator=g)),), generator=g)
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PaddedTokens:
    """A causal LM's batches as transformers pads them: input_ids padded with 0, labels with -100
    (ignored). Its loss is the cross-entropy summed over the real tokens, and their count."""

    def train_dataset(self) -> Dataset:
        return _TokenSequences(48, seed=0)

    def eval_dataset(self) -> Dataset:
        return _TokenSequences(13, seed=1)

    def collate(self, samples):
        ids = pad_sequence([s[:-1] for s in samples], batch_first=True, padding_value=0)
        labels = pad_sequence([s[1:] for s in samples], batch_first=True, padding_value=-100)
        return {"input_ids": ids, "labels": labels}

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Embedding(VOCAB, 8), nn.Tanh(), nn.Linear(8, VOCAB))

    def token_losses(self, model, batch):
        logits = model(batch["input_ids"])
        labels = batch["labels"]
        total = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum")
        return total, (labels != -100).sum()

    def loss(self, model, batch):
        return self.token_losses(model, batch)


class PaddedTokensMean(PaddedTokens):
    """The same loss as each batch's own token mean: a batch's tokens weigh more when it has fewer."""

    def loss(self, model, batch):
        total, count = self.token_losses(model, batch)
        return total / count
