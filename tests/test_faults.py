"""codistill/faults.py: the test-only fault-injection spec."""

import pytest

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
