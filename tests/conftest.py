"""Test-wide setup. TRITON_INTERPRET must be set before any kernel module is imported, so it lives here."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """The built-in synthetic shift, generated and prepared once per test session (about 6 s), for the tests that
    run the fast trainer or the throughput bench end to end."""
    # imported here, not at the top: the kernels must be imported only after TRITON_INTERPRET is set above,
    # and most test modules never need the engine
    from dsp_fast.config import load_config
    from dsp_fast.engine.data_setup import prepare_synthetic

    root = str(tmp_path_factory.getbasetemp() / "synthetic")
    prepare_synthetic(load_config("synthetic", [f"data.synthetic_root={root}"]))
    return root


@pytest.fixture(scope="session")
def tiny_run(synthetic_root, tmp_path_factory) -> str:
    """A finished 2-step run of the tiny model (its folder), for the tests that read a run's files or resume it."""
    from helpers_run import quiet_args

    from dsp_fast import train  # after TRITON_INTERPRET, as above

    out = str(tmp_path_factory.mktemp("tiny_run") / "run")
    assert train.main(quiet_args(synthetic_root, out, 2)) == 0
    return out


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds, so a failure reproduces."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def value_checks_off():
    """As the CUDA path runs (engine.trainer.configure_backends): the kernels' label-value checks off."""
    from dsp_fast.kernels import set_value_checks  # after TRITON_INTERPRET, as above

    set_value_checks(False)
    yield
    set_value_checks(True)
