"""How much of the pair compute (prior and C-MoE, one pass per sample and slot) pads empty modality slots.

    python -m experiments.studies.padding --config=configs/unified.py --global-batch=10,64,2048

Simulates the training loader's draws (`unimmad_jax.data.pipeline.BalancedDraws`, seeded as in
training) for `--epochs` epochs, with every batch padded to `config.data.num_slots` (mixed batches,
the default) and with `data.bucket_by_modality_count`, where a batch is padded to its own most
modalities. The records are the prepared training splits of `config.data.datasets` when all are
prepared in `config.data.data_dir`, else the `TRAIN_SETS` table below (classes, training samples
and modalities per class). Padded fraction = 1 - valid pairs / (global batch x slots), over all steps.
No data is read and nothing is computed on a device.
"""

from __future__ import annotations

import collections

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from unimmad_jax.data.pipeline import BalancedDraws
from unimmad_jax.data.prepared import find_prepared, read_index
from unimmad_jax.data.schema import MAX_MODALITIES

flags.DEFINE_list("global-batch", None, "Global batch sizes to simulate (default: config.train.batch_size).")
flags.DEFINE_integer("epochs", 20, "Epochs simulated per batch size.")
config_flags.DEFINE_config_file("config", "configs/unified.py", "A config file (configs/*.py).", lock_config=False)
FLAGS = flags.FLAGS

# dataset -> (modalities per sample, {class: training samples}, source). Class-balanced draws make the
# mix of modality counts depend on the number of classes of each count only; the sizes set the epoch
# (draws per epoch, hence steps and leftovers), which moves the bucketed numbers only a little.
TRAIN_SETS = {
    "mvtec3d": (
        2,  # RGB + depth
        {
            "bagel": 244,
            "cable_gland": 223,
            "carrot": 286,
            "cookie": 210,
            "dowel": 288,
            "foam": 236,
            "peach": 361,
            "potato": 300,
            "rope": 298,
            "tire": 210,
        },
        "Bergmann et al., The MVTec 3D-AD Dataset, VISAPP 2022, Table 1",
    ),
    "eyecandies": (
        2,  # RGB + depth, as our builder prepares it
        dict.fromkeys(
            (
                "CandyCane",
                "ChocolateCookie",
                "ChocolatePraline",
                "Confetto",
                "GummyBear",
                "HazelnutTruffle",
                "LicoriceSandwich",
                "Lollipop",
                "Marshmallow",
                "PeppermintCandy",
            ),
            1000,
        ),
        "Bonfiglioli et al., The Eyecandies Dataset, ACCV 2022: 1,000 training samples per class",
    ),
    "mulsen_ad": (
        2,  # RGB + infrared, as our builder prepares it
        dict.fromkeys(
            (
                "button_cell",
                "capsule",
                "cotton",
                "cube",
                "flat_pad",
                "light",
                "nut",
                "piggy",
                "plastic_cylinder",
                "screen",
                "screw",
                "solar_panel",
                "spring_pad",
                "toothbrush",
                "zipper",
            ),
            100,
        ),
        "classes of the release's class list; 100 training samples per class ASSUMED (not verified)",
    ),
    "mmad_meta/brats": (
        4,
        {"brats": 1000},
        "ASSUMED: FLAIR, T1, T1ce, T2 (the unified config's 4 slots); 1,000 samples after the release's 'BratsAD1K'",
    ),
    "mmad_meta/retinaad": (1, {"retinal_edema": 4297}, "ASSUMED: one OCT scan; samples of BMAD's RESC training set"),
    "mmad_meta/liverad": (1, {"liver": 1452}, "ASSUMED: one CT slice; samples of BMAD's liver CT training set"),
    "mmad_meta/hyperad": (1, {"colon": 1000}, "ASSUMED: one endoscopy image, 1,000 samples"),
}


