"""Reports of results: the metrics summary over datasets, the paper's numbers beside ours, and every table and plot.

``summarize_metrics`` turns ``{dataset: {class: metrics}}`` (``metrics.compute_metrics`` per class)
into per-class rows, per-dataset means and two overall means; NaN propagates into every mean it
enters, so no average is silently taken over fewer classes.  Every Markdown table is written by
``markdown_table`` and every console table by ``text_table``.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
from etils import epath

from unimmad_jax.metrics import METRIC_NAMES

DISPLAY_NAMES = {
    "i_auroc": "I-AUROC",
    "i_ap": "I-AP",
    "i_f1max": "I-F1max",
    "p_auroc": "P-AUROC",
    "p_f1max": "P-F1max",
    "aupro_0.3": "AUPRO@30%",
    "p_ap": "P-AP",
}
# A dataset's mean over its classes, and its metrics over all its classes' scores in one curve.
MEAN_ROW = "mean"
POOLED_ROW = "pooled (one curve)"
ALL_CLASS_MEAN = "All_Class_Mean"
ALL_DATASETS_MEAN = "All_Datasets_Mean"
PAPER_RESULTS = "paper_results.json"
"""The paper's reported results, package data of `unimmad_jax`."""
PAPER_TITLE = f"Beside the paper's results (unimmad_jax/{PAPER_RESULTS}; difference in points):"


def display_name(metric: str) -> str:
    return DISPLAY_NAMES.get(metric, metric)


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


# ----------------------------------------------------------------------------
# Table writers
# ----------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of text cells, ending in a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def text_table(header: list[str], rows: list[list[str]], name_columns: int) -> str:
    """Aligned columns for a console: the first ``name_columns`` left-aligned, numbers right-aligned."""
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]

    def line(cells):
        names = [cell.ljust(width) for cell, width in zip(cells[:name_columns], widths)]
        numbers = [cell.rjust(width) for cell, width in zip(cells[name_columns:], widths[name_columns:])]
        return "  ".join(names + numbers).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, rows)]) + "\n"


# ----------------------------------------------------------------------------
# The metrics summary over datasets
# ----------------------------------------------------------------------------


def summarize_metrics(
    results: dict[str, dict[str, dict[str, float]]], pooled: dict[str, dict[str, float]] | None = None
) -> dict:
    """Per-class rows, per-dataset means and the two overall means.

    Args:
      results: ``{dataset: {class: metrics}}``, each ``metrics`` holding every key
        of ``METRIC_NAMES``.
      pooled: ``{dataset: metrics}`` over all the dataset's classes in one curve (``evaluate.pooled_metrics``),
        a few of ``METRIC_NAMES``; each dataset's entry holds it as ``"pooled"``.

    Returns a JSON-ready dict of raw floats (NaN stays NaN and propagates into
    every mean it enters)::

      {"metric_names": [...],
       "datasets": {dataset: {"classes": {class: metrics}, "mean": metrics, "pooled": metrics}},
       "All_Class_Mean": metrics,     # mean over all classes of all datasets
       "All_Datasets_Mean": metrics}  # mean of the dataset means
    """
    if not results or not all(results.values()):
        raise ValueError("summarize_metrics needs at least one dataset, each with at least one class")
    datasets = {}
    for dataset, classes in results.items():
        rows = {name: _metric_row(metrics, f"{dataset}/{name}") for name, metrics in classes.items()}
        datasets[dataset] = {"classes": rows, "mean": _mean_row(rows.values())}
        if pooled is not None:
            datasets[dataset]["pooled"] = {name: float(value) for name, value in pooled[dataset].items()}
    all_classes = [row for entry in datasets.values() for row in entry["classes"].values()]
    return {
        "metric_names": list(METRIC_NAMES),
        "datasets": datasets,
        ALL_CLASS_MEAN: _mean_row(all_classes),
        ALL_DATASETS_MEAN: _mean_row(entry["mean"] for entry in datasets.values()),
    }


def _metric_row(metrics: dict[str, float], where: str) -> dict[str, float]:
    missing = [name for name in METRIC_NAMES if name not in metrics]
    if missing:
        raise ValueError(f"metrics of {where} lack {missing}")
    return {name: float(metrics[name]) for name in METRIC_NAMES}


