"""model.json as a typed, versioned ModelFile: older files load, bad fields are named,
unknown keys survive a rewrite."""
from __future__ import annotations

import json

import pytest

from conftest import CLASSES
from test_predict import make_model

from bloodcell.calibrate import store_calibration
from bloodcell.modelfile import SCHEMA_VERSION, ModelFile, bundled_file
from bloodcell.models import load_model

MINIMAL = {"architecture": "cnn3", "classes": CLASSES, "image_size": 64}


def test_the_bundled_model_file_loads_as_written_before_schema_versions():
    raw = json.loads(bundled_file("model.json").read_text())
    mf = ModelFile.load(bundled_file("model.json"))
    assert mf.classes == raw["classes"] and mf.image_size == raw["image_size"]
    assert mf.temperature == raw["temperature"] and mf.review_threshold == raw["review_threshold"]
    assert mf.input_check == raw["input_check"] and mf.metrics["accuracy"] == raw["metrics"]["accuracy"]
    assert mf.train_args["seed"] == raw["train_args"]["seed"] and mf.extra == {}


def test_an_old_file_round_trips_with_nothing_lost_or_invented(tmp_path):
    old = json.loads(bundled_file("model.json").read_text())
    assert "schema_version" not in old  # written before this schema existed
    back = json.loads(ModelFile.from_dict(old).save(tmp_path / "model.json").read_text())
    assert back == {**old, "schema_version": SCHEMA_VERSION}


def test_unknown_keys_are_kept(tmp_path):
    mf = ModelFile.from_dict({**MINIMAL, "from_a_newer_tool": {"x": 1}})
    assert mf.extra == {"from_a_newer_tool": {"x": 1}}
    mf.temperature = 2.0
    saved = json.loads(mf.save(tmp_path / "m.json").read_text())
    assert saved["from_a_newer_tool"] == {"x": 1} and saved["temperature"] == 2.0


def test_defaults_for_a_minimal_file():
    mf = ModelFile.from_dict(MINIMAL)
    assert mf.temperature == 1.0 and mf.review_threshold is None and mf.input_check is None
    assert mf.train_args == {} and mf.preprocess == {} and not mf.finished
    d = mf.to_dict()
    assert "review_threshold" not in d and "metrics" not in d  # absent stays absent


@pytest.mark.parametrize("key", ["architecture", "classes", "image_size"])
def test_a_missing_field_is_named(key):
    with pytest.raises(ValueError, match=rf"m\.json: not a bloodcell model description \(missing '{key}'\)"):
        ModelFile.from_dict({k: v for k, v in MINIMAL.items() if k != key}, "m.json")


@pytest.mark.parametrize("key,value,want", [
    ("image_size", "64", "a positive whole number"),
    ("image_size", 0, "a positive whole number"),
    ("image_size", True, "a positive whole number"),
    ("classes", "basophil", "a non-empty list of class names"),
    ("classes", [], "a non-empty list of class names"),
    ("temperature", -1, "a positive number"),
    ("temperature", "1.0", "a positive number"),
    ("review_threshold", 1.5, "a number from 0 to 1"),
    ("train_args", [], "a JSON object"),
    ("input_check", "yes", "a JSON object"),
    ("history", {}, "a JSON array"),
    ("finished", "yes", "true or false"),
])
def test_a_wrong_field_is_named(key, value, want):
    with pytest.raises(ValueError, match=rf"m\.json: field '{key}' must be {want}, not"):
        ModelFile.from_dict({**MINIMAL, key: value}, "m.json")


def test_a_newer_schema_is_refused():
    with pytest.raises(ValueError, match="schema version 99; this bloodcell reads up to"):
        ModelFile.from_dict({**MINIMAL, "schema_version": 99}, "m.json")


def test_save_refuses_a_bad_value_set_in_code(tmp_path):
    mf = ModelFile.from_dict(MINIMAL)
    mf.review_threshold = 3.0
    with pytest.raises(ValueError, match="field 'review_threshold' must be a number from 0 to 1"):
        mf.save(tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


def test_load_takes_a_run_folder_and_names_bad_json(tmp_path):
    d = make_model(tmp_path / "run")
    model, meta = load_model(d)
    assert isinstance(meta, ModelFile) and meta.architecture == "cnn3"
    assert ModelFile.load(d) == meta
    assert json.loads((d / "model.json").read_text())["schema_version"] == SCHEMA_VERSION
    (d / "model.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="model.json: not a bloodcell model description"):
        ModelFile.load(d)
    (d / "model.json").write_text("{oops")
    with pytest.raises(ValueError, match="model.json: not valid JSON"):
        ModelFile.load(d / "model.safetensors")


def test_calibration_keeps_what_it_does_not_set(tmp_path):
    d = make_model(tmp_path / "run")
    raw = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**raw, "site_note": "lab 3"}))
    store_calibration(d, 1.7, 0.8, input_check={"n_images": 3})
    after = json.loads((d / "model.json").read_text())
    assert after["site_note"] == "lab 3" and after["temperature"] == 1.7
    assert after["review_threshold"] == 0.8 and after["input_check"] == {"n_images": 3}
    assert ModelFile.load(d).temperature == 1.7