def prepared_records(config) -> tuple[list[tuple[str, str]], np.ndarray] | None:
    """(dataset, class) and modality count of every training record, when all datasets are prepared."""
    folders = find_prepared(config.data.data_dir)
    if not all(name in folders for name in config.data.datasets):
        return None
    keys, counts = [], []
    for name in config.data.datasets:
        index = read_index(folders[name]).splits["train"]
        wanted = config.data.classes.get(name)
        for class_name, types in zip(index.class_names, index.modality_types):
            if wanted is None or class_name in wanted:
                keys.append((name, class_name))
                counts.append(len(types))
    return keys, np.array(counts)


def table_records(config) -> tuple[list[tuple[str, str]], np.ndarray]:
    missing = sorted(set(config.data.datasets) - set(TRAIN_SETS))
    if missing:
        raise SystemExit(f"{missing} are neither prepared in {config.data.data_dir} nor in TRAIN_SETS of {__file__}")
    keys, counts = [], []
    for name in config.data.datasets:
        modalities, classes, _ = TRAIN_SETS[name]
        for class_name, size in classes.items():
            if class_name in config.data.classes.get(name, classes):
                keys += [(name, class_name)] * size
                counts += [modalities] * size
    return keys, np.array(counts)


def simulate(keys, counts, seed: int, global_batch: int, num_slots: int, bucket: bool, epochs: int) -> dict:
    draws = BalancedDraws(keys, counts, seed, global_batch, num_slots, bucket=bucket)
    computed = valid = mixed = 0
    steps_by_slots = collections.Counter()
    for epoch in range(epochs):
        batches, slots = draws.epoch(epoch)
        computed += global_batch * int(slots.sum())
        valid += int(counts[batches].sum())
        mixed += sum(len(np.unique(counts[batch])) > 1 for batch in batches)
        steps_by_slots.update(slots.tolist())
    steps = epochs * draws.steps_per_epoch
    return {
        "steps_per_epoch": draws.steps_per_epoch,
        "padded": 1 - valid / computed,
        "mixed_per_epoch": mixed / epochs,
        "slots_share": {s: steps_by_slots[s] / steps for s in range(1, MAX_MODALITIES + 1)},
    }


def main(argv):
    del argv
    config = FLAGS.config
    records = prepared_records(config)
    source = f"prepared data in {config.data.data_dir}" if records else f"the TRAIN_SETS table of {__file__}"
    keys, counts = records or table_records(config)
    classes = collections.Counter(dict(zip(keys, counts)).values())
    print(f"Records: {source}: {len(keys)} training samples, {len(set(keys))} classes")
    print("classes by modality count: " + ", ".join(f"{c}: {classes[c]}" for c in sorted(classes)))
    if records is None:
        for name in config.data.datasets:
            print(f"  {name}: {TRAIN_SETS[name][2]}")
    draws = BalancedDraws(keys, counts, config.seed, 1, config.data.num_slots, bucket=False)
    mean = float(draws.probabilities @ counts)
    print(f"valid slots per drawn sample: {mean:.3f} of {config.data.num_slots} (expected, class-balanced)\n")

    batches = [int(b) for b in (FLAGS["global-batch"].value or [config.train.batch_size])]
    print(
        "| global batch | steps/epoch | padded: mixed batches | padded: bucketed | pair compute: bucketed / mixed "
        "| mixed batches/epoch | bucketed steps with S = 1 / 2 / 3 / 4 |"
    )
    print("|---|---|---|---|---|---|---|")
    for global_batch in batches:
        run = dict(seed=config.seed, global_batch=global_batch, num_slots=config.data.num_slots, epochs=FLAGS.epochs)
        before = simulate(keys, counts, bucket=False, **run)
        after = simulate(keys, counts, bucket=True, **run)
        shares = " / ".join(f"{100 * after['slots_share'][s]:.1f} %" for s in range(1, MAX_MODALITIES + 1))
        print(
            f"| {global_batch} | {after['steps_per_epoch']} | {100 * before['padded']:.1f} % | "
            f"{100 * after['padded']:.2f} % | {(1 - before['padded']) / (1 - after['padded']):.3f} | "
            f"{after['mixed_per_epoch']:.2f} | {shares} |"
        )


if __name__ == "__main__":
    app.run(main)
