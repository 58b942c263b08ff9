"""Sharded over 8 devices, every regularizer trains exactly as on one device.

A mesh of 4 (data) × 2 (model) CPU devices: the batch is split over ``data``, every
kernel's fan-out and every bias over ``model``; the step is ``jax.jit`` and nothing
else. After a few steps the params and the optimizer state (power-iteration
vectors, AdaReg precisions, momenta) must equal the single-device run to float32
rounding, and every device holding a copy of a state leaf must hold the same bits.

The device count is fixed when JAX initialises, so the training runs in one
subprocess (``tests/_multidevice_check.py``) with ``XLA_FLAGS`` set; this module
reads its JSON report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = ["spectral", "eigenvalue_decay", "adareg", "jacobian_random"]
SCRIPT = Path(__file__).with_name("_multidevice_check.py")
# Relative to the largest magnitude of each leaf. Sharded matmuls sum in another
# order, so float32 results differ by rounding, never more: the bound is 1e-5 or
# four times the null control, the change that a float32 rounding (2⁻²³ relative)
# of the initial params makes on one device. AdaReg's re-solve inverts KᵀΩK, which
# scales rounding by κ(K)², so its control is ~1e-6 where the others' is ~1e-7.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT), *CASES],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # generous: a loaded 2-core machine runs it in ~20–60 s
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_subprocess_sees_eight_devices(report):
    assert report["n_devices"] == 8


@pytest.mark.parametrize("case", CASES)
def test_sharded_training_matches_one_device(report, case):
    result = report[case]
    assert "error" not in result, result.get("error")
    assert result["params_finite"]
    # The setup is well conditioned: rounding alone moves nothing by more than 1e-4.
    assert result["rounding_sensitivity"] < 1e-4
    bound = max(TOLERANCE, 4 * result["rounding_sensitivity"])
    assert result["param_difference"] < bound
    assert result["state_difference"] < bound
    # The params really were split over all 8 devices, and stay split.
    assert result["param_devices"] == [8]
    assert result["param_shardings_kept"]


@pytest.mark.parametrize("case", CASES)
def test_state_replicas_hold_identical_bits(report, case):
    result = report[case]
    assert "error" not in result, result.get("error")
    assert result["state_devices"] == [8]
    assert result["replicas_identical"]
