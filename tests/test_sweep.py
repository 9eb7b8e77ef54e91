"""Seed sweeps: the statistics on hand-computable numbers, and a 2-seed tiny sweep through the command line."""

import json

import numpy as np
import pytest
import scipy.stats
from helpers import load_config, run_main

from unimmad_jax import report, sweep

SEEDS = (0, 2)
T_975_2_DOF = 4.302652729911275  # Student t's 97.5 % quantile at 2 degrees of freedom (printed tables: 4.303)


def test_interval_of_hand_computable_values():
    stats = sweep.interval([0.1, 0.2, 0.3])
    half_width = T_975_2_DOF * 0.1 / np.sqrt(3)
    assert stats == pytest.approx(
        {"mean": 0.2, "sd": 0.1, "half_width": half_width, "low": 0.2 - half_width, "high": 0.2 + half_width, "n": 3}
    )
    with pytest.raises(ValueError, match="at least 2 values"):
        sweep.interval([0.5])


def test_paired_difference_of_hand_computable_values():
    # differences 0.2, 0.3, 0.1: mean 0.2, sd 0.1; the sides' own spreads (sd 0.1 each) do not enter
    stats = sweep.paired_difference([0.3, 0.5, 0.4], [0.1, 0.2, 0.3])
    assert stats["mean"] == pytest.approx(0.2) and stats["sd"] == pytest.approx(0.1)
    assert stats["half_width"] == pytest.approx(T_975_2_DOF * 0.1 / np.sqrt(3))


def _summary(values: dict[str, float], dataset: str = "synthetic") -> dict:
    """A one-dataset summary whose classes take `values` for every metric."""
    results = {dataset: {name: {m: value for m in report.METRIC_NAMES} for name, value in values.items()}}
    return report.summarize_metrics(results)


def test_sweep_results_put_the_papers_value_beside_ours():
    summaries = {s: _summary({"bagel": value, "tire": value}, "mvtec3d") for s, value in ((0, 0.9), (1, 0.8))}
    for summary in summaries.values():
        summary["paper"] = report.compare_with_paper(summary)
    paper = sweep.sweep_results(summaries)["paper"]["MVTec 3D-AD"]
    assert paper["ours_percent"]["mean"] == pytest.approx(85.0) and paper["ours_percent"]["n"] == 2
    assert paper["paper_percent"] == 92.53 and paper["difference_points"] == pytest.approx(85.0 - 92.53)
    assert "| MVTec 3D-AD | mvtec3d | I-AUROC | 85.00 ± " in report.sweep_markdown(sweep.sweep_results(summaries))


def test_compared_results_pair_the_seeds():
    this = {0: _summary({"tiles": 0.9, "foam": 0.7}), 1: _summary({"tiles": 0.8, "foam": 0.8})}
    other = {1: _summary({"tiles": 0.6, "foam": 0.6}), 0: _summary({"tiles": 0.8, "foam": 0.5})}
    compared = sweep.compared_results(this, other, "runs/other")
    assert compared["directory"] == "runs/other"
    tiles = compared["datasets"]["synthetic"]["classes"]["tiles"]["i_auroc"]  # differences 0.1 and 0.2
    assert tiles["mean"] == pytest.approx(0.15) and tiles["sd"] == pytest.approx(0.05 * np.sqrt(2))
    mean = compared["datasets"]["synthetic"]["mean"]["p_auroc"]  # dataset means 0.8 - 0.65 and 0.8 - 0.6
    assert mean["mean"] == pytest.approx(0.175) and mean["n"] == 2
    assert compared[report.ALL_DATASETS_MEAN]["aupro_0.3"]["mean"] == pytest.approx(0.175)
    with pytest.raises(ValueError, match=r"seeds \[0\] are only in this sweep, \[5\] only in runs/other"):
        sweep.compared_results(this, {1: other[1], 5: other[0]}, "runs/other")
    with pytest.raises(ValueError, match="a paired difference compares the same datasets and classes"):
        sweep.compared_results(this, {s: _summary({"tiles": 0.5}) for s in (0, 1)}, "runs/other")


