"""The grain pipeline: preprocessing values, batches, balance, state, hosts."""

from __future__ import annotations

import data_fakes as fakes
import numpy as np
import pytest

from unimmad_jax.data import builders, preprocess
from unimmad_jax.data.pipeline import (
    DEFAULT_LOSS_WEIGHTS,
    default_data_config,
    eval_loader,
    train_loader,
)
from unimmad_jax.data.prepared import max_modality_count, open_split
from unimmad_jax.data.schema import InvalidDataError

# Two MVTec AD classes of very different sizes: balance must show.
TRAIN_SIZES = {"big": 18, "small": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    out = tmp_path_factory.mktemp("prepared")
    builders.prepare("mvtec_ad", out, fakes.write_mvtec_ad(raw / "mvtec_ad", TRAIN_SIZES))
    builders.prepare("mmad_meta/brats", out, fakes.write_mmad_meta(raw / "brats"))
    builders.prepare("mvtec3d", out, fakes.write_mvtec3d(raw / "mvtec3d", classes=("bagel",)))
    return out, raw


def _config(data_dir, **overrides):
    config = default_data_config()
    config.update(data_dir=str(data_dir[0]), image_size=8, num_slots=2, num_read_threads=0, datasets=("mvtec_ad",))
    config.update(overrides)
    return config


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _paths(batches):
    return [list(batch["path"]) for batch in batches]


# Preprocessing values (docs/data.md#preprocessing).


def test_depth_recipe_on_a_known_array():
    depth = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    foreground = np.ones((4, 4), np.float32)
    foreground[:, 0] = 0
    # m = mean of columns 1..3 = 9; background filled with 9; (d - 9) * 100;
    # halving with half-pixel centres averages 2 x 2 blocks.
    out = preprocess.preprocess_depth(np.stack([depth, foreground], -1), "depth", 2)
    expected = np.array([[-250.0, -350.0], [150.0, 450.0]])
    np.testing.assert_allclose(out, np.repeat(expected[..., None], 3, -1), rtol=1e-6)
    # wofg_depth centres on the mean of all pixels (8.5), foreground ignored.
    out = preprocess.preprocess_depth(np.stack([depth, foreground], -1), "wofg_depth", 2)
    np.testing.assert_allclose(out[..., 0], [[-500.0, -300.0], [300.0, 500.0]], rtol=1e-6)


def test_depth_upsampling_uses_half_pixel_centres():
    columns = np.tile(np.arange(4, dtype=np.float32), (4, 1))  # mean 1.5
    depth = np.stack([columns, np.ones_like(columns)], -1)
    out = preprocess.preprocess_depth(depth, "depth", 8)
    expected = [-150, -125, -75, -25, 25, 75, 125, 150]
    np.testing.assert_allclose(out[3, :, 1], expected, rtol=1e-6)


def test_depth_without_foreground_is_refused():
    depth = np.zeros((4, 4, 2), np.float32)
    with pytest.raises(InvalidDataError, match="no foreground"):
        preprocess.preprocess_depth(depth, "depth", 2)


def test_image_is_scaled_and_imagenet_normalised():
    image = np.full((30, 40, 3), [255, 0, 51], np.uint8)
    out = preprocess.preprocess_image(image, 16)
    expected = (np.array([1.0, 0.0, 0.2]) - preprocess.IMAGENET_MEAN) / preprocess.IMAGENET_STD
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-6)


def test_mask_is_resized_then_thresholded_above_zero():
    mask = np.zeros((30, 40), np.uint8)
    mask[10, 10] = 1  # one pixel of defect id 1
    out = preprocess.preprocess_mask(mask, 15)
    assert set(np.unique(out)) == {0.0, 1.0}
    assert 1 <= out.sum() <= 4
    np.testing.assert_array_equal(preprocess.preprocess_mask(mask * 255, 15), out)


def test_load_modality_matches_the_batches(data_dir):
    config = _config(data_dir, image_size=16)
    batch = next(iter(eval_loader(config, "mvtec3d", "test", batch_size=4)))
    row = list(batch["path"]).index("bagel/test/crack/rgb/001.png")
    folder = data_dir[1] / "mvtec3d/bagel/test/crack"
    rgb = preprocess.load_modality(folder / "rgb/001.png", "rgb", 16)
    depth = preprocess.load_modality(folder / "xyz/001.tiff", "depth", 16)
    np.testing.assert_array_equal(batch["specific_images"][row, 0], rgb)
    np.testing.assert_array_equal(batch["specific_images"][row, 1], depth)


