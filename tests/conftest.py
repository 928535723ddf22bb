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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "interpreted: keeps TRITON_INTERPRET=1 on a CPU where a test module otherwise switches to plain torch"
    )


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random-weight Wan2.1 pipeline saved in diffusers format (see `sparge.testbed.tiny`); read-only."""
    from sparge.testbed.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-wan", seed=0)


@pytest.fixture
def plain_torch_on_cpu(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """On a CPU, run sparge's mask selection and attention in plain torch (as on a CPU without the Triton
    interpreter), unless the test is marked ``interpreted``.

    The interpreter costs about 2 s per mask of the tiny pipeline, so pipeline-level tests would take
    minutes; the interpreted Triton path keeps its own tests. Triton decides interpreted vs compiled when a
    kernel is defined, so every kernel module is imported under TRITON_INTERPRET=1 first; afterwards only
    sparge's dispatch (`sparge.kernels.interpreter_on`, read per call) sees "0". No effect on a GPU.
    """
    if torch.cuda.is_available() or request.node.get_closest_marker("interpreted") is not None:
        return
    import sparge.kernels.block_sparse_attn  # noqa: F401
    import sparge.kernels.mask_lut  # noqa: F401
    import sparge.kernels.pool  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")