def _mean_row(rows) -> dict[str, float]:
    table = np.array([[row[name] for name in METRIC_NAMES] for row in rows], dtype=np.float64)
    return dict(zip(METRIC_NAMES, map(float, table.mean(axis=0))))


def paper_results() -> list[dict]:
    """The paper's results (`unimmad_jax/paper_results.json`): benchmark, our datasets, metric, percent, source."""
    return json.loads(resources.files("unimmad_jax").joinpath(PAPER_RESULTS).read_text())["results"]


def compare_with_paper(summary: dict) -> dict[str, dict]:
    """``{benchmark: comparison}`` for each paper result whose datasets ``summary`` all holds.

    Ours is the mean of those datasets' means; values are in percent, the difference
    (ours - paper) in points.
    """
    comparison = {}
    for result in paper_results():
        datasets, metric = result["datasets"], result["metric"]
        if not set(datasets) <= set(summary["datasets"]):
            continue
        ours = 100 * float(np.mean([summary["datasets"][name]["mean"][metric] for name in datasets]))
        comparison[result["benchmark"]] = {
            "datasets": datasets,
            "metric": metric,
            "ours_percent": ours,
            "paper_percent": result["percent"],
            "difference_points": ours - result["percent"],
            "source": result["source"],
        }
    return comparison


def summary_markdown(summary: dict) -> str:
    """A Markdown table of ``summarize_metrics``'s output, metrics in percent with 2 decimals; then, where the
    summary holds a ``"paper"`` comparison (``compare_with_paper``), a table of it."""
    text = markdown_table(*_summary_cells(summary))
    if summary.get("paper"):
        text += f"\n{PAPER_TITLE}\n\n" + markdown_table(*_paper_cells(summary["paper"]))
    return text


def summary_text(summary: dict) -> str:
    """``summary_markdown``'s tables for a console: aligned columns."""
    text = text_table(*_summary_cells(summary), name_columns=2)
    if summary.get("paper"):
        text += f"\n{PAPER_TITLE}\n" + text_table(*_paper_cells(summary["paper"]), name_columns=3)
    return text


def write_summary(summary: dict, directory: epath.PathLike, name: str) -> epath.Path:
    """`<name>.json` and `<name>.md` (`summary_markdown`) in `directory` (local or `gs://`); the JSON path."""
    return write_tables(summary, summary_markdown(summary), directory, name)


def _summary_cells(summary: dict, cell=percent) -> tuple[list[str], list[list[str]]]:
    """Header and rows of text cells: each class, each dataset's mean and pooled metrics, then both overall
    means; `cell` writes a metric's value (a sweep's: its statistics)."""
    names = summary["metric_names"]
    header = ["Dataset", "Class"] + [display_name(name) for name in names]

    def cells(dataset, label, metrics):
        return [dataset, label] + [cell(metrics[name]) if name in metrics else "-" for name in names]

    rows = []
    for dataset, entry in summary["datasets"].items():
        rows += [cells(dataset, name, metrics) for name, metrics in entry["classes"].items()]
        rows.append(cells(dataset, MEAN_ROW, entry["mean"]))
        if "pooled" in entry:
            rows.append(cells(dataset, POOLED_ROW, entry["pooled"]))
    rows.append(cells(ALL_CLASS_MEAN, "", summary[ALL_CLASS_MEAN]))
    rows.append(cells(ALL_DATASETS_MEAN, "", summary[ALL_DATASETS_MEAN]))
    return header, rows


def summarize_modality_subsets(results: dict[str, dict[str, dict[str, dict[str, float]]]], subsets: list[str]) -> dict:
    """The table of a model seen through subsets of the modalities (``evaluate.evaluate_modality_subsets``).

    Args:
      results: ``{dataset: {class: {subset: metrics}}}``, a subset absent where the class lacks one of its
        modalities.
      subsets: the subsets in table order.

    Returns a JSON-ready dict; ``None`` where a class lacks a subset's modalities (n/a), and each dataset's mean
    over the classes that have them::

      {"metric_names": [...], "subsets": [...],
       "datasets": {dataset: {"classes": {class: {subset: metrics or None}},
                              "mean": {subset: {"num_classes": k, "metrics": metrics} or None}}}}
    """
    datasets = {}
    for dataset, classes in results.items():
        rows = {
            name: {
                subset: _metric_row(by_subset[subset], f"{dataset}/{name}/{subset}") if subset in by_subset else None
                for subset in subsets
            }
            for name, by_subset in classes.items()
        }
        means = {}
        for subset in subsets:
            held = [row[subset] for row in rows.values() if row[subset] is not None]
            means[subset] = {"num_classes": len(held), "metrics": _mean_row(held)} if held else None
        datasets[dataset] = {"classes": rows, "mean": means}
    return {"metric_names": list(METRIC_NAMES), "subsets": list(subsets), "datasets": datasets}


