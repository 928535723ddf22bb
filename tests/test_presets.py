"""sparge.presets: shipped files, schema validation, lookup, levels, write_level."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sparge import SpargeConfig
from sparge.presets import Level, PresetError, find_preset, list_presets, load_preset, presets_dir, write_level

PAPER = "SpargeAttention2 paper (arXiv 2602.13515), not re-measured"


def test_shipped_presets_have_the_paper_levels():
    assert {"wan2.1-t2v-1.3b-480p", "wan2.1-t2v-14b-720p"} <= set(list_presets())
    assert "wan2.1-t2v-14b-480p" not in list_presets()  # nobody measured it
    small = load_preset("wan2.1-t2v-1.3b-480p")
    assert (small.model, small.width, small.height, small.frames) == ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 832, 480, 81)
    assert small.level(0.95) == Level(topk=0.03, topp=0.2, measured_sparsity=None, source=PAPER)
    big = load_preset("wan2.1-t2v-14b-720p")
    assert (big.model, big.width, big.height, big.frames) == ("Wan-AI/Wan2.1-T2V-14B-Diffusers", 1280, 720, 81)
    assert (big.level(0.95).topk, big.level(0.95).topp, big.level(0.95).source) == (0.03, 0.16, PAPER)
    assert big.to_config(0.95) == SpargeConfig(topk=0.03, topp=0.16, block_q=128, block_k=64, dense_steps=0)
    assert small.default_sparsity() == 0.95 and small.layers() is None


def test_find_preset_by_hub_id_local_dir_and_resolution():
    assert find_preset("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").name == "wan2.1-t2v-1.3b-480p"
    assert find_preset("/models/Wan2.1-T2V-14B-Diffusers/", 720, 1280).name == "wan2.1-t2v-14b-720p"
    assert find_preset("Wan-AI/Wan2.1-T2V-14B-Diffusers", 480, 832) is None
    assert find_preset("some/other-model") is None


def test_missing_level_lists_levels_and_suggests_calibrate():
    with pytest.raises(ValueError, match=r"no level for sparsity 0.9 \(available: 0.95\).*sparge calibrate .*--target 0.9"):
        load_preset("wan2.1-t2v-1.3b-480p").level(0.9)


def test_load_by_path_and_unknown_name(tmp_path):
    src = presets_dir() / "wan2.1-t2v-1.3b-480p.yaml"
    p = tmp_path / "mine.yaml"
    p.write_text(src.read_text())
    assert load_preset(p).name == "mine"
    assert load_preset(str(p)).level(0.95).topk == 0.03
    with pytest.raises(FileNotFoundError, match="wan2.1-t2v-1.3b-480p"):
        load_preset("no-such-preset")


def _base() -> dict:
    return {
        "model": "/models/tiny", "height": 128, "width": 160, "frames": 9,
        "levels": {0.5: {"topk": 0.3, "topp": 0.3, "measured_sparsity": 0.51, "source": "test"}},
    }


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(colour="red"), r"colour is not a known key: allowed model, height"),
        (lambda d: d.update(height=130), r"height = 130 is not allowed: use a multiple of 16"),
        (lambda d: d.update(frames=10), r"frames = 10 is not allowed: use 4n\+1"),
        (lambda d: d.update(block_q=100), r"block_q = 100 is not allowed: use a power of two >= 16"),
        (lambda d: d.update(dense_steps=-1), r"dense_steps = -1 is out of range: use an integer >= 0"),
        (lambda d: d.update(sparse_layers="some"), r"sparse_layers = 'some' is not allowed"),
        (lambda d: d.pop("model"), r"model is missing"),
        (lambda d: d["levels"].update({1.5: {"topk": 0.1, "topp": 0.1, "source": "x"}}), r"levels key 1.5 = 1.5 is out of range: use a number in \(0, 1\)"),
        (lambda d: d["levels"][0.5].update(topk=1.2), r"levels.0.5.topk = 1.2 is out of range: use a number in \[0, 1\]"),
        (lambda d: d["levels"][0.5].update(topk=0, topp=0), r"levels.0.5.topk/topp are both 0"),
        (lambda d: d["levels"][0.5].update(measured_sparsity=2), r"measured_sparsity = 2 is out of range"),
        (lambda d: d["levels"][0.5].update(bogus=1), r"levels.0.5.bogus is not a known key: allowed topk, topp"),
        (lambda d: d["levels"][0.5].pop("source"), r"neither source nor calibrated_on"),
        (lambda d: d["levels"][0.5].pop("topp"), r"levels.0.5.topp is missing"),
        (lambda d: d["levels"][0.5].update(per_layer={3: [0.1]}), r"per_layer.3 = \[0.1\] must be a \[topk, topp\] pair"),
    ],
)
def test_schema_errors_name_file_key_and_range(tmp_path, edit, message):
    d = _base()
    edit(d)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(PresetError, match=message) as e:
        load_preset(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_invalid_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(PresetError, match="is not valid YAML"):
        load_preset(p)


def test_per_layer_and_layers_reach_the_config(tmp_path):
    d = _base()
    d["sparse_layers"] = [0, 2]
    d["dense_steps"] = 2
    d["levels"][0.5]["per_layer"] = {2: [0.5, 0.0]}
    p = tmp_path / "pl.yaml"
    p.write_text(yaml.safe_dump(d))
    pr = load_preset(p)
    cfg = pr.to_config(0.5, backend="torch")
    assert cfg.knobs_for(2) == (0.5, 0.0) and cfg.knobs_for(0) == (0.3, 0.3)
    assert cfg.dense_steps == 2 and cfg.backend == "torch" and pr.layers() == [0, 2]


def test_write_level_keeps_other_levels_keys_and_header(tmp_path):
    p = tmp_path / "wan2.1-t2v-1.3b-480p.yaml"
    p.write_text((presets_dir() / "wan2.1-t2v-1.3b-480p.yaml").read_text())
    header = [line for line in p.read_text().splitlines() if line.startswith("#")]
    new = write_level(p, 0.9, Level(topk=0.05, topp=0.3, measured_sparsity=0.903, calibrated_on={"prompts": 4, "steps": 10}))
    assert new.level(0.9).measured_sparsity == 0.903
    again = load_preset(p)
    assert again.level(0.95).source == PAPER and again.level(0.9).calibrated_on == {"prompts": 4, "steps": 10}
    assert (again.model, again.height, again.width, again.frames) == ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 480, 832, 81)
    assert [line for line in p.read_text().splitlines() if line.startswith("#")] == header
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]

    write_level(p, 0.9, {"topk": 0.06, "topp": 0.3, "measured_sparsity": 0.9, "calibrated_on": "run 2"})
    assert load_preset(p).level(0.9).topk == 0.06
    with pytest.raises(PresetError, match="level 0.9 already exists"):
        write_level(p, 0.9, {"topk": 0.07, "topp": 0.3, "source": "x"}, overwrite_level=False)
    before = p.read_text()
    with pytest.raises(PresetError, match=r"topk = 3 is out of range"):
        write_level(p, 0.8, {"topk": 3, "topp": 0.3, "source": "x"})
    assert p.read_text() == before  # a refused write leaves the file alone


def test_shipped_files_are_the_package_data():
    # pyproject maps the repository's presets/ to the sparge._presets package; every file there must load
    files = sorted(Path(presets_dir()).glob("*.yaml"))
    assert files and all(load_preset(f).levels for f in files)