# Training batches.


def test_training_batches_follow_the_contract(data_dir):
    config = _config(data_dir, datasets=("mvtec_ad", "mmad_meta/brats"))
    loader = train_loader(config, seed=0, batch_size=6)
    assert loader.epoch_size == 20 + 4 and loader.steps_per_epoch == 4
    batches = _take(loader.iterator, 4)
    batch = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    assert batches[0]["specific_images"].shape == (6, 2, 8, 8, 3)
    assert batches[0]["specific_images"].dtype == np.float32
    slots = batch["modality_mask"].sum(axis=1)
    from_brats = batch["dataset"] == "brats"
    assert from_brats.any() and (~from_brats).any()
    np.testing.assert_array_equal(slots, np.where(from_brats, 2, 1))
    assert not batch["specific_images"][~batch["modality_mask"]].any()
    assert batch["specific_images"][batch["modality_mask"]].any(axis=(1, 2, 3)).all()
    np.testing.assert_array_equal(batch["loss_weight"], np.where(from_brats, DEFAULT_LOSS_WEIGHTS["brats"], 1.0))
    assert batch["loss_weight"].dtype == np.float32
    assert not batch["gt_mask"].any() and batch["gt_mask"].shape == (24, 8, 8)
    assert batch["label"].dtype == np.int32 and not batch["label"].any()
    assert batch["valid"].all()


def test_too_few_slots_is_refused(data_dir):
    config = _config(data_dir, datasets=("mmad_meta/brats",), num_slots=1)
    with pytest.raises(InvalidDataError, match="2 modalities but config.data.num_slots is 1"):
        train_loader(config, seed=0, batch_size=2)


def test_classes_are_balanced(data_dir):
    loader = train_loader(_config(data_dir), seed=3, batch_size=10)
    assert loader.steps_per_epoch == 2
    names = np.concatenate([b["class_name"] for b in _take(loader.iterator, 80)])
    # Uniform sampling would give 'small' 2 / 20 = 10 % of 800 draws (sd 1 %).
    assert 0.42 < np.mean(names == "small") < 0.58


def test_same_seed_same_batches_other_seed_others(data_dir):
    config = _config(data_dir)
    first = _take(train_loader(config, seed=7, batch_size=5).iterator, 6)
    again = _take(train_loader(config, seed=7, batch_size=5).iterator, 6)
    other = _take(train_loader(config, seed=8, batch_size=5).iterator, 6)
    assert _paths(first) == _paths(again)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["specific_images"], b["specific_images"])
    assert _paths(first) != _paths(other)


def test_epochs_differ_and_seek_skips_ahead(data_dir):
    config = _config(data_dir)
    loader = train_loader(config, seed=1, batch_size=5)
    spe = loader.steps_per_epoch
    epochs = _take(loader.iterator, 3 * spe)
    resumed = train_loader(config, seed=1, batch_size=5)
    resumed.seek(2 * spe)
    assert _paths(_take(resumed.iterator, spe)) == _paths(epochs[2 * spe :])
    assert _paths(epochs[:spe]) != _paths(epochs[spe : 2 * spe])


def test_seek_continues_with_the_next_batch_in_any_number_of_hosts(data_dir):
    config = _config(data_dir, num_read_threads=2)  # with prefetching threads
    two_hosts = [train_loader(config, seed=5, batch_size=5, process_index=p, process_count=2) for p in range(2)]
    for host in two_hosts:
        _take(host.iterator, 3)
    expected = [_paths(_take(host.iterator, 2)) for host in two_hosts]

    one_host = train_loader(config, seed=5, batch_size=10, process_index=0, process_count=1)
    one_host.seek(3)
    assert _paths(_take(one_host.iterator, 2)) == [a + b for a, b in zip(*expected)]
    again = train_loader(config, seed=5, batch_size=5, process_index=1, process_count=2)
    again.seek(3)
    assert _paths(_take(again.iterator, 2)) == expected[1]


