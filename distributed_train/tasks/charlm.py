"""charlm: a small causal transformer (GPT) over the KJV Pentateuch, one character per token.

The text ships gzipped in `data/` (public domain, see data/README.md); nothing is fetched.
Options come from `task_args`: preset (tiny | gpt2-small), n_layer, n_head, d_model, ctx,
dropout, stride; explicit options override the preset.
"""

from __future__ import annotations

import functools
import gzip
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

TEXT_PATH = Path(__file__).parent / "data" / "kjv_pentateuch.txt.gz"
EVAL_FRACTION = 0.1  # the last 10% of the text is held out
VOCAB_MULTIPLE = 64  # padded vocab: matmul-friendly sizes; unused rows just learn to be unlikely

PRESETS = {
    "tiny": {"n_layer": 4, "n_head": 4, "d_model": 128, "ctx": 64},
    "gpt2-small": {"n_layer": 12, "n_head": 12, "d_model": 768, "ctx": 1024},
}
OPTIONS = ("preset", "n_layer", "n_head", "d_model", "ctx", "dropout", "stride")


@functools.lru_cache(maxsize=None)
def load_text(path: Path = TEXT_PATH) -> str:
    """The whole text, decoded once per process."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def load_corpus(path: Path = TEXT_PATH) -> tuple[tuple[str, ...], torch.Tensor]:
    """The sorted vocabulary of the whole text and the text encoded as one LongTensor."""
    text = load_text(path)
    vocab = tuple(sorted(set(text)))
    # Map code points through a sorted table in numpy: ~100x faster than a Python dict loop.
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.array([ord(c) for c in vocab], dtype=np.uint32)
    return vocab, torch.from_numpy(np.searchsorted(table, codes).astype(np.int64))


class CharWindows(Dataset):
    """Windows of `ctx` characters every `stride` characters; sample i = (x, y), y = x shifted by one."""

    def __init__(self, tokens: torch.Tensor, ctx: int, stride: int):
        self.tokens, self.ctx, self.stride = tokens, ctx, stride
        # Each window reads ctx + 1 tokens: the inputs and, one further, the last target.
        self.length = max(0, (len(tokens) - ctx - 1) // stride + 1)
        self._offsets = torch.arange(ctx)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"window {index} out of range for {self.length} windows")
        start = (index % self.length) * self.stride
        # clone(): a sample must not keep the whole text's storage alive (or pickle it to workers).
        return (self.tokens[start : start + self.ctx].clone(),
                self.tokens[start + 1 : start + self.ctx + 1].clone())

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked (B, ctx) inputs and targets, equal to default_collate of the items."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and not (-self.length <= int(idx.min()) and int(idx.max()) < self.length):
            raise IndexError(f"window index out of range for {self.length} windows")
        idx = torch.where(idx < 0, idx + self.length, idx)
        positions = (idx * self.stride)[:, None] + self._offsets
        return self.tokens[positions], self.tokens[positions + 1]


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # SDPA picks a flash/memory-efficient kernel where one exists; is_causal avoids a mask tensor.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        x = x + self.resid_drop(self.attn_proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.resid_drop(self.mlp_proj(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, final LN, LM head tied to the embedding."""

    def __init__(self, vocab_size: int, ctx: int, n_layer: int, n_head: int, d_model: int,
                 dropout: float = 0.0):
        super().__init__()
        self.ctx = ctx
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(ctx, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections into the residual stream so its variance stays ~constant
        # with depth (two residual adds per block).
        for name, p in self.named_parameters():
            if name.endswith(("attn_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the token (= tied head) and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.ctx:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.ctx}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _check_int(args: dict, name: str, minimum: int = 1) -> None:
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"task_args.{name} must be an integer >= {minimum}, got {value!r}")


def parse_options(task_args: dict | None) -> dict[str, Any]:
    """The preset's values with explicit options on top, each checked; ValueError names the option."""
    task_args = dict(task_args or {})
    unknown = sorted(set(task_args) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option task_args.{unknown[0]}; expected one of {', '.join(OPTIONS)}")
    preset = task_args.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"task_args.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    args = {**PRESETS[preset], "dropout": 0.0, "stride": None, **task_args}
    for name in ("n_layer", "n_head", "d_model", "ctx"):
        _check_int(args, name)
    if args["d_model"] % args["n_head"]:
        raise ValueError(f"task_args.d_model ({args['d_model']}) must be a multiple of "
                         f"task_args.n_head ({args['n_head']})")
    dropout = args["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"task_args.dropout must be a number in [0, 1), got {dropout!r}")
    args["dropout"] = float(dropout)
    if args["stride"] is None:
        args["stride"] = args["ctx"]  # non-overlapping windows: an epoch sees each character once
    _check_int(args, "stride")
    return args


class CharLMTask:
    """Next-character prediction with a GPT; the built-in `charlm` task."""

    def __init__(self, config: Any = None):
        self.args = parse_options(getattr(config, "task_args", None))
        self.vocab, tokens = load_corpus()
        self.vocab_size = -(-len(self.vocab) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        self.ctx = self.tokens_per_sample = self.args["ctx"]
        split = int(len(tokens) * (1 - EVAL_FRACTION))
        # Train windows end (last target included) before `split`; eval starts at it: no overlap.
        self.train_tokens, self.eval_tokens = tokens[:split], tokens[split:]
        if len(self.eval_tokens) < self.ctx + 1:
            raise ValueError(f"task_args.ctx ({self.ctx}) must be below {len(self.eval_tokens)}, "
                             "the held-out text's length")

    def train_dataset(self) -> CharWindows:
        return CharWindows(self.train_tokens, self.ctx, self.args["stride"])

    def eval_dataset(self) -> CharWindows:
        return CharWindows(self.eval_tokens, self.ctx, self.ctx)

    def model(self) -> GPT:
        a = self.args
        return GPT(self.vocab_size, a["ctx"], a["n_layer"], a["n_head"], a["d_model"], a["dropout"])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return token_loss(model, batch)

    def metrics(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, tuple]:
        return token_metrics(model, batch, self.vocab_size, "bits_per_char")

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) per window: (6N + 12 L d T) per token, times T."""
        a, T = self.args, self.ctx
        d, L = a["d_model"], a["n_layer"]
        # N counts the weights used in matmuls: 12 d^2 per block (+ biases, LN) and the LM head,
        # which is a real d x vocab matmul even though it shares the embedding's weight.
        per_block = 12 * d * d + 13 * d
        n_matmul = L * per_block + 2 * d + d * self.vocab_size
        return float(T * (6 * n_matmul + 12 * L * d * T))

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Token ids back to text (padding ids, never in the data, decode as '?')."""
        return "".join(self.vocab[i] if i < len(self.vocab) else "?" for i in torch.as_tensor(ids).tolist())


def token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over every token of a (inputs, next tokens) batch."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def token_metrics(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], vocab_size: int,
                  bits_name: str) -> dict[str, tuple]:
    """(sum, count) of the token loss, bits per token and accuracy, so ranks can all-reduce both
    and divide once."""
    x, y = batch
    logits = model(x).reshape(-1, vocab_size)
    y = y.reshape(-1)
    # bf16/fp16 logits in float32 (float64 ones as they are); sum in float64: a float32 sum over
    # many tokens and batches loses digits.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits, y, reduction="none").double().sum()
    correct = (logits.argmax(dim=-1) == y).sum().double()
    # Counts as Python numbers: the evaluator fills them in on the device; a tensor built from a
    # number here would be a host-to-device copy per batch.
    n = y.numel()
    return {"loss": (ce, n), bits_name: (ce / math.log(2), n), "accuracy": (correct, n)}
