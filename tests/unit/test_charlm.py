"""The built-in charlm task: data windows, the GPT model, loss/metrics, options and FLOPs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import default_collate

from distributed_train.tasks.charlm import CharLMTask, load_corpus, load_text

TINY = {"n_layer": 2, "n_head": 2, "d_model": 32, "ctx": 16}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and spinning OpenMP threads on a busy
    # CI machine (other tests running) can make each step 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_task(**task_args) -> CharLMTask:
    return CharLMTask(SimpleNamespace(task_args=task_args))


def test_text_is_bundled_and_sized():
    text = load_text()
    assert 300_000 <= len(text) <= 1_500_000
    assert text.startswith("The Book of Genesis")
    vocab, tokens = load_corpus()
    assert list(vocab) == sorted(set(text)) and len(tokens) == len(text)
    assert "".join(vocab[i] for i in tokens[:200].tolist()) == text[:200]


def test_defaults_without_config():
    task = CharLMTask()
    assert task.args == {"n_layer": 4, "n_head": 4, "d_model": 128, "ctx": 64, "dropout": 0.0, "stride": 64}
    assert task.tokens_per_sample == 64
    assert task.vocab_size % 64 == 0 and task.vocab_size >= len(task.vocab)


def test_samples_are_shifted_windows():
    task = make_task(**TINY)
    ds = task.train_dataset()
    assert len(ds) == (len(task.train_tokens) - 17) // 16 + 1
    for i in (0, 1, len(ds) - 1, -1):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (16,)
        assert torch.equal(x[1:], y[:-1])
        start = (i % len(ds)) * 16
        assert torch.equal(x, task.train_tokens[start : start + 16])
        assert torch.equal(y, task.train_tokens[start + 1 : start + 17])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_stride_option_overlaps_train_windows():
    task = make_task(**TINY, stride=4)
    ds = task.train_dataset()
    assert torch.equal(ds[1][0][:12], ds[0][0][4:])
    assert len(task.eval_dataset()) == (len(task.eval_tokens) - 17) // 16 + 1  # eval stays non-overlapping


@pytest.mark.parametrize("split", ["train", "eval"])
def test_get_batch_equals_default_collate(split):
    task = make_task(**TINY, stride=5)
    ds = task.train_dataset() if split == "train" else task.eval_dataset()
    indices = [3, 0, len(ds) - 1, 7, 7, -2]
    x, y = ds.get_batch(indices)
    ex, ey = default_collate([ds[i] for i in indices])
    assert x.shape == (6, 16) and x.dtype == torch.long and x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(IndexError):
        ds.get_batch([0, len(ds)])


@pytest.mark.parametrize("stride", [16, 5])
def test_train_and_eval_windows_do_not_overlap(stride):
    task = make_task(**TINY, stride=stride)
    train, held_out = task.train_dataset(), task.eval_dataset()
    corpus = load_corpus()[1]

    def text_positions(ds) -> tuple[int, int]:
        # Both splits are views of the one encoded text: storage_offset is where a split starts.
        base = ds.tokens.storage_offset()
        assert ds.tokens.untyped_storage().data_ptr() == corpus.untyped_storage().data_ptr()
        return base, base + (len(ds) - 1) * ds.stride + ds.ctx  # first input, last target read

    train_first, train_last = text_positions(train)
    eval_first, eval_last = text_positions(held_out)
    assert train_first == 0 and train_last < eval_first and eval_last < len(corpus)
    assert torch.equal(held_out[0][0], corpus[eval_first : eval_first + 16])
    assert torch.equal(train[len(train) - 1][1][-1], corpus[train_last])
    assert abs(len(task.eval_tokens) / len(corpus) - 0.1) < 1e-3


def test_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    task = make_task(**TINY)
    model = task.model()
    batch = task.train_dataset().get_batch(list(range(8)))
    loss = task.loss(model, batch)
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    assert abs(loss.item() - math.log(task.vocab_size)) < 0.5


def test_model_ties_head_and_scales_residual_init():
    task = make_task(**TINY)
    model = task.model()
    assert model.head.weight is model.tok_emb.weight
    std = model.blocks[0].mlp_proj.weight.std().item()
    assert 0.5 * 0.02 / math.sqrt(4) < std < 1.5 * 0.02 / math.sqrt(4)


def test_a_few_adamw_steps_reduce_the_loss():
    torch.manual_seed(0)
    task = make_task(**TINY)
    model = task.model()
    ds = task.train_dataset()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    fixed = ds.get_batch(torch.randint(len(ds), (32,), generator=gen).tolist())
    with torch.no_grad():
        before = task.loss(model, fixed).item()
    for _ in range(30):
        batch = ds.get_batch(torch.randint(len(ds), (32,), generator=gen).tolist())
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = task.loss(model, fixed).item()
    assert after < before - 1.0, (before, after)


def test_metrics_are_consistent_with_loss():
    torch.manual_seed(0)
    task = make_task(**TINY)
    model = task.model().double().eval()  # float64 (train.precision=fp64): equal to ~1e-15, on any CPU
    batch = task.eval_dataset().get_batch(list(range(5)))
    with torch.no_grad():
        loss = task.loss(model, batch)
    metrics = task.metrics(model, batch)
    ce, n = metrics["loss"]
    assert ce.dtype == torch.float64 and n == 5 * 16  # the count: a Python number, filled in on the device
    assert abs(ce.item() / n - loss.item()) < 1e-9
    correct, n_acc = metrics["accuracy"]
    assert 0 <= correct.item() <= n_acc == 80
    bits, n_bits = metrics["bits_per_char"]
    assert abs(bits.item() / n_bits - loss.item() / math.log(2)) < 1e-9
    # Counts are immutable numbers: an in-place all-reduce of one pair cannot change another.
    assert all(isinstance(count, int) for _, count in metrics.values())


@pytest.mark.parametrize(
    "task_args, name",
    [
        ({"n_layers": 2}, "n_layers"),
        ({"preset": "huge"}, "preset"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_head": 2.5}, "n_head"),
        ({"d_model": True}, "d_model"),
        ({"d_model": 30, "n_head": 4}, "d_model"),
        ({"ctx": -1}, "ctx"),
        ({"ctx": 10_000_000}, "ctx"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": "0.1"}, "dropout"),
        ({"stride": 0}, "stride"),
    ],
)
def test_bad_task_args_name_the_option(task_args, name):
    with pytest.raises(ValueError, match=rf"task_args\.{name}\b"):
        make_task(**task_args)


def test_explicit_options_override_the_preset():
    task = make_task(preset="gpt2-small", ctx=128, dropout=0)
    assert task.args["n_layer"] == 12 and task.args["d_model"] == 768 and task.args["ctx"] == 128
    assert task.args["stride"] == 128 and task.args["dropout"] == 0.0


def test_gpt2_small_preset_size_and_flops():
    task = make_task(preset="gpt2-small")
    with torch.device("meta"):
        model = task.model()
    n = model.num_params(non_embedding=True)
    assert 84e6 < n < 86e6, n
    d, L, T = 768, 12, 1024
    expected = T * (6 * (n + d * task.vocab_size) + 12 * L * d * T)
    assert task.flops_per_sample() == pytest.approx(expected, rel=1e-12)


def test_flops_per_sample_grows_with_ctx():
    small, large = make_task(**TINY).flops_per_sample(), make_task(**{**TINY, "ctx": 32}).flops_per_sample()
    assert 0 < small and large > 2 * small  # linear in T for weights, quadratic for attention
