"""`sparge generate` end to end on the tiny Wan2.1 pipeline (CPU), and every documented usage error."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import typer
import yaml
from cli_helpers import one_error_line
from typer.testing import CliRunner

from sparge_cli.generate import register

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"),
    pytest.mark.usefixtures("plain_torch_on_cpu"),  # see conftest: the Triton interpreter is tested elsewhere
]


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    register(app)
    return app


APP = _app()
TINY = ["--height", "128", "--width", "160", "--frames", "9", "--steps", "3", "--device", "cpu", "--dtype", "fp32"]
FAST = ["--backend", "torch"]  # the exact PyTorch attention, no fallback warning; the first test keeps the default


def run(*args: str):
    return CliRunner().invoke(APP, ["generate", *args])


@pytest.fixture(scope="module")
def preset_file(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A preset for the tiny model: level 0.5 is sparse, level 0.01 is dense (k = 1)."""
    p = tmp_path_factory.mktemp("presets") / "tiny-test.yaml"
    p.write_text(yaml.safe_dump({
        "model": str(tiny_pipeline_dir), "height": 128, "width": 160, "frames": 9,
        "levels": {
            0.5: {"topk": 0.25, "topp": 0.3, "measured_sparsity": None, "source": "test"},
            0.01: {"topk": 1.0, "topp": 0.0, "measured_sparsity": 0.0, "source": "test: dense level"},
        },
    }))
    return p


def _video(path: Path) -> np.ndarray:
    return iio.imread(path, plugin="FFMPEG")


def test_generate_sparse_writes_playable_mp4_and_sidecar(preset_file, tmp_path):
    out = tmp_path / "cat.mp4"
    r = run("--prompt", "a red cat runs", "--negative-prompt", "dark", "--preset", str(preset_file), "--sparsity", "0.5",
            "--seed", "3", "--out", str(out), "--json", *TINY[:-2], "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    frames = _video(out)
    assert frames.shape == (9, 128, 160, 3) and frames.dtype == np.uint8
    side = json.loads(out.with_suffix(".json").read_text())
    printed = json.loads(r.stdout[r.stdout.index("{"):])
    assert printed == side
    assert side["prompt"] == "a red cat runs" and side["negative_prompt"] == "dark" and side["seed"] == 3
    assert side["preset"] == "tiny-test" and side["sparsity_level"] == 0.5 and side["backend"] == "auto"
    assert (side["topk"], side["topp"], side["dense"]) == (0.25, 0.3, False)
    assert 0.0 < side["measured_sparsity"] < 1.0
    assert set(side["measured_sparsity_per_layer"]) == {"0", "1"}
    t = side["timings"]
    assert len(t["ms_per_step_all"]) == 3 and t["denoise_s"] > 0 and t["vae_decode_s"] > 0 and t["total_s"] >= t["denoise_s"]
    assert side["versions"]["torch"] == torch.__version__ and side["versions"]["sparge"]
    assert (side["frames"], side["height"], side["width"], side["device"], side["dtype"]) == (9, 128, 160, "cpu", "float32")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"

    again = run("--prompt", "a red cat runs", "--preset", str(preset_file), "--out", str(out), *TINY)
    msg = one_error_line(again)
    assert "already exists" in msg and "--overwrite" in msg


def test_dense_level_equals_dense_baseline_and_summary(preset_file, tmp_path):
    base = ["--prompt", "a boat on the sea", "--preset", str(preset_file), *TINY, *FAST]
    r1 = run(*base, "--dense", "--out", str(tmp_path / "dense.mp4"))
    assert r1.exit_code == 0, r1.output
    r2 = run(*base, "--sparsity", "0.01", "--out", str(tmp_path / "k1.mp4"))
    assert r2.exit_code == 0, r2.output
    text = " ".join(r2.output.split())
    assert "measured sparsity 0.000" in text and "s/step" in text and str(tmp_path / "k1.mp4") in text
    a, b = _video(tmp_path / "dense.mp4").astype(np.float64), _video(tmp_path / "k1.mp4").astype(np.float64)
    assert np.abs(a - b).mean() < 0.5  # same frames up to float rounding (and the codec)
    side = json.loads((tmp_path / "dense.json").read_text())
    assert side["dense"] is True and side["measured_sparsity"] == 0.0 and side["topk"] is None
    # the overwrite flag replaces both files
    r3 = run(*base, "--sparsity", "0.5", "--out", str(tmp_path / "k1.mp4"), "--overwrite")
    assert r3.exit_code == 0, r3.output
    assert json.loads((tmp_path / "k1.json").read_text())["sparsity_level"] == 0.5


def test_checkpoint_is_loaded(tiny_pipeline_dir, tmp_path):
    from diffusers import WanTransformer3DModel

    from sparge.checkpoint import save_transformer_weights

    model = WanTransformer3DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")
    with torch.no_grad():
        model.proj_out.bias.add_(3.0)  # a visible change of the predicted velocity
    ckpt = save_transformer_weights(tmp_path / "student.safetensors", model, metadata={"base_model": "tiny", "steps": 5})
    base = ["--prompt", "a dog", "--model", str(tiny_pipeline_dir), "--dense", *TINY]
    r1 = run(*base, "--out", str(tmp_path / "plain.mp4"))
    r2 = run(*base, "--checkpoint", str(ckpt), "--out", str(tmp_path / "student.mp4"))
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    side = json.loads((tmp_path / "student.json").read_text())
    assert side["checkpoint"] == str(ckpt) and side["checkpoint_metadata"]["steps"] == 5
    diff = np.abs(_video(tmp_path / "plain.mp4").astype(float) - _video(tmp_path / "student.mp4").astype(float)).mean()
    assert diff > 1.0

    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    msg = one_error_line(run(*base, "--checkpoint", str(tmp_path / "junk.safetensors"), "--out", str(tmp_path / "j.mp4")))
    assert "not a safetensors file" in msg


def test_topk_topp_override_runs_a_model_without_preset(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o.mp4"
    r = run("--prompt", "a bird", "--model", str(tiny_pipeline_dir), "--topk", "0.25", "--topp", "0.0",
            "--steps", "2", "--guidance-scale", "1.0", *TINY[:6], *TINY[8:], *FAST, "--out", str(out))
    assert r.exit_code == 0, r.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["preset"] is None and side["topk"] == 0.25 and side["topp"] == 0.0 and side["steps"] == 2
    assert len(side["timings"]["ms_per_step_all"]) == 2 and side["measured_sparsity"] > 0.5


# -- usage errors: one line, exit code 2 ---------------------------------------------------------------


def test_error_model_path_missing(tmp_path):
    msg = one_error_line(run("--prompt", "x", "--model", str(tmp_path / "nowhere"), "--dense", *TINY, "--out", str(tmp_path / "a.mp4")))
    assert "does not exist" in msg and "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in msg


def test_error_model_not_a_wan_checkpoint(tmp_path):
    d = tmp_path / "flux"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    msg = one_error_line(run("--prompt", "x", "--model", str(d), "--dense", *TINY, "--out", str(tmp_path / "a.mp4")))
    assert "FluxPipeline" in msg and "huggingface-cli download" in msg
    msg = one_error_line(run("--prompt", "x", "--model", str(tmp_path), "--dense", *TINY, "--out", str(tmp_path / "a.mp4")))
    assert "no model_index.json" in msg


def test_error_sparsity_without_level(preset_file, tmp_path):
    msg = one_error_line(run("--prompt", "x", "--preset", str(preset_file), "--sparsity", "0.9", *TINY, "--out", str(tmp_path / "a.mp4")))
    assert "no level for sparsity 0.9" in msg and "0.01, 0.5" in msg and "sparge calibrate" in msg and "--target 0.9" in msg


def test_error_no_preset_for_model(tiny_pipeline_dir, tmp_path):
    msg = one_error_line(run("--prompt", "x", "--model", str(tiny_pipeline_dir), *TINY, "--out", str(tmp_path / "a.mp4")))
    assert "no shipped preset" in msg and "--topk/--topp" in msg and "wan2.1-t2v-1.3b-480p" in msg


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--height", "130"], "--height 130 is not allowed: use a positive multiple of 16"),
        (["--width", "100"], "--width 100 is not allowed"),
        (["--frames", "10"], "--frames 10 is not allowed: use 4n+1"),
        (["--sparsity", "1.5"], "--sparsity 1.5 is out of range"),
        (["--topk", "0.1"], "--topk and --topp go together"),
        (["--dense", "--sparsity", "0.5"], "--dense runs the dense baseline"),
        (["--steps", "0"], "--steps 0 is out of range"),
        (["--dtype", "int8"], "--dtype 'int8' is not known"),
        (["--device", "tpu9"], "--device 'tpu9' is not a device"),
        (["--backend", "cudnn"], "--backend 'cudnn' is not known"),
    ],
)
def test_error_bad_options(preset_file, tmp_path, args, needle):
    base = ["--prompt", "x", "--preset", str(preset_file), "--device", "cpu", "--out", str(tmp_path / "a.mp4")]
    msg = one_error_line(run(*base, *args))
    assert needle in msg