def test_compare_with_checks_the_seeds_before_training(tmp_path):
    other = tmp_path / "other"
    (other / "sweep").mkdir(parents=True)
    (other / "sweep" / "results.json").write_text(json.dumps({"seeds": [0, 1]}))
    config = load_config("tiny")
    config.sweep.seeds = SEEDS
    config.sweep.compare_with = str(other)
    with pytest.raises(ValueError, match=rf"seeds \[2\] are only in this sweep, \[1\] only in {other}"):
        sweep.run_sweep(config, tmp_path / "this")
    config.sweep.compare_with = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="run that sweep"):
        sweep.run_sweep(config, tmp_path / "this")
    config.sweep.compare_with = ""
    config.sweep.seeds = (3, 3)
    with pytest.raises(ValueError, match="at least 2 seeds, each once"):
        sweep.run_sweep(config, tmp_path / "this")
    assert not (tmp_path / "this").exists()


@pytest.fixture(scope="module")
def sweep_workdir(tmp_path_factory, synthetic_data_dir):
    """A 2-seed sweep of the tiny config, 1 epoch a seed."""
    workdir = tmp_path_factory.mktemp("sweep")
    run_main(workdir, synthetic_data_dir, "--mode=sweep", **{"sweep.seeds": str(SEEDS), "train.num_epochs": 1})
    return workdir


def test_sweep_intervals_equal_those_of_the_seeds_results(sweep_workdir):
    results = json.loads((sweep_workdir / "sweep" / "results.json").read_text())
    assert results["seeds"] == list(SEEDS)
    seeds = [json.loads((sweep_workdir / f"seed_{s}" / "eval" / "final.json").read_text()) for s in SEEDS]
    assert seeds[0]["All_Class_Mean"] != seeds[1]["All_Class_Mean"]  # the seeds train different models
    rows = [("synthetic", name) for name in ("tiles", "brain_scan")]
    for metric in report.METRIC_NAMES:
        for dataset, name in rows:
            values = [summary["datasets"][dataset]["classes"][name][metric] for summary in seeds]
            stats = results["datasets"][dataset]["classes"][name][metric]
            # scipy's own interval of the mean: mean -/+ t * standard error
            low, high = scipy.stats.t.interval(0.95, len(values) - 1, np.mean(values), scipy.stats.sem(values))
            assert (stats["low"], stats["high"]) == pytest.approx((low, high), abs=1e-12)
            assert stats["sd"] == pytest.approx(np.std(values, ddof=1)) and stats["n"] == len(SEEDS)
        overall = [summary["All_Datasets_Mean"][metric] for summary in seeds]
        assert results["All_Datasets_Mean"][metric]["mean"] == pytest.approx(np.mean(overall))
    markdown = (sweep_workdir / "sweep" / "results.md").read_text()
    assert "Over 2 seeds (0, 2)" in markdown and "| synthetic | brain_scan |" in markdown


def test_a_finished_seed_is_not_trained_again(sweep_workdir, synthetic_data_dir):
    checkpoints = {s: sorted(p.name for p in (sweep_workdir / f"seed_{s}" / "checkpoints").iterdir()) for s in SEEDS}
    logs = {s: (sweep_workdir / f"seed_{s}" / "metrics.jsonl").read_text() for s in SEEDS}
    before = json.loads((sweep_workdir / "sweep" / "results.json").read_text())
    # compared with itself: every paired difference is 0 with a zero-width interval
    stdout = run_main(
        sweep_workdir,
        synthetic_data_dir,
        "--mode=sweep",
        **{"sweep.seeds": str(SEEDS), "train.num_epochs": 1, "sweep.compare_with": str(sweep_workdir)},
    )
    assert all(f"seed {s}: finished" in stdout for s in SEEDS) and "Resumed from" not in stdout
    for s in SEEDS:
        assert sorted(p.name for p in (sweep_workdir / f"seed_{s}" / "checkpoints").iterdir()) == checkpoints[s]
        assert (sweep_workdir / f"seed_{s}" / "metrics.jsonl").read_text() == logs[s]
    after = json.loads((sweep_workdir / "sweep" / "results.json").read_text())
    assert after["datasets"] == before["datasets"]
    difference = after["compared_with"]["datasets"]["synthetic"]["mean"]["i_auroc"]
    assert (difference["mean"], difference["half_width"]) == (0.0, 0.0)
    assert "Paired difference, this sweep - " in (sweep_workdir / "sweep" / "results.md").read_text()
