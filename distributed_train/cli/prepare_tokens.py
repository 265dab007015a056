"""`dtrain prepare-tokens INPUT... -o DIR`: text files (or `-` for stdin) -> token shards + meta.json.

The `lm` task reads the result with `--task_args.data=DIR`. Input streams through in chunks of
CHUNK_BYTES, so memory stays bounded whatever its size; a Hugging Face tokenizer runs in one
process per core, a bounded number of chunks in flight, results written in input order. Each
shard is written to a temporary name, fsynced and renamed; meta.json comes last, so a directory
with a meta.json is complete.

Validation tokens: the token stream is cut into blocks of SPLIT_BLOCK_TOKENS and a fraction
`--val-fraction` of the blocks, spread evenly (the first one mid-way through the first 1/F
blocks), goes to the val split; this works on a stream of unknown length.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from distributed_train.cli import described
from distributed_train.errors import UsageError
from distributed_train.files import atomic_write_text, error_text, make_directory, path_problem, require

# Tokenizer worker processes import this module: what needs torch (the token-file format lives
# beside the lm task's dataset, the parser beside `dtrain plot`) is imported inside functions.

CHUNK_BYTES = 1 << 20
SPLIT_BLOCK_TOKENS = 1 << 14
BYTE_VOCAB = 256


def parse_args(argv: list[str]) -> argparse.Namespace:
    from distributed_train.cli.plot import CommandParser

    parser = CommandParser(prog="dtrain prepare-tokens", description=described(__doc__))
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="text files; - reads stdin")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="where shards and meta.json go")
    parser.add_argument("--tokenizer", default="byte",
                        help="byte (built in: one token per UTF-8 byte, vocabulary 256) or a "
                             "Hugging Face tokenizer.json (needs `pip install tokenizers`)")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of tokens for validation")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (Hugging Face tokenizers; default: every core)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in DIR")
    args = parser.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.shard_tokens < 1 or args.workers < 1:
        raise UsageError("--shard-tokens and --workers must be >= 1")
    for path in args.inputs:
        if path != "-":
            require(path, "file", "input")
    return args


# ---------------------------------------------------------------------------------------------
# Tokenizers: a function from a chunk of bytes to token ids, picklable for worker processes.

class ByteTokenizer:
    """One token per byte: vocabulary 256, nothing to download, any input is valid."""

    name, vocab_size, cuts_anywhere = "byte", BYTE_VOCAB, True

    def describe(self) -> dict:
        return {"kind": "byte"}

    def __call__(self, chunk: bytes) -> np.ndarray:
        return np.frombuffer(chunk, dtype=np.uint8).astype(np.uint16)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library (loaded once per process)."""

    cuts_anywhere = False  # chunks end at a line break, so no word is split between two calls

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UsageError("--tokenizer PATH needs the tokenizers library: pip install tokenizers "
                             "(or pip install 'distributed_train[lm]')") from None
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as exc:  # the library raises its own Exception subclass
            raise UsageError(f"--tokenizer {path!r} is not a tokenizer.json: {exc}") from None
        self.path, self.vocab_size = str(Path(path).resolve()), tokenizer.get_vocab_size()
        self.dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        self._tokenizer = tokenizer

    def describe(self) -> dict:
        return {"kind": "huggingface", "path": self.path}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, chunk: bytes) -> np.ndarray:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(self.path)
        ids = self._tokenizer.encode(chunk.decode("utf-8", errors="replace"), add_special_tokens=False).ids
        return np.asarray(ids, dtype=self.dtype)


def make_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    if spec == "byte":
        return ByteTokenizer()
    if problem := path_problem(spec, "file"):
        raise UsageError(f"--tokenizer must be byte or a tokenizer.json file; {spec!r} {problem}")
    return HFTokenizer(spec)


