"""How much of the pair compute (prior and C-MoE, one pass per sample and slot) pads empty modality slots.

    python -m experiments.studies.padding --config=configs/unified.py --global-batch=10,64,2048 --devices=1,8,256

Simulates the training loader's draws (`unimmad_jax.data.pipeline.BalancedDraws`, seeded as in
training) for `--epochs` epochs, with every sample padded to `config.data.num_slots` (the layout
without `data.pack_pairs`) and packed: each global batch dealt to the devices by modality count and
computed with the run's pair budget per device, or with its overflow budget when it does not fit,
or with the full budget when it fits neither (`unimmad_jax.data.dealing`). The records are the
prepared training indexes of `config.data.datasets` when all are prepared in `config.data.data_dir`,
else what the builders declare. Waste = 1 - valid pairs / pairs computed, over all steps: padded
pairs inside the budgets plus the larger budgets' extra pairs. No data is read and nothing is
computed on a device.
"""

from __future__ import annotations

import collections

from absl import app, flags
from ml_collections import config_flags

from unimmad_jax.data.dealing import training_records
from unimmad_jax.data.pipeline import BalancedDraws

flags.DEFINE_list("global-batch", None, "Global batch sizes to simulate (default: config.train.batch_size).")
flags.DEFINE_list("devices", None, "Devices along the data axis, one per global batch (default: 1 each).")
flags.DEFINE_integer("epochs", 20, "Epochs simulated per batch size.")
config_flags.DEFINE_config_file("config", "configs/unified.py", "A config file (configs/*.py).", lock_config=False)
FLAGS = flags.FLAGS


def simulate(keys, counts, seed: int, global_batch: int, devices: int, num_slots: int, epochs: int) -> dict:
    """Pairs computed padded and packed over `epochs` epochs of training draws."""
    draws = BalancedDraws(keys, counts, seed, global_batch, num_slots, groups=devices)
    valid = packed = overflows = 0
    for epoch in range(epochs):
        batches, budgets = draws.epoch(epoch)
        valid += int(counts[batches].sum())
        packed += devices * int(budgets.sum())
        overflows += int((budgets != draws.pair_budget.pairs).sum())
    steps = epochs * draws.steps_per_epoch
    return {
        "steps_per_epoch": draws.steps_per_epoch,
        "budget": draws.pair_budget,
        "padded": 1 - valid / (steps * global_batch * num_slots),
        "packed": 1 - valid / packed,
        "overflow_share": overflows / steps,
    }


def main(argv):
    del argv
    config = FLAGS.config
    keys, counts, source = training_records(config)
    classes = collections.Counter(dict(zip(keys, counts)).values())
    print(f"Records: {source}: {len(keys)} training samples, {len(set(keys))} classes")
    print("classes by modality count: " + ", ".join(f"{c}: {classes[c]}" for c in sorted(classes)))
    draws = BalancedDraws(keys, counts, config.seed, 1, config.data.num_slots, groups=None)
    mean = float(draws.probabilities @ counts)
    print(f"valid slots per drawn sample: {mean:.3f} of {config.data.num_slots} (expected, class-balanced)\n")

    batches = [int(b) for b in (FLAGS["global-batch"].value or [config.train.batch_size])]
    devices = [int(d) for d in (FLAGS.devices or [1] * len(batches))]
    if len(devices) != len(batches):
        raise app.UsageError(f"--devices has {len(devices)} entries, --global-batch {len(batches)}")
    print(
        "| global batch | devices | steps/epoch | pair budgets per device (overflow, full) | steps over the budget "
        "| waste: padded | waste: packed | expected by the budget |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for global_batch, groups in zip(batches, devices):
        run = simulate(keys, counts, config.seed, global_batch, groups, config.data.num_slots, FLAGS.epochs)
        budget = run["budget"]
        print(
            f"| {global_batch} | {groups} | {run['steps_per_epoch']} | "
            f"{budget.pairs} ({budget.overflow}, {budget.full}) | "
            f"{100 * run['overflow_share']:.1f} % | {100 * run['padded']:.1f} % | {100 * run['packed']:.1f} % | "
            f"{100 * budget.expected_waste:.1f} % |"
        )


if __name__ == "__main__":
    app.run(main)
