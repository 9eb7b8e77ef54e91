"""Seed sweeps: one config trained and evaluated once per seed, every metric with its mean and 95 % interval.

`--mode=sweep` trains the config once for each of `sweep.seeds`, each run in `<workdir>/seed_<s>/`
(an ordinary training workdir, so a killed sweep resumes at the seed and step where it stopped),
evaluates each run's last checkpoint (never one chosen on test data) into
`seed_<s>/eval/final.{json,md}`, and writes `<workdir>/sweep/results.{json,md}`: per metric, class,
dataset and overall mean, the mean over the seeds, the standard deviation (ddof=1) and a 95 %
confidence interval by Student's t, and the paper's value beside ours where it reports one.
A seed whose `eval/final.json` exists is finished and never trained again.

`sweep.compare_with=OTHER` (the workdir of a sweep of another config over the same seeds) adds the
paired difference (this - other) of every metric over the seeds, with its interval: the two runs of
a seed share their data order, so the difference pairs them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
import scipy.stats
from etils import epath

from unimmad_jax import checkpoints, evaluate, loop, report, sharding
from unimmad_jax.config import model_config
from unimmad_jax.models.unimmad import UniMMAD

CONFIDENCE = 0.95
SEED_RESULTS = "eval/final.json"
"""Each seed's evaluation of its last checkpoint, under `seed_<s>/`: its presence means the seed is finished."""


def interval(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (ddof=1) and the 95 % Student-t interval of the mean of `values`.

    `half_width = t.ppf(0.975, n - 1) * sd / sqrt(n)`; `low` and `high` are mean -/+ half_width.
    NaN among the values makes every statistic NaN."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval needs at least 2 values, got {n}")
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    half_width = float(scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / np.sqrt(n))
    return {
        "mean": mean,
        "sd": sd,
        "half_width": half_width,
        "low": mean - half_width,
        "high": mean + half_width,
        "n": n,
    }