def test_two_hosts_split_each_global_batch(data_dir):
    config = _config(data_dir)
    single = train_loader(config, seed=2, batch_size=10, process_index=0, process_count=1)
    hosts = [train_loader(config, seed=2, batch_size=5, process_index=p, process_count=2) for p in range(2)]
    assert single.steps_per_epoch == hosts[0].steps_per_epoch == hosts[1].steps_per_epoch
    steps = 2 * single.steps_per_epoch  # two epochs
    host_paths = [_paths(_take(host.iterator, steps)) for host in hosts]
    for step, global_paths in enumerate(_paths(_take(single.iterator, steps))):
        # Host 0 has the first half of each global batch, host 1 the second: the
        # shards are disjoint slices of the epoch's draws and together are all of it.
        assert host_paths[0][step] + host_paths[1][step] == global_paths


# Training batches of one modality count (config.data.bucket_by_modality_count).

MIXED = ("mvtec_ad", "mmad_meta/brats", "mvtec3d")  # 20 one-modality and 4 + 3 two-modality training records


def _counts(batch):
    return batch["modality_mask"].sum(axis=1)


def test_bucketed_epochs_regroup_the_same_draws(data_dir):
    """G = 3 divides the 27 records, so an epoch holds all its draws: each count's draws in batches of 3 in
    draw order, then the leftovers of both counts pooled in draw order, the batches in a shuffled order."""
    plain = train_loader(_config(data_dir, datasets=MIXED), seed=6, batch_size=3)
    bucketed = train_loader(_config(data_dir, datasets=MIXED, bucket_by_modality_count=True), seed=6, batch_size=3)
    assert plain.steps_per_epoch == bucketed.steps_per_epoch == 9
    slot_orders, mixed_batches = [], 0
    for _ in range(2):  # epochs
        drawn = _take(plain.iterator, 9)
        paths = np.concatenate([b["path"] for b in drawn])
        counts = np.concatenate([_counts(b) for b in drawn])
        expected, leftovers = [], []
        for count in (1, 2):
            group = np.flatnonzero(counts == count)
            whole = len(group) // 3 * 3
            expected += [tuple(paths[group[i : i + 3]]) for i in range(0, whole, 3)]
            leftovers += list(group[whole:])
        pooled = paths[np.sort(np.array(leftovers, np.int64))]
        mixed = [tuple(pooled[i : i + 3]) for i in range(0, len(pooled), 3)]  # 0 or 3 leftovers (27 = 3 * 9)

        batches = _take(bucketed.iterator, 9)
        assert sorted(tuple(b["path"]) for b in batches) == sorted(expected + mixed)
        for batch in batches:
            slots = _counts(batch).max()
            assert batch["specific_images"].shape == (3, slots, 8, 8, 3) and batch["modality_mask"].shape == (3, slots)
            assert batch["modality_mask"][:, 0].all()
        assert sum(len(set(_counts(b))) > 1 for b in batches) == len(mixed)
        mixed_batches += len(mixed)
        slot_orders.append([b["modality_mask"].shape[1] for b in batches])
    assert mixed_batches > 0 and all(set(order) == {1, 2} for order in slot_orders)
    assert any(order != sorted(order) for order in slot_orders)  # shuffled, not grouped by count


def test_bucketed_batches_seek_and_split_over_hosts(data_dir):
    """Each host's share of a global batch has the global batch's slots; `seek` still goes to a global step."""
    config = _config(data_dir, datasets=MIXED, bucket_by_modality_count=True)
    single = train_loader(config, seed=2, batch_size=6, process_index=0, process_count=1)
    hosts = [train_loader(config, seed=2, batch_size=3, process_index=p, process_count=2) for p in range(2)]
    assert single.steps_per_epoch == hosts[0].steps_per_epoch == 4  # 27 // 6: 3 draws left out per epoch
    steps = 2 * single.steps_per_epoch
    global_batches = _take(single.iterator, steps)
    shares = [_take(host.iterator, steps) for host in hosts]
    narrower = 0  # shares whose samples all have fewer modalities than their batch's slots
    for whole, first, second in zip(global_batches, *shares):
        assert (
            first["specific_images"].shape
            == second["specific_images"].shape
            == (3, *whole["specific_images"].shape[1:])
        )
        assert list(first["path"]) + list(second["path"]) == list(whole["path"])
        np.testing.assert_array_equal(
            np.concatenate([first["modality_mask"], second["modality_mask"]]), whole["modality_mask"]
        )
        narrower += sum(_counts(share).max() < share["modality_mask"].shape[1] for share in (first, second))
    assert narrower > 0  # in a mixed global batch
    resumed = train_loader(config, seed=2, batch_size=3, process_index=1, process_count=2)
    resumed.seek(3)  # the last step of epoch 0, then epoch 1
    again = _take(resumed.iterator, 3)
    assert _paths(again) == _paths(shares[1][3:6])
    assert [b["specific_images"].shape for b in again] == [b["specific_images"].shape for b in shares[1][3:6]]