def test_error_output_path(preset_file, tmp_path):
    base = ["--prompt", "x", "--preset", str(preset_file), *TINY]
    msg = one_error_line(run(*base, "--out", str(tmp_path / "missing-dir" / "a.mp4")))
    assert "does not exist" in msg and "missing-dir" in msg
    msg = one_error_line(run(*base, "--out", str(tmp_path / "a.gif")))
    assert "must end in .mp4" in msg
    (tmp_path / "d.mp4").mkdir()
    msg = one_error_line(run(*base, "--out", str(tmp_path / "d.mp4"), "--overwrite"))
    assert "is a directory" in msg
    (tmp_path / "b.json").write_text("{}")
    msg = one_error_line(run(*base, "--out", str(tmp_path / "b.mp4")))
    assert "sidecar" in msg and "already exists" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_error_no_cuda(preset_file, tmp_path):
    base = ["--prompt", "x", "--preset", str(preset_file), "--out", str(tmp_path / "a.mp4")]
    msg = one_error_line(run(*base))
    assert "no CUDA GPU" in msg and "--device cpu" in msg
    msg = one_error_line(run(*base, "--device", "cuda"))
    assert "needs a CUDA GPU" in msg and "--device cpu" in msg
    msg = one_error_line(run(*base, "--device", "cpu", "--cpu-offload"))
    assert "CUDA" in msg


def test_help_has_examples():
    r = CliRunner().invoke(APP, ["generate", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "Examples" in text and "--sparsity" in text and "--checkpoint" in text and "huggingface-cli download" in text
