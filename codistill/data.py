"""Reading prepared token shards for training: memmaps, deterministic batches, fixed eval batches.

A group's training stream is its shard(s) of the data-prep output, seen as one flat token
array cut into non-overlapping windows of seq_len+1 tokens. Sample k of the stream is a
window chosen by a seeded permutation per epoch, so:
- a group sees every window of its data once before any repeats (one pass, as in the paper);
- batch (step, micro_step, dp_rank) is a pure function of (seed, group, step, ...), so a
  resumed run continues the exact same stream, and no two ranks of a group share a sample.
With --carry_state (an LSTM carrying its state across steps, truncated BPTT) the group's
tokens are instead cut into S = dp_size x grad_accum x micro_batch contiguous streams of equal
length, one per row of the group's batch: row b of micro-batch m on data-parallel rank r reads
stream (m x dp_size + r) x micro_batch + b, and step t (0-based) reads window t mod W of every
stream (W windows per stream; at t mod W == 0 every stream starts over, the carried state is
reset). The streams partition the group's shard, so no two rows, ranks or groups share one.
If the data was prepared with more shards than the run has groups (a multiple of them),
group i reads shards i*m .. i*m+m-1: a 1-group baseline on 2-group data reads everything.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data_prep.tokenizer import HF, SENTENCEPIECE, SP_FILE, TokenizerFiles


class DataError(ValueError):
    pass


class TokenData:
    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        manifest = self.dir / "manifest.json"
        if not self.dir.is_dir():
            raise DataError(f"data directory {self.dir} does not exist: prepare it with "
                            f"'python data_prep/prepare.py --input YOUR_TEXT --output {self.dir} --num_groups G' "
                            f"(or --sample for the embedded corpus)")
        if not manifest.is_file():
            raise DataError(f"{manifest} is missing: {self.dir} is not a data_prep output directory "
                            "(or its preparation did not finish)")
        try:
            self.manifest = json.loads(manifest.read_text())
            self.vocab_size = int(self.manifest["vocab_size"])
            self.num_shards = int(self.manifest["num_groups"])
            self.dtype = np.dtype(self.manifest["dtype"])
            self.splits = self.manifest["splits"]
            self.eos_id = int(self.manifest["eos_id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{manifest} is not a valid manifest ({e!r}); re-run data_prep/prepare.py") from None
        # "sentencepiece" (tokenizer.model) or "hf" (a Hugging Face tokenizer in tokenizer/)
        self.tokenizer_kind = self.manifest.get("tokenizer_kind", SENTENCEPIECE)
        self.tokenizer_path = self.dir / self.manifest.get("tokenizer", SP_FILE)
        if self.tokenizer_kind not in (SENTENCEPIECE, HF):
            raise DataError(f"{manifest}: unknown tokenizer_kind {self.tokenizer_kind!r}; re-run data prep")
        found = self.tokenizer_path.is_file() if self.tokenizer_kind == SENTENCEPIECE else self.tokenizer_path.is_dir()
        if not found:
            raise DataError(f"tokenizer {self.tokenizer_path} named by {manifest} is missing")

    @property
    def tokenizer_sha256(self) -> str:
        """As the manifest records it (SentencePiece: sha256 of tokenizer.model; HF: over the
        files of tokenizer/, see tokenizer.files_sha256)."""
        return self.manifest.get("tokenizer_sha256") or TokenizerFiles.read(self.dir, self.manifest).sha256

    def check_tokenizer(self) -> None:
        """The tokenizer must load (a SentencePiece model, or a Hugging Face tokenizer.json) and
        its vocabulary size must be the manifest's vocab_size (and hold its eos_id)."""
        if self.tokenizer_kind == HF:
            from data_prep.hf_tokenizer import check_hf

            problem = check_hf(self.dir, self.manifest, check_hash=False)
            if problem:
                raise DataError(f"{problem}; re-run data prep")
            return
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(self.tokenizer_path))
        except Exception as e:  # noqa: BLE001 - SentencePiece raises OSError or RuntimeError
            raise DataError(f"{self.tokenizer_path} is not a SentencePiece model ({e})") from None
        if sp.GetPieceSize() != self.vocab_size:
            raise DataError(f"tokenizer {self.tokenizer_path} has {sp.GetPieceSize()} pieces but "
                            f"{self.dir}/manifest.json says vocab_size={self.vocab_size}; re-run data prep")

    def token_path(self, split: str) -> Path:
        if split not in self.splits:
            raise DataError(f"split {split!r} is not in {self.dir}/manifest.json (has {sorted(self.splits)})")
        try:
            return self.dir / self.splits[split]["tokens"]
        except (KeyError, TypeError):
            raise DataError(f"{self.dir}/manifest.json names no token file for split {split!r}; "
                            "re-run data_prep/prepare.py") from None

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only memmap; DataError naming the file if it is missing,
        not a regular file, or not the manifest's num_tokens whole tokens (truncated/foreign)."""
        path = self.token_path(split)
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise DataError(f"{path} (split {split}) is not a regular file: restore it or re-run data_prep/prepare.py")
        if not path.is_file():
            raise DataError(f"{path} (split {split}) is missing")
        size, width = path.stat().st_size, self.dtype.itemsize
        expected = self.splits[split].get("num_tokens")
        if size % width or (expected is not None and size // width != int(expected)):
            raise DataError(f"{path} (split {split}) has {size} bytes, but {self.dir}/manifest.json says "
                            f"{expected} {self.dtype} tokens ({width} bytes each): the file is truncated or "
                            "from another dataset; restore it or re-run data_prep/prepare.py")
        if size == 0:
            return np.empty(0, self.dtype)  # np.memmap refuses an empty file
        return np.memmap(path, dtype=self.dtype, mode="r")

    def check_ids(self, split: str, chunk: int = 1 << 24) -> None:
        """Every token id of ``split`` is < vocab_size (else the embedding's index error at the
        first window that holds one): a max over the memmap, ``chunk`` tokens at a time."""
        toks = self.tokens(split)
        for lo in range(0, len(toks), chunk):
            part = toks[lo:lo + chunk]
            if int(part.max()) >= self.vocab_size:
                at = lo + int(np.argmax(part >= self.vocab_size))
                raise DataError(f"{self.token_path(split)} (split {split}) holds token id {int(toks[at])} at token "
                                f"offset {at} (byte {at * self.dtype.itemsize}), but {self.dir}/manifest.json says "
                                f"vocab_size={self.vocab_size}: the file is corrupt or from another tokenizer; "
                                "re-run data_prep/prepare.py")

    def check_run(self, groups, num_groups: int, seq_len: int, shared: bool = False, val: str = "val") -> None:
        """Before any compute: every split a run hosting ``groups`` reads (their shards, all of
        them if ``shared``, and ``val``) is readable, holds only ids < vocab_size and at least
        one window of seq_len+1 tokens."""
        for g in groups:
            own = self.group_shards(g, num_groups)  # validates group / num_groups either way
            shards = self.group_shards(0, 1) if shared else own
            for s in shards:
                self.check_ids(s)
            need_windows(sum(len(self.tokens(s)) for s in shards), seq_len, f"group {g}'s shard")
        self.check_ids(val)
        need_windows(len(self.tokens(val)), seq_len, f"the {val} split of {self.dir}")

    def group_shards(self, group: int, num_groups: int) -> list[str]:
        if num_groups < 1 or self.num_shards % num_groups:
            raise DataError(f"{self.dir} has {self.num_shards} group shards, which cannot be divided among "
                            f"--num_groups {num_groups}: re-run data prep with --num_groups {num_groups} "
                            f"(or a multiple of it)")
        if not 0 <= group < num_groups:
            raise DataError(f"group {group} is outside 0..{num_groups - 1}")
        m = self.num_shards // num_groups
        return [f"group_{s}" for s in range(group * m, (group + 1) * m)]


class GroupStream:
    """Deterministic training batches for one group."""

    def __init__(self, data: TokenData, group: int, num_groups: int, seq_len: int, seed: int, shared: bool = False):
        """``shared``: every group reads ALL shards (in its own order) instead of its own - the
        same-data arm of the paper's disjoint-vs-same-data comparison."""
        data.group_shards(group, num_groups)  # validates group / num_groups either way
        shards = data.group_shards(0, 1) if shared else data.group_shards(group, num_groups)
        parts = [data.tokens(s) for s in shards]
        self.tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.seq_len, self.seed, self.group = seq_len, seed, group
        self.num_windows = need_windows(len(self.tokens), seq_len, f"group {group}'s shard")
        self._perm_cache: tuple[int, np.ndarray | None] = (-1, None)

    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, np.random.default_rng([self.seed, self.group, epoch]).permutation(self.num_windows))
        return self._perm_cache[1]

    def window(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, self.num_windows)
        start = int(self._perm(epoch)[i]) * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def batch(self, step: int, micro_step: int, grad_accum: int, dp_rank: int, dp_size: int,
              micro_batch: int) -> torch.Tensor:
        """[micro_batch, seq_len+1] int64 for 0-based ``step``."""
        base = ((step * grad_accum + micro_step) * dp_size + dp_rank) * micro_batch
        return torch.from_numpy(np.stack([self.window(base + b) for b in range(micro_batch)]).astype(np.int64))

    def streams(self, num_streams: int) -> tuple[int, int]:
        """(tokens per stream, windows per stream) when the shard is cut into ``num_streams``."""
        length = len(self.tokens) // num_streams
        windows = (length - 1) // self.seq_len
        if windows < 1:
            raise DataError(f"--carry_state cuts group {self.group}'s {len(self.tokens)} tokens into {num_streams} "
                            f"streams (ranks x gradient_accumulation_steps x micro batch) of {length} tokens, fewer than "
                            f"--seq_len+1={self.seq_len + 1}: use a smaller batch, a shorter --seq_len or more data")
        return length, windows

    def stream_batch(self, step: int, micro_step: int, grad_accum: int, dp_rank: int, dp_size: int,
                     micro_batch: int) -> tuple[torch.Tensor, bool]:
        """--carry_state: ([micro_batch, seq_len+1] int64, whether the streams start over) for
        0-based ``step``: window step mod W of this micro-batch's streams (module docstring)."""
        length, windows = self.streams(dp_size * grad_accum * micro_batch)
        w = step % windows
        first = (micro_step * dp_size + dp_rank) * micro_batch
        rows = [self.tokens[s * length + w * self.seq_len:s * length + (w + 1) * self.seq_len + 1]
                for s in range(first, first + micro_batch)]
        return torch.from_numpy(np.stack(rows).astype(np.int64)), w == 0


