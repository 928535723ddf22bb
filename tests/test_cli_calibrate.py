"""`sparge calibrate` end to end on a tiny Wan pipeline: writes levels atomically, errors exit 2 with one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import one_error_line
from typer.testing import CliRunner

from sparge.presets import load_preset
from sparge_cli.app import app

runner = CliRunner()
FAST = ["--steps", "3", "--capture-steps", "2", "--num-prompts", "1", "--heads", "1", "--device", "cpu", "--dtype", "fp32", "--backend", "torch"]


@pytest.fixture(autouse=True)
def _cpu_without_triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the CLI as on a plain CPU: exact torch paths (one warning) instead of the Triton interpreter.

    Pooling and mask selection run their Triton kernels whatever ``--backend`` says; interpreted, that is
    about 8 s per attention call of the tiny model. The kernels and calibration's kernel path are tested
    elsewhere (tests/test_kernel.py, tests/test_calibrate.py); these tests are about the command.
    """
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _preset(tmp_path: Path, model: Path, name: str = "tiny.yaml") -> Path:
    p = tmp_path / name
    p.write_text(
        "# tiny preset for tests\n"
        f"model: {model}\nheight: 128\nwidth: 160\nframes: 9\nblock_q: 32\nblock_k: 16\nsparse_layers: all\ndense_steps: 0\n"
        "levels:\n  0.5: {topk: 0.3, topp: 0.5, measured_sparsity: null, source: hand-written}\n"
    )
    return p


def _json(result) -> dict:
    out = result.stdout
    return json.loads(out[out.index("{"):])


def test_calibrate_writes_levels_and_generate_uses_them(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    preset = _preset(tmp_path, tiny_pipeline_dir)
    r = runner.invoke(app, ["calibrate", "--preset", str(preset), "--target", "0.6", "--target", "0.7", "--per-layer", "--json", *FAST])
    assert r.exit_code == 0, r.output
    res = _json(r)
    pr = load_preset(preset)
    assert set(pr.levels) == {0.5, 0.6, 0.7} and pr.level(0.5).source == "hand-written"  # other levels kept
    assert preset.read_text().startswith("# tiny preset for tests")
    for tr, pl in zip(res["results"], res["per_layer"]):
        c, lv = tr["chosen"], pr.level(tr["target"])
        assert abs(c["sparsity"] - tr["target"]) <= 0.005
        assert (lv.topk, lv.topp) == (c["topk"], c["topp"])
        assert lv.calibrated_on["model"] == str(tiny_pipeline_dir) and lv.calibrated_on["steps"] == 3
        assert {"date", "prompts", "height", "width", "frames", "attention_error"} <= set(lv.calibrated_on)
        assert sum(cand["chosen"] for cand in tr["candidates"]) == 1
        assert bool(lv.per_layer) == pl["lowers_error"]
        if lv.per_layer:
            assert set(lv.per_layer) == {0, 1}
    # `sparge generate --sparsity 0.6` runs with the calibrated level
    video = tmp_path / "v.mp4"
    g = runner.invoke(app, ["generate", "--prompt", "a cat", "--preset", str(preset), "--sparsity", "0.6", "--steps", "2",
                            "--device", "cpu", "--dtype", "fp32", "--backend", "torch", "--out", str(video), "--json"])
    assert g.exit_code == 0, g.output
    side = json.loads(video.with_suffix(".json").read_text())
    assert (side["topk"], side["topp"]) == (pr.level(0.6).topk, pr.level(0.6).topp)


def test_dry_run_and_unreachable_write_nothing(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    preset = _preset(tmp_path, tiny_pipeline_dir)
    before = preset.read_bytes()
    r = runner.invoke(app, ["calibrate", "--preset", str(preset), "--target", "0.6", "--dry-run", *FAST])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "dry run: nothing written" in text and "chosen" in text
    assert preset.read_bytes() == before
    r = runner.invoke(app, ["calibrate", "--preset", str(preset), "--target", "0.99", *FAST])
    one_error_line(r, 2, "0.99", "closest reachable", after_work=True)
    assert preset.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_out_creates_a_new_preset_and_refuses_to_overwrite(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "new.yaml"
    args = ["calibrate", "--model", str(tiny_pipeline_dir), "--height", "128", "--width", "160", "--frames", "9",
            "--block-q", "32", "--block-k", "16", "--target", "0.6", "--out", str(out), *FAST]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    pr = load_preset(out)
    assert (pr.model, pr.height, pr.width, pr.frames, pr.block_q, pr.block_k) == (str(tiny_pipeline_dir), 128, 160, 9, 32, 16)
    assert abs(pr.level(0.6).measured_sparsity - 0.6) <= 0.005
    before = out.read_bytes()
    one_error_line(runner.invoke(app, args), 2, "already exists", "--overwrite")
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--target", "1.5"], ["--target 1.5", "between 0 and 1"]),
        (["--target", "0"], ["--target 0.0", "between 0 and 1"]),
        ([], ["--target is required"]),
        (["--target", "0.5"], ["already has level(s) 0.5", "--overwrite"]),
        (["--target", "0.6", "--tolerance", "0"], ["--tolerance 0.0"]),
        (["--target", "0.6", "--layers", "0,9"], None),  # checked after loading: needs the layer count
        (["--target", "0.6", "--capture-steps", "9"], ["--capture-steps 9", "1..3"]),
        (["--target", "0.6", "--block-q", "64"], ["--block-q 64", "differs"]),
        (["--target", "0.6", "--prompts", "/nonexistent/prompts.txt"], ["--prompts /nonexistent/prompts.txt"]),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_pipeline_dir: Path, tmp_path: Path, extra: list[str], needles) -> None:
    preset = _preset(tmp_path, tiny_pipeline_dir)
    before = preset.read_bytes()
    r = runner.invoke(app, ["calibrate", "--preset", str(preset), *FAST, *extra])  # extra last: its values win
    one_error_line(r, 2, *(needles or ["--layers '0,9'", "0..1"]))
    assert preset.read_bytes() == before


def test_missing_model_and_unwritable_preset(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    r = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "no-such-model"), "--height", "128", "--width", "160",
                            "--frames", "9", "--target", "0.6", "--out", str(tmp_path / "x.yaml"), *FAST])
    one_error_line(r, 2, "no-such-model", "does not exist")
    assert not (tmp_path / "x.yaml").exists()
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere: the unwritable-preset check cannot be exercised")
    d = tmp_path / "ro"
    d.mkdir()
    preset = _preset(d, tiny_pipeline_dir)
    d.chmod(0o555)
    try:
        r = runner.invoke(app, ["calibrate", "--preset", str(preset), "--target", "0.6", *FAST])
        one_error_line(r, 2, "cannot write preset", "--out")
    finally:
        d.chmod(0o755)
