"""Training end to end on the tiny config: the command line, kill-and-resume, and 1 vs 8 devices."""

import functools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import kill_when, load_config, main_command, run_main
from jax.sharding import Mesh

from unimmad_jax import packing, sharding, train, weights
from unimmad_jax.config import loss_config, model_config
from unimmad_jax.data import first_training_images, train_loader
from unimmad_jax.models.unimmad import UniMMAD

EPOCHS = 3  # of configs/tiny.py, on its classes tiles and brain_scan
CLASSES = ("tiles", "brain_scan")  # 96 training images: 12 steps of 8 per epoch
BF16_LEARNING_RATE = 3e-3  # the tiny config's 1e-3 tripled: a model well above chance in its 3 epochs


def tiny_config(data_dir):
    config = load_config("tiny")
    config.data.data_dir = str(data_dir)
    assert tuple(config.data.classes.synthetic) == CLASSES and config.train.num_epochs == EPOCHS
    return config


def final_params(workdir, data_dir):
    return weights.evaluated_variables(tiny_config(data_dir), workdir, mesh_of(1))["params"]


def test_train_eval_predict_write_their_files(trained_workdir, synthetic_data_dir):
    steps_per_epoch = 96 // 8
    assert sorted(int(p.name) for p in (trained_workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        steps_per_epoch * e for e in range(1, EPOCHS + 1)
    ]
    summary = json.loads((trained_workdir / "eval" / f"epoch_{EPOCHS:04d}.json").read_text())
    assert set(summary["datasets"]["synthetic"]["classes"]) == set(CLASSES)
    assert "| synthetic | tiles |" in (trained_workdir / "eval" / f"epoch_{EPOCHS:04d}.md").read_text()
    assert list((trained_workdir / "tensorboard").glob("events.out.tfevents.*"))
    losses = [
        line["train/loss"]
        for line in map(json.loads, (trained_workdir / "metrics.jsonl").open())
        if "train/loss" in line
    ]
    assert len(losses) >= EPOCHS and losses[-1] < 0.8 * losses[0]

    out = run_main(trained_workdir, synthetic_data_dir, "--mode=eval", **{"eval.modality_subsets": '("gray",)'})
    assert "All_Datasets_Mean" in out
    final = json.loads((trained_workdir / "eval" / "final.json").read_text())
    assert final["All_Class_Mean"] == summary["All_Class_Mean"]  # the same weights give the same metrics
    subsets = json.loads((trained_workdir / "eval" / "modality_subsets.json").read_text())["datasets"]["synthetic"]
    assert set(subsets["classes"]) == {"tiles", "brain_scan"} and subsets["classes"]["tiles"] == {"gray": None}
    # brain_scan is gray only, so its subset is the full evaluation, but with its own pair budget: another
    # compiled program, whose float32 sums round differently (measured: 3e-9 of P-AP).
    expected = final["datasets"]["synthetic"]["classes"]["brain_scan"]
    assert subsets["classes"]["brain_scan"]["gray"] == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert final["paper"] == {} and "paper" not in summary  # the paper reports no synthetic results

    predictions = trained_workdir / "predictions" / "synthetic_test"
    shutil.rmtree(predictions, ignore_errors=True)  # the session's workdir: test_export predicts there too
    run_main(
        trained_workdir,
        synthetic_data_dir,
        "--mode=predict",
        **{"predict.input": "synthetic:test", "predict.max_overlays": 5},
    )
    rows = (predictions / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,class,label,image_score,normalized_score,decision,threshold" and len(rows) == 1 + 48
    assert len(list((predictions / "overlays").glob("*.png"))) == 5


def test_a_run_reports_its_start_profiles_its_steps_and_caches_its_compiles(synthetic_data_dir, tmp_path):
    """One epoch through the command line, with `train.profile_steps` and `compilation_cache_dir`."""
    workdir, cache = tmp_path / "run", tmp_path / "compilation_cache"
    fields = {"train.num_epochs": 1, "train.profile_steps": "(1,3)", "compilation_cache_dir": cache}
    out = run_main(workdir, synthetic_data_dir, **fields)
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["profile_steps"] == [1, 3] and config["data"]["data_dir"] == str(synthetic_data_dir)
    assert "devices: 1 cpu, processes: 1, mesh: {'data': 1}, batch: 8 (8 per device)" in out
    assert re.search(r"parameters: [\d,]+ trained, [\d,]+ frozen \(prior\)", out)
    assert re.search(r"train step: compiled in [\d.]+ s, [\d.]+ GFLOP per image", out)
    assert len(list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))) == 1
    assert len(list(cache.iterdir())) > 1
    lines = list(map(json.loads, (workdir / "metrics.jsonl").open()))
    fractions = [line["train/input_wait_fraction"] for line in lines if "train/input_wait_fraction" in line]
    assert len(fractions) == 96 // 8 // 5 + 1 and all(0 <= f < 1 for f in fractions)