def need_windows(num_tokens: int, seq_len: int, what: str) -> int:
    """How many windows of seq_len+1 tokens (sharing boundaries) ``num_tokens`` hold; DataError if none."""
    n = (num_tokens - 1) // seq_len
    if n < 1:
        raise DataError(f"{what} has {num_tokens} tokens, fewer than --seq_len+1={seq_len + 1}: use "
                        f"--seq_len {max(1, num_tokens - 1)} or less, or more data")
    return n


def split_windows(data: TokenData, split: str, seq_len: int) -> tuple[np.ndarray, int]:
    """The split's tokens and how many whole windows of seq_len+1 (sharing boundaries) it holds."""
    toks = data.tokens(split)
    return toks, need_windows(len(toks), seq_len, f"the {split} split of {data.dir}")


def eval_batches(data: TokenData, seq_len: int, micro_batch: int, num_batches: int, dp_rank: int,
                 dp_size: int, split: str = "val") -> list[torch.Tensor]:
    """The same fixed validation batches every time: consecutive windows from the start of the
    split, spread over the group's ranks (fewer if the split is short)."""
    toks, n = split_windows(data, split, seq_len)
    total = min(n, num_batches * micro_batch * dp_size)
    mine = list(range(dp_rank, total, dp_size))
    out = []
    for i in range(0, len(mine), micro_batch):
        w = [toks[k * seq_len:k * seq_len + seq_len + 1] for k in mine[i:i + micro_batch]]
        out.append(torch.from_numpy(np.stack(w).astype(np.int64)))
    return out


def eval_streams(data: TokenData, seq_len: int, micro_batch: int, num_batches: int, dp_rank: int,
                 dp_size: int, split: str = "val") -> list[torch.Tensor]:
    """eval_batches' tokens read as contiguous rows, for an LSTM that carries its state from one
    batch to the next (stateful validation): the first num_batches x micro_batch x dp_size
    windows of the split are cut into micro_batch x dp_size rows of whole windows; batch j of a
    rank holds window j of its micro_batch rows. The state starts from zeros at each row's start."""
    toks, n = split_windows(data, split, seq_len)
    num_rows = micro_batch * dp_size
    per_row = max(1, min(n, num_batches * num_rows) // num_rows)
    mine = [r for r in range(dp_rank * micro_batch, (dp_rank + 1) * micro_batch) if (r + 1) * per_row <= n]
    if not mine:
        return []
    return [torch.from_numpy(np.stack([toks[(r * per_row + j) * seq_len:(r * per_row + j + 1) * seq_len + 1]
                                       for r in mine]).astype(np.int64)) for j in range(per_row)]