def paired_difference(this: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """`interval` of the per-seed differences this[i] - other[i]."""
    if len(this) != len(other):
        raise ValueError(f"a paired difference needs as many values on each side, got {len(this)} and {len(other)}")
    return interval(np.asarray(this, dtype=np.float64) - np.asarray(other, dtype=np.float64))


def seed_directory(workdir: epath.Path, seed: int) -> epath.Path:
    return workdir / f"seed_{seed}"


def _rows(summary: dict, where: str) -> dict[tuple[str, str], dict[str, float]]:
    """A summary's rows `{(dataset, class): metrics}`: each class, `(dataset, "mean")`, and both overall means."""
    rows = {}
    for dataset, entry in summary["datasets"].items():
        for name, metrics in entry["classes"].items():
            if name == "mean":
                raise ValueError(f"{where}: dataset {dataset} has a class named 'mean', the name of its mean row")
            rows[dataset, name] = metrics
        rows[dataset, "mean"] = entry["mean"]
    for overall in (report.ALL_CLASS_MEAN, report.ALL_DATASETS_MEAN):
        rows[overall, ""] = summary[overall]
    return rows


def _over_seeds(
    summaries: dict[int, dict], where: str, statistic: Callable[[list[float]], dict]
) -> dict[tuple[str, str], dict[str, dict]]:
    """`statistic` of each metric of each row over the seeds' summaries, which must hold the same rows."""
    rows = {seed: _rows(summary, f"{where} seed {seed}") for seed, summary in summaries.items()}
    first_seed, first = next(iter(rows.items()))
    for seed, seed_rows in rows.items():
        if list(seed_rows) != list(first):
            raise ValueError(
                f"{where}: seed {seed}'s evaluation holds the rows {sorted(seed_rows)}, seed {first_seed}'s "
                f"{sorted(first)}: the seeds of a sweep evaluate the same datasets and classes"
            )
    names = next(iter(summaries.values()))["metric_names"]
    return {key: {m: statistic([rows[s][key][m] for s in rows]) for m in names} for key in first}


def _nested(rows: dict[tuple[str, str], dict], metric_names: list[str]) -> dict:
    """`_rows`'s flat keys back into a summary's layout."""
    nested = {"metric_names": list(metric_names), "datasets": {}}
    for (dataset, name), value in rows.items():
        if name == "":
            nested[dataset] = value
        elif name == "mean":
            nested["datasets"].setdefault(dataset, {"classes": {}})["mean"] = value
        else:
            nested["datasets"].setdefault(dataset, {"classes": {}})["classes"][name] = value
    return nested


def read_seed_summaries(workdir: epath.Path, seeds: Sequence[int]) -> dict[int, dict]:
    """`{seed: summary}` of `seed_<s>/eval/final.json` under `workdir`; a missing one is an error naming it."""
    paths = {s: seed_directory(workdir, s) / SEED_RESULTS for s in seeds}
    missing = [str(path) for path in paths.values() if not path.exists()]
    if missing:
        raise FileNotFoundError(f"the sweep in {workdir} lacks the results {missing}")
    return {s: json.loads(path.read_text()) for s, path in paths.items()}


def sweep_results(summaries: dict[int, dict], where: str = "sweep") -> dict:
    """results.json's content from each seed's evaluation summary (with its `"paper"` comparison)."""
    seeds = list(summaries)
    names = next(iter(summaries.values()))["metric_names"]
    results = {
        "seeds": seeds,
        "confidence": CONFIDENCE,
        **_nested(_over_seeds(summaries, where, interval), names),
    }
    paper = {}
    for benchmark, first in summaries[seeds[0]].get("paper", {}).items():
        if not all(benchmark in summary.get("paper", {}) for summary in summaries.values()):
            continue
        ours = interval([summary["paper"][benchmark]["ours_percent"] for summary in summaries.values()])
        paper[benchmark] = {
            **{k: first[k] for k in ("datasets", "metric", "paper_percent", "source")},
            "ours_percent": ours,
            "difference_points": ours["mean"] - first["paper_percent"],
        }
    results["paper"] = paper
    return results


def _check_same_seeds(seeds: Sequence[int], other_seeds: Sequence[int], other: str) -> None:
    this_only, other_only = sorted(set(seeds) - set(other_seeds)), sorted(set(other_seeds) - set(seeds))
    if this_only or other_only:
        raise ValueError(
            f"sweep.compare_with={other}: the paired difference needs the same seeds on both sides; "
            f"seeds {this_only} are only in this sweep, {other_only} only in {other}"
        )


def compared_results(
    summaries: dict[int, dict], other_summaries: dict[int, dict], other: str, where: str = "sweep"
) -> dict:
    """The paired difference (this - other) of every metric of every row over the shared seeds."""
    _check_same_seeds(list(summaries), list(other_summaries), other)
    seeds = list(summaries)
    this_rows = _over_seeds(summaries, where, lambda values: values)
    other_rows = _over_seeds({s: other_summaries[s] for s in seeds}, other, lambda values: values)
    if list(this_rows) != list(other_rows):
        raise ValueError(
            f"sweep.compare_with={other} evaluates the rows {sorted(other_rows)}, this sweep {sorted(this_rows)}: "
            "a paired difference compares the same datasets and classes"
        )
    difference = {
        key: {m: paired_difference(values, other_rows[key][m]) for m, values in metrics.items()}
        for key, metrics in this_rows.items()
    }
    names = next(iter(summaries.values()))["metric_names"]
    return {"directory": other, **_nested(difference, names)}


def _seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    seed_config = config.copy_and_resolve_references()
    with seed_config.unlocked():
        seed_config.seed = seed
    return seed_config


def _finished_seed(config: ml_collections.ConfigDict, directory: epath.Path) -> None:
    """Train (or resume) one seed's run in `directory` and evaluate its last state, unless already done."""
    if (directory / SEED_RESULTS).exists():
        if sharding.is_main_process():
            print(f"seed {config.seed}: finished, results in {directory / SEED_RESULTS}")
        return
    state = loop.train_and_evaluate(config, directory)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    summary = evaluate.evaluate(UniMMAD(model_config(config)), variables, config, sharding.data_mesh())
    summary["paper"] = report.compare_with_paper(summary)
    if sharding.is_main_process():  # written last: its presence means the seed is finished
        report.write_summary(summary, directory / "eval", "final")


def run_sweep(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Train and evaluate `config` once per seed of `sweep.seeds`, then write `<workdir>/sweep/results.{json,md}`."""
    workdir = checkpoints.workdir_path(workdir)
    seeds = [int(s) for s in config.sweep.seeds]
    if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"sweep.seeds={tuple(config.sweep.seeds)}: a sweep needs at least 2 seeds, each once")
    other = config.sweep.compare_with
    if other:  # checked before any training: a sweep that cannot be compared stops at once
        other_results = checkpoints.workdir_path(other) / "sweep" / "results.json"
        if not other_results.exists():
            raise FileNotFoundError(
                f"sweep.compare_with={other} has no {other_results}: run that sweep (--mode=sweep) first"
            )
        _check_same_seeds(seeds, json.loads(other_results.read_text())["seeds"], other)
    for i, seed in enumerate(seeds):
        if sharding.is_main_process():
            print(f"\nSweep seed {seed} ({i + 1}/{len(seeds)})")
        _finished_seed(_seed_config(config, seed), seed_directory(workdir, seed))
    summaries = read_seed_summaries(workdir, seeds)
    results = sweep_results(summaries, str(workdir))
    if other:
        other_dir = checkpoints.workdir_path(other)
        results["compared_with"] = compared_results(
            summaries, read_seed_summaries(other_dir, seeds), other, str(workdir)
        )
    if sharding.is_main_process():
        markdown = report.sweep_markdown(results)
        path = report.write_tables(results, markdown, workdir / "sweep", "results")
        print(f"\n{markdown}\nwrote {path} and results.md")
    return results