def test_killed_run_resumes_to_the_same_parameters(trained_workdir, synthetic_data_dir, tmp_path):
    workdir = tmp_path / "killed"
    first = workdir / "checkpoints" / str(96 // 8)
    kill_when(main_command(workdir, synthetic_data_dir), first)
    assert not (workdir / "checkpoints" / str(EPOCHS * 96 // 8)).exists()

    out = run_main(workdir, synthetic_data_dir)
    assert "Resumed from step" in out
    expected, resumed = final_params(trained_workdir, synthetic_data_dir), final_params(workdir, synthetic_data_dir)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def mesh_of(devices: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[:devices]), (sharding.DATA_AXIS,))


def test_eight_devices_step_like_one(synthetic_data_dir):
    """Sharded steps on 8 devices, with the state split over them (`train.fsdp`), compute what 1 device
    computes on the same global batches (a replicated state on several devices: `test_multihost`).

    Compared in float64, losses to 1e-10 and parameters to 1e-8 (relative; 1e-8 absolute for the biases
    that sit before a norm and stay near zero); the largest loss difference seen was 6e-12.  In float32
    the tiny model's train-mode BatchNorm over 8 samples and Adam on parameters whose true gradient is
    zero amplify rounding differences to ~1 % after a few steps, on one device as much as on eight (a
    reordered batch does the same), so float32 shows noise.
    """
    assert len(jax.devices()) == 8
    config = tiny_config(synthetic_data_dir)
    # float32 variables, as every run of the tiny config starts from (the compiled initialisation is shared)
    images = first_training_images(config.data, seed=0, batch_size=8)
    variables = weights.random_variables(UniMMAD(model_config(config)), config, images)
    config.model.dtype = "float64"
    model = UniMMAD(model_config(config))
    loader = train_loader(config.data, seed=0, batch_size=8, groups=8)  # packed for eight devices
    batches = [next(loader.iterator) for _ in range(3)]
    to64 = functools.partial(
        jax.tree_util.tree_map, lambda a: a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a
    )
    results = {}
    with jax.enable_x64(True):
        for devices, fsdp in ((1, False), (8, True)):
            mesh = mesh_of(devices)
            config.train.fsdp = fsdp
            state = train.create_train_state(model, config, loader.steps_per_epoch, variables)
            params = to64(state.params)
            state = state.replace(params=params, batch_stats=to64(state.batch_stats), opt_state=state.tx.init(params))
            state_sharding = sharding.state_sharding(state, mesh, fsdp)
            state = jax.device_put(state, state_sharding)
            step = train.make_train_step(model, loss_config(config), mesh, state_sharding)
            losses = []
            for batch in batches:
                if devices == 1:  # the same samples' pairs as one group
                    batch = {**batch, **packing.pack_pairs(batch["modality_mask"], 1, batch["modality_mask"].size)}
                state, metrics = step(state, sharding.to_global(to64(batch), mesh), jnp.int32(0))
                losses.append(float(metrics["loss"]))
            results[devices] = losses, jax.device_get(state.params)
    # The step keeps the state split: a device holds an eighth of each array of 16 KiB or more.
    leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
    leaves = [a for a in leaves if a.nbytes >= sharding.FSDP_MIN_BYTES]
    assert all(a.addressable_shards[0].data.nbytes * 8 == a.nbytes for a in leaves) and len(leaves) > 20
    np.testing.assert_allclose(results[8][0], results[1][0], rtol=1e-10)
    for a, b in zip(jax.tree_util.tree_leaves(results[8][1]), jax.tree_util.tree_leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-8)


def test_bfloat16_compute_keeps_the_pixel_metrics(synthetic_data_dir, tmp_path):
    """Float32 weights evaluated with bf16 compute: pixel AP and AUROC within 0.005.

    On a model clearly better than chance (pixel AUROC above 0.9: the tiny config at a higher learning
    rate); near chance, bf16 rounding reorders the many close pixel scores and the bound would be noise.
    """
    workdir, higher_rate = tmp_path / "bf16", {"optimizer.learning_rate": BF16_LEARNING_RATE}
    run_main(workdir, synthetic_data_dir, **higher_rate)
    float32 = json.loads((workdir / "eval" / f"epoch_{EPOCHS:04d}.json").read_text())["All_Class_Mean"]
    assert float32["p_auroc"] > 0.9, float32
    run_main(workdir, synthetic_data_dir, "--mode=eval", **higher_rate, **{"model.dtype": "bfloat16"})
    bfloat16 = json.loads((workdir / "eval" / "final.json").read_text())["All_Class_Mean"]
    assert set(bfloat16) == set(float32) and bfloat16 != float32
    for metric in ("p_auroc", "p_ap"):
        assert abs(bfloat16[metric] - float32[metric]) <= 0.005, (metric, bfloat16[metric], float32[metric])