# Evaluation batches.


def test_eval_order_padding_and_classes(data_dir):
    config = _config(data_dir)
    loader = eval_loader(config, "mvtec_ad", "test", batch_size=3)
    batches = list(loader)
    assert loader.num_batches == len(batches) == 2 and loader.num_examples == 4
    paths = sum(_paths(batches), [])
    assert paths[:4] == [
        "big/test/broken/000.png",
        "big/test/good/000.png",
        "small/test/broken/000.png",
        "small/test/good/000.png",
    ]
    assert paths[4:] == [paths[3]] * 2  # padding repeats the last sample
    assert list(batches[1]["valid"]) == [True, False, False]
    assert all(b["specific_images"].shape == (3, 2, 8, 8, 3) for b in batches)
    assert _paths(batches) == _paths(list(loader))  # deterministic
    small = eval_loader(config, "mvtec_ad", "test", batch_size=3, classes=("small",))
    assert small.num_examples == 2
    with pytest.raises(InvalidDataError, match=r"Classes \['nope'\]"):
        eval_loader(config, "mvtec_ad", "test", batch_size=3, classes=("nope",))


def test_eval_shards_are_disjoint_and_cover_the_split(data_dir):
    config = _config(data_dir)
    shards = [
        eval_loader(config, "mvtec_ad", "train", batch_size=3, shard_by_host=True, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert shards[0].num_batches == shards[1].num_batches == 4  # 20 / (3 * 2)
    seen = []
    for shard in shards:
        for batch in shard:
            seen += list(batch["path"][batch["valid"]])
    everything = eval_loader(config, "mvtec_ad", "train", batch_size=20)
    (all_batch,) = list(everything)
    assert sorted(seen) == sorted(all_batch["path"]) and len(set(seen)) == 20


def test_default_config_has_the_documented_fields():
    config = default_data_config()
    assert config.datasets == ("synthetic",) and config.num_slots == 2
    assert "image_size" not in config and dict(config.classes) == {}  # the model's, set by unimmad_jax.config
    assert dict(config.loss_weights) == {
        "eyecandies": 0.5,
        "mvtec3d": 1.0,
        "mulsen_ad": 1.0,
        "brats": 10.0,
        "retinaad": 1.0,
        "liverad": 10.0,
        "hyperad": 1.0,
    }


def test_split_lookups_name_a_missing_split(data_dir):
    assert max_modality_count(data_dir[0], "mvtec3d", "test") == 2
    assert max_modality_count(data_dir[0], "mvtec_ad", "test") == 1
    for lookup in (open_split, max_modality_count):
        with pytest.raises(InvalidDataError, match="Dataset 'mvtec_ad' has no split 'validation'"):
            lookup(data_dir[0], "mvtec_ad", "validation")


def test_replay_draws_the_first_records_of_earlier_classes(data_dir):
    config = _config(data_dir, classes={"mvtec_ad": ("small",)}, replay_classes={"mvtec_ad": ("big",)})
    assert train_loader(config, seed=0, batch_size=2).epoch_size == TRAIN_SIZES["small"]  # replay_per_class = 0
    config.replay_per_class = 3
    replayed = []
    for seed in (0, 1):
        loader = train_loader(config, seed=seed, batch_size=2)
        assert loader.epoch_size == TRAIN_SIZES["small"] + 3
        batches = _take(loader.iterator, 40)
        paths = np.concatenate([b["path"] for b in batches])
        names = np.concatenate([b["class_name"] for b in batches])
        assert 0.3 < np.mean(names == "big") < 0.7  # classes stay balanced
        replayed.append(set(paths[names == "big"]))
    assert len(replayed[0]) == 3 and replayed[0] == replayed[1]  # the same 3 records, whatever the seed