def modality_subsets_markdown(summary: dict) -> str:
    """``summarize_modality_subsets``'s table: a row per class or dataset mean and subset, metrics in percent."""
    return markdown_table(*_modality_subsets_cells(summary))


def modality_subsets_text(summary: dict) -> str:
    """``modality_subsets_markdown``'s table for a console."""
    return text_table(*_modality_subsets_cells(summary), name_columns=3)


def _modality_subsets_cells(summary: dict) -> tuple[list[str], list[list[str]]]:
    names = summary["metric_names"]
    header = ["Dataset", "Class", "Modalities"] + [display_name(name) for name in names]

    def cells(dataset, label, subset, metrics):
        return [dataset, label, subset] + [percent(metrics[name]) if metrics else "n/a" for name in names]

    rows = []
    for dataset, entry in summary["datasets"].items():
        for name, by_subset in entry["classes"].items():
            rows += [cells(dataset, name, subset, metrics) for subset, metrics in by_subset.items()]
        for subset, mean in entry["mean"].items():
            held = f"{MEAN_ROW} ({mean['num_classes'] if mean else 0} of {len(entry['classes'])} classes)"
            rows.append(cells(dataset, held, subset, mean and mean["metrics"]))
    return header, rows


def write_tables(record: dict, markdown: str, directory: epath.PathLike, name: str) -> epath.Path:
    """`record` as `<name>.json` and `markdown` as `<name>.md` in `directory` (local or `gs://`); the JSON path."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(record, indent=1))
    (directory / f"{name}.md").write_text(markdown)
    return path


def _paper_cells(
    comparison: dict[str, dict], ours_cell=lambda ours: f"{ours:.2f}"
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of text cells: each benchmark the paper reports, ours (written by `ours_cell`), the paper's
    and the difference."""
    header = ["Paper's benchmark", "Our datasets", "Metric", "Ours", "Paper", "Ours - paper"]
    rows = [
        [
            benchmark,
            ", ".join(entry["datasets"]),
            display_name(entry["metric"]),
            ours_cell(entry["ours_percent"]),
            f"{entry['paper_percent']:.2f}",
            f"{entry['difference_points']:+.2f}",
        ]
        for benchmark, entry in comparison.items()
    ]
    return header, rows


# ----------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------


def calibration_markdown(record: dict, metric_names: tuple[str, ...]) -> str:
    """Per class of a calibration record: the calibration and its test metrics `metric_names`, 3 decimals."""
    header = ["dataset", "class", "calibrated on", "threshold", "min", "max", *metric_names]
    rows = []
    for dataset, entry in record["datasets"].items():
        test = record["test"]["datasets"].get(dataset, {})
        for name, stats in entry["classes"].items():
            on = f"{entry['split']} {stats['good']}+{stats['anomalous']}, {stats['method']}"
            if stats["source"] == "dataset":
                on += " (dataset)"
            metrics = test.get(name, {})
            cells = [dataset, name, on, *(f"{stats[k]:.4f}" for k in ("threshold", "minimum", "maximum"))]
            cells += [f"{metrics[k]:.3f}" if k in metrics else "-" for k in metric_names]
            rows.append(cells)
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------
# Protocols
# ----------------------------------------------------------------------------


