"""From a trained tiny workdir to decisions: calibration after training, predict's rows, and the exported
model served in a fresh process giving the in-framework results."""

import csv
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
from helpers import REPO, load_config, main_command, run_main, subprocess_env
from jax.sharding import Mesh

from unimmad_jax import calibrate, evaluate, export, packing, predict, serving, sharding, weights
from unimmad_jax.config import model_config
from unimmad_jax.data import InvalidDataError
from unimmad_jax.data.prepared import open_split
from unimmad_jax.models.unimmad import UniMMAD

SCAN = "brain_scan"  # the tiny config's gray class: servable (tiles has a depth modality)
IMAGES = 9  # 128x128 test images of SCAN, one of them 100x90: batches of 7 and 2, or 9 of 1
TOLERANCE = 1e-5
LAST_STEP = 3 * 12  # of the trained tiny workdir: 3 epochs of 12 steps


def run(*command) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)


def run_ok(*command) -> str:
    result = run(*command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    """The tiny config's 3 epochs, calibrated at the end of training."""
    return trained_workdir


@pytest.fixture(scope="module")
def images(tmp_path_factory, synthetic_data_dir):
    folder = tmp_path_factory.mktemp("images")
    split = open_split(synthetic_data_dir, "synthetic", "test")
    picked = [i for i, name in enumerate(split.index.class_names) if name == SCAN][:IMAGES]
    for n, i in enumerate(picked):
        image = PIL.Image.fromarray(np.asarray(split.records[i]["images"][0])[..., 0])
        (image.resize((100, 90)) if n == 4 else image).save(folder / f"scan_{n}.png")
    return folder


@pytest.fixture(scope="module")
def model_dir(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    run_ok("-m", "unimmad_jax.export", "--workdir", str(workdir), "--out", str(out))
    return out


def test_training_writes_a_calibration_whose_good_only_thresholds_leave_good_images_unflagged(workdir):
    record = json.loads((workdir / calibrate.CALIBRATION_FILE).read_text())
    entry = record["datasets"]["synthetic"]
    assert record["checkpoint_step"] == LAST_STEP and entry["split"] == "train"  # synthetic has no validation split
    for stats in [entry["dataset"], *entry["classes"].values()]:
        assert stats["method"] == "good_q0.99" and stats["anomalous"] == 0
        assert stats["minimum"] < stats["threshold"] <= stats["maximum"]  # the lowest good image is never flagged
    assert entry["classes"]["tiles"]["threshold"] != entry["classes"][SCAN]["threshold"]
    test = record["test"]["datasets"]["synthetic"][SCAN]
    assert set(calibrate.DECISION_METRICS) | {"i_auroc", "p_auroc"} <= set(test)


def test_predict_uses_each_class_threshold(workdir, trained_predictions):
    out = trained_predictions
    assert (out / "scores.csv").read_text().splitlines()[0] == ",".join(serving.COLUMNS)
    rows = read_csv(out / "scores.csv")
    assert [{k: str(v) for k, v in row.items()} for row in json.loads((out / "scores.json").read_text())] == rows
    classes = json.loads((workdir / calibrate.CALIBRATION_FILE).read_text())["datasets"]["synthetic"]["classes"]
    assert {row["class"] for row in rows} == {"tiles", SCAN}
    for row in rows:
        threshold = float(row["threshold"])
        assert threshold == classes[row["class"]]["threshold"]
        assert int(row["decision"]) == (np.float32(row["image_score"]) >= np.float32(threshold))
        assert (float(row["normalized_score"]) >= 0.5) == bool(int(row["decision"]))


def in_framework(workdir, synthetic_data_dir, folder, batch_size: int) -> dict[str, np.ndarray]:
    """Predict's batches and compiled step, on one device, with the class's normalisation."""
    config = load_config("tiny")
    config.data.data_dir = str(synthetic_data_dir)
    mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
    variables = weights.evaluated_variables(config, workdir, mesh)
    score_fn = evaluate.make_score_fn(UniMMAD(model_config(config)), mesh)
    stats = scan_statistics(workdir)
    batches = predict.folder_batches(folder, "gray", config.image_size, config.data.num_slots, batch_size, groups=1)
    maps, scores = [], []
    for batch in batches:
        pairs = packing.batch_pairs(batch)
        out = sharding.gather(score_fn(variables, batch["specific_images"], batch["modality_mask"], pairs))
        maps.append(out["anomaly_map"][batch["valid"]])
        scores.append(out["image_score"][batch["valid"]])
    maps, scores = np.concatenate(maps), np.concatenate(scores)
    args = (stats.threshold, stats.minimum, stats.maximum)
    return {
        "anomaly_map": maps,
        "image_score": scores,
        "normalized_map": np.asarray(calibrate.normalize(maps, *args)),
        "slope": in_framework_slope(workdir),
    }


def scan_statistics(workdir) -> calibrate.Statistics:
    return calibrate.statistics_for(calibrate.load(workdir, LAST_STEP), "synthetic", SCAN)[0]


def in_framework_slope(workdir) -> float:
    """The steepest slope of SCAN's normalisation: how much it magnifies a score difference."""
    stats = scan_statistics(workdir)
    return 0.5 / min(stats.threshold - stats.minimum, stats.maximum - stats.threshold)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_exported_model_serves_the_in_framework_results(
    batch_size, workdir, synthetic_data_dir, images, model_dir, tmp_path
):
    """Served in a fresh process: raw scores and maps within 1e-5 of predict's batches and step, normalised
    maps within 1e-5 times the normalisation's slope (it magnifies float32 rounding), decisions equal."""
    out = tmp_path / "served"
    served_out = run_ok(
        "-m", "unimmad_jax.serving", "--model", str(model_dir), "--out", str(out), "--class", SCAN,
        "--batch-size", str(batch_size), "--maps", str(images),
    )  # fmt: skip
    assert "resized 1 image(s) of 100x90 to 64x64" in served_out
    served, maps = read_csv(out / "scores.csv"), np.load(out / "maps.npz")
    expected = in_framework(workdir, synthetic_data_dir, images, batch_size)
    np.testing.assert_allclose(maps["anomaly_map"], expected["anomaly_map"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(
        maps["normalized_map"], expected["normalized_map"], rtol=0, atol=TOLERANCE * expected["slope"]
    )
    np.testing.assert_allclose(
        [float(r["image_score"]) for r in served], expected["image_score"], rtol=0, atol=TOLERANCE
    )
    decisions = expected["image_score"] >= np.float32(float(served[0]["threshold"]))
    assert [int(r["decision"]) for r in served] == decisions.astype(int).tolist()


def test_served_rows_are_predict_rows(workdir, synthetic_data_dir, images, model_dir, tmp_path):
    """The command lines side by side: serving's scores.csv and predict's on the same folder, batch 7."""
    out = tmp_path / "served"
    run_ok("-m", "unimmad_jax.serving", "--model", str(model_dir), "--out", str(out), "--class", SCAN, str(images))
    served = read_csv(out / "scores.csv")
    fields = {"predict.input": images, "predict.class_name": SCAN, "predict.batch_size": 7}
    run_main(workdir, synthetic_data_dir, "--mode=predict", **fields)
    predicted = read_csv(workdir / "predictions" / images.name / "scores.csv")
    slope = in_framework_slope(workdir)
    assert len(served) == len(predicted) == IMAGES
    for a, b in zip(served, predicted):
        assert (a["path"], a["class"], a["label"], a["decision"]) == (b["path"], b["class"], b["label"], b["decision"])
        assert float(a["threshold"]) == float(b["threshold"])
        assert float(a["image_score"]) == pytest.approx(float(b["image_score"]), abs=TOLERANCE)
        assert float(a["normalized_score"]) == pytest.approx(float(b["normalized_score"]), abs=TOLERANCE * slope)


def test_predict_lists_unreadable_images_and_scores_the_others(workdir, synthetic_data_dir, images, tmp_path):
    """A truncated image among a folder's: the others scored, it listed in errors.csv, exit status 3; a folder
    of unreadable images alone: errors.csv and exit status 2."""
    folder = tmp_path / "with_truncated"
    shutil.copytree(images, folder)
    truncated = folder / "scan_4_truncated.png"
    truncated.write_bytes((images / "scan_4.png").read_bytes()[:200])  # an upload cut short
    fields = {"predict.input": folder, "predict.class_name": SCAN, "predict.batch_size": 4}
    result = subprocess.run(
        main_command(workdir, synthetic_data_dir, "--mode=predict", **fields),
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    out = workdir / "predictions" / folder.name
    scored = sorted(row["path"] for row in read_csv(out / "scores.csv"))
    assert scored == sorted(str(folder / p.name) for p in images.iterdir())
    errors = read_csv(out / "errors.csv")
    assert [row["path"] for row in errors] == [str(truncated)]
    assert "Corrupt or unreadable image" in errors[0]["error"]
    assert "1 images could not be read" in result.stdout

    config = load_config("tiny")
    config.data.data_dir = str(synthetic_data_dir)
    config.predict.input = str(tmp_path / "unreadable")
    (tmp_path / "unreadable").mkdir()
    shutil.copy(truncated, tmp_path / "unreadable")
    step, variables = weights.evaluated_checkpoint(config, workdir, sharding.data_mesh())
    with pytest.raises(InvalidDataError, match="none of the 1 images of config.predict.input="):
        predict.predict(UniMMAD(model_config(config)), variables, config, workdir, step)
    assert len(read_csv(workdir / "predictions" / "unreadable" / "errors.csv")) == 1


def test_serving_takes_the_class_statistics_or_the_dataset_level_ones(model_dir, images, tmp_path, capsys):
    metadata = json.loads((model_dir / export.METADATA_FILE).read_text())
    thresholds = {(row["dataset"], row["class"]): row["threshold"] for row in metadata["statistics"]}
    assert metadata["image_size"] == 64 and metadata["slots"] == 2 and metadata["versions"]["jax"] == jax.__version__
    for class_name, key in ((SCAN, ("synthetic", SCAN)), ("", ("synthetic", ""))):
        args = ["--model", str(model_dir), "--out", str(tmp_path / class_name), str(images / "scan_0.png")]
        assert serving.main(args + (["--class", class_name] if class_name else [])) == 0
        row = read_csv(tmp_path / class_name / "scores.csv")[0]
        assert float(row["threshold"]) == pytest.approx(thresholds[key]) and row["class"] == class_name
    assert "images of unknown class: the dataset-level calibration of synthetic" in capsys.readouterr().out


def test_serving_imports_neither_the_data_pipeline_nor_flax():
    code = "import sys, unimmad_jax.serving; print(sorted({m.partition('.')[0] for m in sys.modules}))"
    loaded = json.loads(run_ok("-c", code).replace("'", '"'))
    assert "jax" in loaded and not {"tensorflow_datasets", "grain", "flax"} & set(loaded)


def test_serving_names_what_is_wrong(model_dir, images, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cases = {
        "Missing image file": ["--class", SCAN, str(tmp_path / "absent.png")],
        "Corrupt or unreadable image": ["--class", SCAN, str(broken)],
        f"sample {images / 'scan_0.png'}+{images / 'scan_1.png'} has 2 modalities; class {SCAN} takes 1": [
            "--class", SCAN, f"{images / 'scan_0.png'}+{images / 'scan_1.png'}"
        ],
        "class tiles takes modalities rgb+depth": ["--class", "tiles", str(images)],
        "is not a class of this model": ["--class", "teapot", str(images)],
    }  # fmt: skip
    for message, args in cases.items():
        assert serving.main(["--model", str(model_dir), "--out", str(tmp_path / "out"), *args]) == 2
        assert message in capsys.readouterr().err
    old = tmp_path / "old_model"
    old.mkdir()
    (old / export.MODEL_FILE).write_bytes((model_dir / export.MODEL_FILE).read_bytes())
    metadata = json.loads((model_dir / export.METADATA_FILE).read_text())
    (old / export.METADATA_FILE).write_text(json.dumps({**metadata, "format_version": 0}))
    assert serving.main(["--model", str(old), "--out", str(tmp_path / "out"), str(images)]) == 2
    assert f"{old / export.METADATA_FILE} has format_version 0" in capsys.readouterr().err
    (old / export.METADATA_FILE).write_text(json.dumps(metadata))
    (old / export.MODEL_FILE).write_bytes(b"\x00" * 64)
    assert serving.main(["--model", str(old), "--out", str(tmp_path / "out"), str(images)]) == 2
    assert f"{old / export.MODEL_FILE} cannot be read" in capsys.readouterr().err
