"""The grain pipeline: preprocessing values, batches, balance, state, hosts."""

from __future__ import annotations

import data_fakes as fakes
import numpy as np
import pytest

from unimmad_jax import packing
from unimmad_jax.data import builders, dealing, pipeline, preprocess
from unimmad_jax.data.pipeline import (
    DEFAULT_LOSS_WEIGHTS,
    default_data_config,
    eval_loader,
    train_loader,
)
from unimmad_jax.data.prepared import max_modality_count, open_split
from unimmad_jax.data.schema import InvalidDataError
from unimmad_jax.packing import PAIR_KEYS

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
    # The pair fields' budget varies with the batch (test_packed_training_batches).
    batch = {key: np.concatenate([b[key] for b in batches]) for key in batches[0] if key not in PAIR_KEYS}
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
    two_hosts = [
        train_loader(config, seed=5, batch_size=5, groups=2, process_index=p, process_count=2) for p in range(2)
    ]
    for host in two_hosts:
        _take(host.iterator, 3)
    expected = [_paths(_take(host.iterator, 2)) for host in two_hosts]

    one_host = train_loader(config, seed=5, batch_size=10, groups=2, process_index=0, process_count=1)
    one_host.seek(3)
    assert _paths(_take(one_host.iterator, 2)) == [a + b for a, b in zip(*expected)]
    again = train_loader(config, seed=5, batch_size=5, groups=2, process_index=1, process_count=2)
    again.seek(3)
    assert _paths(_take(again.iterator, 2)) == expected[1]


def test_two_hosts_split_each_global_batch(data_dir):
    config = _config(data_dir)
    single = train_loader(config, seed=2, batch_size=10, groups=2, process_index=0, process_count=1)
    hosts = [train_loader(config, seed=2, batch_size=5, groups=2, process_index=p, process_count=2) for p in range(2)]
    assert single.steps_per_epoch == hosts[0].steps_per_epoch == hosts[1].steps_per_epoch
    steps = 2 * single.steps_per_epoch  # two epochs
    host_paths = [_paths(_take(host.iterator, steps)) for host in hosts]
    for step, global_paths in enumerate(_paths(_take(single.iterator, steps))):
        # Host 0 has the first half of each global batch, host 1 the second: the
        # shards are disjoint slices of the epoch's draws and together are all of it.
        assert host_paths[0][step] + host_paths[1][step] == global_paths


# Packed batches (config.data.pack_pairs, docs/scale.md#padded-modality-slots).

MIXED = ("mvtec_ad", "mmad_meta/brats", "mvtec3d")  # 20 one-modality and 4 + 3 two-modality training records


def _counts(batch):
    return batch["modality_mask"].sum(axis=1)


def _group_pairs(batch, groups):
    return _counts(batch).reshape(groups, -1).sum(axis=1)


def test_dealing_evens_out_pairs_and_keeps_the_batch():
    rng = np.random.default_rng(0)
    counts = rng.choice([1, 2], size=(200, 24), p=[0.3, 0.7])
    order = dealing.deal_by_modality_count(counts, 4)
    np.testing.assert_array_equal(np.sort(order, axis=1), np.broadcast_to(np.arange(24), order.shape))
    pairs = dealing.group_pairs(np.take_along_axis(counts, order, axis=1), 4)
    assert (pairs.max(axis=1) - pairs.min(axis=1) <= 1).all()
    assert (np.diff(order.reshape(200, 4, 6), axis=2) > 0).all()  # draw order within a group
    np.testing.assert_array_equal(dealing.deal_by_modality_count(counts, 1), np.broadcast_to(np.arange(24), (200, 24)))
    # A 4-modality sample needs both 1-modality samples beside it for 8 pairs in each group.
    order = dealing.deal_by_modality_count(np.array([[2, 2, 4, 2, 1, 2, 2, 1]]), 2)
    np.testing.assert_array_equal(order, [[0, 2, 4, 7, 1, 3, 5, 6]])


def test_pair_budget_is_a_function_of_the_records():
    keys = [("a", "x")] * 5 + [("a", "y")] * 3 + [("b", "z")] * 4
    counts = np.array([2] * 5 + [1] * 3 + [4] * 4)
    budget = dealing.choose_pair_budget(keys, counts, 16, 4, num_slots=4)
    assert budget == dealing.choose_pair_budget(keys, counts, 16, 4, num_slots=4)
    assert budget.full == 16 and 7 <= budget.pairs < budget.full and 0 < budget.expected_waste < 0.5
    assert budget.pairs < budget.overflow <= budget.full
    assert budget.for_batch(budget.pairs) == budget.pairs and budget.for_batch(budget.pairs + 1) == budget.overflow
    assert budget.for_batch(budget.overflow) == budget.overflow and budget.for_batch(budget.overflow + 1) == 16
    alike = dealing.choose_pair_budget(keys[:8], np.full(8, 2), 8, 2, num_slots=4)
    assert (alike.pairs, alike.overflow, alike.overflow_rate, alike.expected_waste) == (8, 16, 0.0, 0.0)


