"""Test-only fault injection: ``CODISTILL_FAULT_INJECT`` makes a real run fail on purpose.

Never set this in a real run. The tests (tests/e2e/test_fault_tolerance.py) and benchmarks use it to
prove that a fault costs at most the work since the last checkpoint. Syntax: ``;``-separated
``kind@steps`` items, steps a comma list with optional ranges::

    CODISTILL_FAULT_INJECT="nan_loss@12,13;export_oserror@20;ckpt_oserror@30"
    CODISTILL_FAULT_INJECT="nan_loss@25-40;sigkill_in_save@20"
    CODISTILL_FAULT_INJECT="sigkill:1@13"          # only global rank 1 (KIND:RANK@STEPS)

Kinds (where they fire):
    nan_loss         the training loss of every hosted group becomes NaN at these steps
    export_oserror   write_export raises OSError(ENOSPC) after the weights file, before the
                     metadata and LATEST (the worst moment: a half-written export)
    ckpt_oserror     the DeepSpeed checkpoint write raises OSError(ENOSPC) on its first file
                     (hooked into the checkpoint engine's save by codistill/checkpoint.py)
    sigkill_in_save  SIGKILL to this process after DeepSpeed wrote a checkpoint's files but
                     before it was marked complete and 'latest' was moved to it
    sigkill          SIGKILL to this process in the middle of the step (after the forward
                     pass of the first micro-batch, before its backward)
    nan_weights      --peer_use average|diloco: group 0's weights, as read for the average at
                     these (exchange) steps, become NaN (a group that diverged)
"""
from __future__ import annotations

import errno
import os
import signal

ENV = "CODISTILL_FAULT_INJECT"
KINDS = {"nan_loss", "export_oserror", "ckpt_oserror", "sigkill_in_save", "sigkill", "nan_weights"}


def parse(spec: str | None, rank: int | None = None) -> dict[str, set[int]]:
    """kind -> steps planned for global rank ``rank`` (default: $RANK)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    out: dict[str, set[int]] = {}
    for item in (spec or "").split(";"):
        item = item.strip()
        if not item:
            continue
        kind, _, steps = item.partition("@")
        kind, _, only_rank = kind.partition(":")
        if kind not in KINDS or not steps or (only_rank and not only_rank.isdigit()):
            raise ValueError(f"{ENV}: bad item {item!r}; expected KIND[:RANK]@STEPS with KIND in {sorted(KINDS)}")
        try:
            planned = set()
            for part in steps.split(","):
                lo, _, hi = part.partition("-")
                planned.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"{ENV}: bad steps in {item!r}; expected e.g. 12,13 or 20-30") from None
        if not only_rank or int(only_rank) == rank:
            out.setdefault(kind, set()).update(planned)
    return out


def _plan() -> dict[str, set[int]]:
    return parse(os.environ.get(ENV))


def active(kind: str, step: int) -> bool:
    return step in _plan().get(kind, ())


def oserror(kind: str, step: int) -> None:
    """Raise the injected write error if ``kind`` is planned at ``step``."""
    if active(kind, step):
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV}={kind}@{step})")


def sigkill(kind: str, step: int) -> None:
    if active(kind, step):
        os.kill(os.getpid(), signal.SIGKILL)


def write_bad_export(exports_dir, step: int, model_config, tokenizer_sha256: str, kind: str, group: int = 1,
                     seed: int = 0) -> None:
    """A peer gone wrong, for tests and benchmarks/faults.py: an export of ``model_config`` that
    passes every file check (safetensors, metadata, size, digest, config and tokenizer hashes) but
    holds ``kind`` = "nan" (NaN weights: a diverged peer whose writer did not refuse them) or
    "garbage" (finite random weights, std 3: another version of the code, a hardware fault)."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from codistill.exports import export_name, file_digest
    from fileio import atomic_write, atomic_write_bytes
    from model import build_model
    torch.manual_seed(seed)
    sd = {k: v.clone() for k, v in build_model(model_config).state_dict().items()}
    for v in sd.values():
        if kind == "nan":
            v.fill_(float("nan"))
        elif kind == "garbage":
            v.normal_(0.0, 3.0)
        else:
            raise ValueError(f"kind must be nan or garbage, got {kind!r}")
    d = Path(exports_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = export_name(step)
    atomic_write(d / f"{name}.safetensors", lambda tmp: save_file(sd, str(tmp)))
    meta = {"group": group, "step": step, "tokens_seen": 512 * step, "model_config": model_config.to_dict(),
            "model_config_hash": model_config.config_hash(), "tokenizer_sha256": tokenizer_sha256,
            "weights": f"{name}.safetensors", **file_digest(d / f"{name}.safetensors")}
    atomic_write_bytes(d / f"{name}.json", json.dumps(meta).encode())
    atomic_write_bytes(d / "LATEST", name.encode())