def continual_markdown(results: dict) -> str:
    """Per metric: R (rows: after task i, columns: task j), the forgetting of each earlier task, the averages."""
    names = [" + ".join(t) for t in results["tasks"]]
    header = ["after task", *(f"{j + 1}: {n}" for j, n in enumerate(names)), "mean"]
    text = ""
    for metric in results["metrics"]:
        matrix = results["matrix"][metric]
        rows = [[str(i + 1), *map(percent, row), percent(np.mean(row))] for i, row in enumerate(matrix)]
        if "joint" in results:
            joint = results["joint"][metric]
            rows.append(["joint", *map(percent, joint), percent(np.mean(joint))])
        forgotten = list(map(percent, results["forgetting"][metric]))
        forgotten += ["-"] * (len(names) - len(forgotten))
        rows.append(["forgetting", *forgotten, percent(results["average_forgetting"][metric])])
        text += f"### {display_name(metric)} (%)\n\n" + markdown_table(header, rows) + "\n"
    final = ", ".join(f"{display_name(m)} {percent(v)}" for m, v in results["final_average"].items())
    return text + (
        "Forgetting F_j = max over j <= i < T of R[i, j] - R[T, j], T the last task; its mean over the earlier tasks "
        f"in the last column. Final average (mean of the last row): {final}.\n"
    )


def plot_continual_matrix(results: dict, path: epath.Path) -> None:
    """The continual matrices as heat maps, one panel per metric, values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(results["tasks"])
    figure, axes = plt.subplots(1, len(results["metrics"]), figsize=(4.2 * len(results["metrics"]), 3.8))
    for axis, metric in zip(np.atleast_1d(axes), results["metrics"]):
        matrix = 100 * np.array(results["matrix"][metric])
        image = axis.imshow(matrix, cmap="viridis", vmin=min(50.0, matrix.min()), vmax=100.0)
        for (i, j), value in np.ndenumerate(matrix):
            axis.text(j, i, f"{value:.1f}", ha="center", va="center", color="white" if value < 85 else "black")
        axis.set_xticks(range(count), [f"task {j + 1}" for j in range(count)])
        axis.set_yticks(range(count), [f"after {i + 1}" for i in range(count)])
        axis.set_title(f"{display_name(metric)} (%)")
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    with path.open("wb") as file:
        figure.savefig(file, format="png", dpi=110)
    plt.close(figure)


def unified_vs_separate_markdown(results: dict) -> str:
    """Per task: the unified model's value, the separate model's and their difference, in percent."""
    header = ["task"] + [
        f"{display_name(m)} {kind}" for m in results["metrics"] for kind in ("unified", "separate", "diff")
    ]
    rows = []
    for row in results["tasks"]:
        cells = [" + ".join(row["task"])]
        for m in results["metrics"]:
            cells += [percent(row[m]["unified"]), percent(row[m]["separate"]), f"{100 * row[m]['difference']:+.2f}"]
        rows.append(cells)
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------
# Seed sweeps
# ----------------------------------------------------------------------------


def sweep_markdown(results: dict) -> str:
    """A seed sweep's tables (`unimmad_jax.sweep`), in percent: the mean over the seeds with its 95 % interval's
    half-width, the standard deviations, the paper's values beside ours and the paired difference to another sweep."""
    seeds = ", ".join(map(str, results["seeds"]))
    n = len(results["seeds"])
    confidence = f"{100 * results['confidence']:g} %"
    text = (
        f"Over {n} seeds ({seeds}): mean ± half-width of the {confidence} confidence interval (Student t, "
        f"{n - 1} degrees of freedom), in percent.\n\n" + markdown_table(*_summary_cells(results, _mean_and_half_width))
    )
    text += "\nStandard deviation over the seeds (ddof=1), in points:\n\n"
    text += markdown_table(*_summary_cells(results, lambda stats: percent(stats["sd"])))
    if results["paper"]:
        cells = _paper_cells(results["paper"], lambda ours: f"{ours['mean']:.2f} ± {ours['half_width']:.2f}")
        text += f"\n{PAPER_TITLE}\n\n" + markdown_table(*cells)
    if "compared_with" in results:
        compared = results["compared_with"]
        text += (
            f"\nPaired difference, this sweep - {compared['directory']}, seed by seed: mean ± half-width of its "
            f"{confidence} confidence interval, in points:\n\n"
            + markdown_table(*_summary_cells(compared, lambda stats: _mean_and_half_width(stats, signed=True)))
        )
    return text


def _mean_and_half_width(stats: dict, signed: bool = False) -> str:
    mean = f"{100 * stats['mean']:+.2f}" if signed else percent(stats["mean"])
    return f"{mean} ± {percent(stats['half_width'])}"