def read_chunks(inputs: list[str], cuts_anywhere: bool, progress: Any) -> Iterator[bytes]:
    """The inputs as chunks of about CHUNK_BYTES; unless `cuts_anywhere`, each ends at a line break."""
    for path in inputs:
        stream: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb")
        carry = b""
        try:
            while block := stream.read(CHUNK_BYTES):
                progress.update(len(block))
                chunk = carry + block
                cut = len(chunk) if cuts_anywhere else chunk.rfind(b"\n") + 1
                if cut == 0:  # no line break: cut before a UTF-8 continuation byte instead
                    cut = len(chunk)
                    while cut > 1 and chunk[cut - 1] & 0xC0 == 0x80:
                        cut -= 1
                yield chunk[:cut]
                carry = chunk[cut:]
            if carry:
                yield carry
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()


def tokenized(chunks: Iterator[bytes], tokenizer: Any, workers: int) -> Iterator[np.ndarray]:
    """Token arrays in input order; a Hugging Face tokenizer runs in `workers` processes with at
    most 2 chunks per worker in flight (bounded memory)."""
    if isinstance(tokenizer, ByteTokenizer) or workers == 1:
        yield from (tokenizer(c) for c in chunks)  # the byte tokenizer is faster than a pickle
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process: no oversubscription
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(tokenizer, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------
# Writing: shards written atomically, the train/val split decided per block of tokens.

class ShardWriter:
    """One split's shards: `<split>-000000.bin`, ... each written to `.tmp`, fsynced, renamed."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[list] = []  # [file name, tokens] of the finished shards
        self.file: BinaryIO | None = None
        self.tmp: Path | None = None  # the temporary name of the shard being written
        self.in_file = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None:
                self.tmp = self.directory / f"{self.split}-{len(self.shards):06d}.bin.tmp"
                self.file, self.in_file = open(self.tmp, "wb"), 0
            take = ids[: self.shard_tokens - self.in_file]
            take.astype(self.dtype, copy=False).tofile(self.file)  # DTYPES are little-endian
            self.in_file += len(take)
            ids = ids[len(take):]
            if self.in_file == self.shard_tokens:
                self.finish_shard()

    def finish_shard(self) -> None:
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.tmp.replace(self.tmp.with_suffix(""))
        self.shards.append([self.tmp.with_suffix("").name, self.in_file])
        self.file = self.tmp = None

    def discard(self) -> None:
        """Remove every file this writer wrote, the unfinished one included (after a failed write)."""
        if self.file is not None:
            self.file.close()
        if self.tmp is not None:  # also when creating it failed half-way
            self.tmp.unlink(missing_ok=True)
        self.file = self.tmp = None
        for name, _ in self.shards:
            (self.directory / name).unlink(missing_ok=True)
        self.shards = []

    @property
    def tokens(self) -> int:
        return sum(count for _, count in self.shards) + (self.in_file if self.file else 0)


def is_val_block(block: int, fraction: float) -> bool:
    """Whether block k goes to validation: `fraction` of the blocks, evenly spread."""
    return int((block + 1) * fraction + 0.5) > int(block * fraction + 0.5)


class Splitter:
    """Routes the token stream to the train and val writers, SPLIT_BLOCK_TOKENS at a time."""

    def __init__(self, train: ShardWriter, val: ShardWriter, fraction: float):
        self.train, self.val, self.fraction, self.position = train, val, fraction, 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            block, offset = divmod(self.position, SPLIT_BLOCK_TOKENS)
            take = ids[: SPLIT_BLOCK_TOKENS - offset]
            (self.val if is_val_block(block, self.fraction) else self.train).write(take)
            self.position += len(take)
            ids = ids[len(take):]


def prepare_output(directory: Path, overwrite: bool) -> None:
    """Create DIR; one that already holds files is refused unless --overwrite (then its shards
    and meta.json are removed first, meta.json before anything else)."""
    from distributed_train.tasks.tokens import META_NAME

    if directory.exists() and not directory.is_dir():
        raise UsageError(f"-o {str(directory)!r} is a file, not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        if not overwrite:
            raise UsageError(f"-o {str(directory)!r} already holds files; pass --overwrite to replace "
                             "its shards, or choose another directory")
        (directory / META_NAME).unlink(missing_ok=True)
        for old in [*directory.glob("train-*.bin*"), *directory.glob("val-*.bin*")]:
            old.unlink()
    make_directory(directory, "-o")


def write_meta(directory: Path, meta: dict) -> None:
    from distributed_train.tasks.tokens import META_NAME

    atomic_write_text(directory / META_NAME, json.dumps(meta, indent=2) + "\n", "the token metadata")


def _progress_bar(inputs: list[str]) -> Any:
    from tqdm import tqdm

    class Progress(tqdm):
        """tqdm that also counts the bytes when it draws nothing (not a terminal)."""

        bytes_read = 0

        def update(self, n: float = 1) -> Any:
            self.bytes_read += n
            return super().update(n)

    total = None if "-" in inputs else sum(Path(p).stat().st_size for p in inputs)
    # disable=None: a bar on a terminal, nothing in a log file (the summary line says it all).
    return Progress(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=None, file=sys.stderr)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    tokenizer = make_tokenizer(args.tokenizer)
    directory = Path(args.output)
    try:
        prepare_output(directory, args.overwrite)
    except OSError as exc:
        raise UsageError(f"cannot create -o {str(directory)!r}: {error_text(exc)}") from None
    start = time.perf_counter()
    writers, read_bytes = _write_shards(args, tokenizer, directory)
    elapsed = time.perf_counter() - start
    print(f"prepare-tokens: {read_bytes / 1e6:,.1f} MB -> {writers['train'].tokens:,} train and "
          f"{writers['val'].tokens:,} val tokens ({np.dtype(writers['train'].dtype).name}, vocabulary "
          f"{tokenizer.vocab_size}) in {len(writers['train'].shards) + len(writers['val'].shards)} shard(s) "
          f"under {directory}, {elapsed:.1f} s ({read_bytes / 1e6 / max(elapsed, 1e-9):,.1f} MB/s)",
          file=sys.stderr)
    return 0


def _write_shards(args: argparse.Namespace, tokenizer: Any, directory: Path) -> tuple[dict, int]:
    """Tokenize every input into DIR's shards, then write meta.json. A write that fails (full disk,
    read-only file system, no permission) is one line naming the file and the OS error, and every
    shard of this run is removed: no partial file under any name, no directory that looks complete."""
    from distributed_train.tasks.tokens import DTYPES, META_FORMAT

    dtype_name = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    writers = {split: ShardWriter(directory, split, DTYPES[dtype_name], args.shard_tokens)
               for split in ("train", "val")}
    try:
        splitter = Splitter(writers["train"], writers["val"], args.val_fraction)
        with _progress_bar(args.inputs) as progress:
            for ids in tokenized(read_chunks(args.inputs, tokenizer.cuts_anywhere, progress), tokenizer,
                                 args.workers):
                splitter.write(ids)
                progress.set_postfix(tokens=f"{splitter.position:,}", refresh=False)
        for writer in writers.values():
            writer.finish_shard()
        if not writers["train"].tokens:
            raise UsageError("the input holds no tokens for the training split (empty input, or "
                             "--val-fraction too large for its size)")
        meta = {"format": META_FORMAT, "version": 1, "dtype": dtype_name, "vocab_size": tokenizer.vocab_size,
                "tokenizer": tokenizer.describe(), "val_fraction": args.val_fraction,
                "split_block_tokens": SPLIT_BLOCK_TOKENS,
                "splits": {s: {"tokens": w.tokens, "shards": w.shards} for s, w in writers.items()},
                "inputs": [str(Path(p).resolve()) if p != "-" else "-" for p in args.inputs],
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        write_meta(directory, meta)
    except BaseException as exc:
        open_files = [w.tmp for w in writers.values() if w.tmp is not None]
        for writer in writers.values():
            writer.discard()
        if not isinstance(exc, OSError):
            raise
        if exc.filename and exc.filename in args.inputs:
            raise UsageError(f"cannot read {exc.filename}: {error_text(exc)}") from None
        where = exc.filename or (open_files[0] if open_files else directory)
        raise UsageError(f"cannot write {where}: {error_text(exc)}; removed the shards written so far") from None
    return writers, progress.bytes_read