def test_packed_batches_are_the_draws_dealt_to_the_groups(data_dir):
    packed = train_loader(_config(data_dir, datasets=MIXED), seed=6, batch_size=6, groups=2)
    plain = train_loader(_config(data_dir, datasets=MIXED, pack_pairs=False), seed=6, batch_size=6, groups=2)
    budget = packed.draws.pair_budget
    assert budget.full == 6 and plain.draws.pair_budget is None
    steps = 2 * packed.steps_per_epoch
    for batch, drawn in zip(_take(packed.iterator, steps), _take(plain.iterator, steps)):
        assert not set(PAIR_KEYS) & set(drawn)
        assert sorted(batch["path"]) == sorted(drawn["path"])
        width = budget.for_batch(_group_pairs(batch, 2).max())
        expected = packing.pack_pairs(batch["modality_mask"], 2, width)
        for key in PAIR_KEYS:
            np.testing.assert_array_equal(batch[key], expected[key])
        assert np.ptp(_group_pairs(batch, 2)) <= 1
    epochs = [packed.overflow_steps(epoch) for epoch in range(2)]
    assert all(0 <= count <= packed.steps_per_epoch for count in epochs)


def test_batches_that_do_not_fit_get_the_larger_budgets_on_every_host(data_dir, monkeypatch):
    tight = dealing.PairBudget(pairs=4, overflow=5, full=6, overflow_rate=0.5, expected_waste=0.5)
    monkeypatch.setattr(pipeline, "choose_pair_budget", lambda *args: tight)
    config = _config(data_dir, datasets=MIXED)
    single = train_loader(config, seed=2, batch_size=6, groups=2, process_index=0, process_count=1)
    hosts = [train_loader(config, seed=2, batch_size=3, groups=2, process_index=p, process_count=2) for p in range(2)]
    steps = 2 * single.steps_per_epoch
    widths = []
    for whole, first, second in zip(_take(single.iterator, steps), *(_take(h.iterator, steps) for h in hosts)):
        widths.append(whole["pair_sample"].shape[1])
        assert widths[-1] == min(w for w in (4, 5, 6) if _group_pairs(whole, 2).max() <= w)
        assert first["pair_sample"].shape == second["pair_sample"].shape == (1, widths[-1])
        for key in PAIR_KEYS:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
        for share in (first, second):
            assert share["pair_valid"].sum() == _counts(share).sum()  # no pair dropped
    assert set(widths) == {4, 5, 6}
    assert sum(single.overflow_steps(epoch) for epoch in range(2)) == len(widths) - widths.count(4)
    resumed = train_loader(config, seed=2, batch_size=3, groups=2, process_index=1, process_count=2)
    resumed.seek(3)
    again = _take(resumed.iterator, 3)
    repeat = train_loader(config, seed=2, batch_size=3, groups=2, process_index=1, process_count=2)
    expected = _take(repeat.iterator, 6)[3:]
    for a, b in zip(again, expected):
        assert list(a["path"]) == list(b["path"])
        for key in PAIR_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_groups_must_split_the_hosts_rows(data_dir):
    with pytest.raises(ValueError, match="3 pair groups"):
        train_loader(_config(data_dir), seed=0, batch_size=4, groups=3)


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
        eval_loader(
            config, "mvtec_ad", "train", batch_size=3, shard_by_host=True, groups=2, process_index=p, process_count=2
        )
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


def test_eval_batches_carry_pairs_of_one_budget_that_fits_the_split(data_dir):
    config = _config(data_dir)
    shards = [
        eval_loader(
            config,
            "mmad_meta/brats",
            "test",
            batch_size=4,
            groups=4,
            shard_by_host=True,
            process_index=p,
            process_count=2,
        )
        for p in range(2)
    ]
    batches = [batch for shard in shards for batch in shard]
    most = max(_group_pairs(batch, 2).max() for batch in batches)
    for batch in batches:
        expected = packing.pack_pairs(batch["modality_mask"], 2, most)
        for key in PAIR_KEYS:
            np.testing.assert_array_equal(batch[key], expected[key])
    unpacked = next(iter(eval_loader(_config(data_dir, pack_pairs=False), "mmad_meta/brats", "test", batch_size=4)))
    assert not set(PAIR_KEYS) & set(unpacked)


def test_default_config_has_the_documented_fields():
    config = default_data_config()
    assert config.datasets == ("synthetic",) and config.num_slots == 2 and config.pack_pairs
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
