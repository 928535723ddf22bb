"""`sparge bench` on the CPU (smoke only: the figures that matter come from a GPU), its JSON, and its usage errors."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import one_error_line
from typer.testing import CliRunner

from sparge.bench import _timer
from sparge_cli.app import app

pytestmark = pytest.mark.usefixtures("plain_torch_on_cpu")  # see conftest: the Triton interpreter is tested elsewhere

runner = CliRunner()
TINY = ["bench", "--device", "cpu", "--shape", "1x2x300x64", "--sparsity", "0.5", "--methods", "sdpa,sparge",
        "--dtype", "fp32", "--warmup-ms", "0", "--rep-ms", "1"]


def test_bench_cpu_json_rows_and_atomic_out(tmp_path):
    out = tmp_path / "bench.json"
    r = runner.invoke(app, [*TINY, "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    printed, written = json.loads(r.stdout), json.loads(out.read_text())
    assert printed["rows"] == written["rows"] and written["command"].startswith("sparge ")  # sys.argv: pytest's here
    rows = {(x["method"], x["pass"]): x for x in written["rows"]}
    assert set(rows) == {("sdpa", "fwd"), ("sdpa", "fwd+bwd"), ("sparge", "fwd"), ("sparge", "fwd+bwd")}
    for x in rows.values():
        assert "error" not in x and x["ms"] > 0 and x["total_ms"] > 0
    sparse = rows[("sparge", "fwd")]
    # 300 tokens: 3 query blocks x 5 key blocks, partial last blocks; topk 0.5 keeps 3 of 5 per row, so 40% of the
    # score matrix is skipped and the target 0.5 is reported next to what was reached
    assert sparse["target_sparsity"] == 0.5 and 0.2 < sparse["measured_sparsity"] < 0.6
    assert sparse["mask_ms"] > 0 and rows[("sdpa", "fwd")]["measured_sparsity"] == 0.0
    assert not [p for p in tmp_path.iterdir() if p.name != "bench.json"]  # no temp file left behind

    r = runner.invoke(app, [*TINY, "--json", "--out", str(out)])
    one_error_line(r, 2, str(out), "already exists", "--overwrite")
    assert json.loads(out.read_text()) == written  # untouched
    r = runner.invoke(app, [*TINY, "--json", "--out", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, needles", [
    (["--sparsity", "1.0"], ["--sparsity 1.0", "[0, 1)"]),
    (["--methods", "sdpa,fast"], ["--methods", "fast", "sdpa-cudnn"]),
    (["--shape", "1x2x300"], ["'1x2x300'", "BxHxLxD"]),
    (["--dtype", "int8"], ["int8"]),
    (["--device", "tpu"], ["tpu"]),
])
def test_bench_bad_input_is_one_line(args, needles):
    base = [a for a in TINY]
    for flag, value in zip(args[::2], args[1::2]):
        base[base.index(flag) + 1] = value
    one_error_line(runner.invoke(app, base), 2, *needles)


def test_cpu_timer_takes_the_median_of_repeated_calls():
    calls = []
    ms = _timer(torch.device("cpu"), 0, 5)(lambda: calls.append(1))
    assert 0 <= ms < 50 and len(calls) >= 2
