"""codistill/faults.py: the test-only fault-injection spec."""

import pytest
from test_checkpoint import tmpfs  # noqa: F401  (the 2 MiB tmpfs fixture)

from codistill import faults


def test_fault_spec_parses_and_rejects_unknown_kinds():
    assert faults.parse("nan_loss@12,13,20-22;ckpt_oserror@5") == {"nan_loss": {12, 13, 20, 21, 22},
                                                                   "ckpt_oserror": {5}}
    assert faults.parse(None) == {} and faults.parse("") == {}
    assert faults.parse("sigkill:1@13;nan_loss@2", rank=0) == {"nan_loss": {2}}
    assert faults.parse("sigkill:1@13;nan_loss@2", rank=1) == {"sigkill": {13}, "nan_loss": {2}}
    for bad in ("rm_rf@3", "nan_loss", "sigkill:x@3", "nan_loss@a-b"):
        with pytest.raises(ValueError, match="bad"):
            faults.parse(bad)


def test_export_writer_on_a_full_then_read_only_disk_raises_oserror_and_keeps_latest(tmpfs):  # noqa: F811
    """A real 2 MiB tmpfs: write_export's own writer reports ENOSPC and EROFS as OSError (what
    ExportWriter catches), removes its half-written export and leaves LATEST on the previous one."""
    import os
    import subprocess

    import torch

    from codistill.exports import list_exports, read_export, read_latest, write_export
    d = tmpfs / "exports"
    sd = {"w": torch.randn(256, 256)}
    write_export(d, 10, sd, {"group": 0})
    with open(tmpfs / "filler", "wb") as f:
        st = os.statvfs(tmpfs)
        f.write(b"\0" * (st.f_bavail * st.f_frsize - 64 * 1024))
    with pytest.raises(OSError, match="No space left"):
        write_export(d, 20, sd, {"group": 0})
    assert read_latest(d) == 10 and list_exports(d) == [10] and sorted(os.listdir(d)) == [
        "LATEST", "step_000010.json", "step_000010.safetensors"]
    (tmpfs / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(OSError, match="Read-only"):
        write_export(d, 30, sd, {"group": 0})
    assert read_latest(d) == 10 and torch.equal(read_export(d, 10).state_dict["w"], sd["w"])
