"""Shared test setup.

Without a CUDA device the Triton kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` must be
set before anything imports triton, so it is set here, at import time, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Tests run many small ops on a shared 2-core machine; intra-op threads fighting over the cores make the
# tiny-pipeline tests 10-20x slower. SPARGE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("SPARGE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random-weight Wan2.1 pipeline saved in diffusers format (see `sparge.testbed.tiny`); read-only."""
    from sparge.testbed.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-wan", seed=0)
