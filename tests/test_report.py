"""Tests of unimmad_jax.report: the metrics summary, the paper comparison and the tables."""

import json

import numpy as np
import pytest

from unimmad_jax.metrics import METRIC_NAMES
from unimmad_jax.report import (
    ALL_CLASS_MEAN,
    ALL_DATASETS_MEAN,
    PAPER_TITLE,
    calibration_markdown,
    compare_with_paper,
    continual_markdown,
    markdown_table,
    paper_results,
    summarize_metrics,
    summary_markdown,
    summary_text,
    unified_vs_separate_markdown,
)

# ----------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------


def _constant_metrics(value):
    return dict.fromkeys(METRIC_NAMES, value)


def test_summary_means():
    results = {
        "D1": {"a": _constant_metrics(0.9), "b": _constant_metrics(0.7)},
        "D2": {"c": _constant_metrics(0.2)},
    }
    summary = summarize_metrics(results)
    assert summary["datasets"]["D1"]["mean"]["i_auroc"] == pytest.approx(0.8)
    assert summary["datasets"]["D2"]["mean"]["p_ap"] == pytest.approx(0.2)
    assert summary[ALL_CLASS_MEAN]["aupro_0.3"] == pytest.approx((0.9 + 0.7 + 0.2) / 3)
    assert summary[ALL_DATASETS_MEAN]["aupro_0.3"] == pytest.approx((0.8 + 0.2) / 2)
    assert json.loads(json.dumps(summary)) == summary

    markdown = summary_markdown(summary)
    assert "| Dataset | Class | I-AUROC |" in markdown
    assert "| D1 | mean | 80.00 | 80.00 |" in markdown
    assert "| All_Datasets_Mean |  | 50.00 |" in markdown

    lines = summary_text(summary).splitlines()
    assert len(lines) == 2 + 3 + 2 + 2  # header, rule, classes, dataset means, overall means
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert lines[-2].split()[:2] == [ALL_CLASS_MEAN, "60.00"]


def test_summary_propagates_nan_and_checks_keys():
    undefined_image_auroc = {**_constant_metrics(0.5), "i_auroc": float("nan")}
    results = {"D": {"a": _constant_metrics(0.5), "b": undefined_image_auroc}}
    summary = summarize_metrics(results)
    assert np.isnan(summary[ALL_CLASS_MEAN]["i_auroc"])
    assert summary[ALL_CLASS_MEAN]["p_ap"] == 0.5
    with pytest.raises(ValueError, match=r"metrics of D/a lack \['p_ap'\]"):
        summarize_metrics({"D": {"a": {name: 0.5 for name in METRIC_NAMES if name != "p_ap"}}})


# ----------------------------------------------------------------------------
# The paper's numbers beside ours
# ----------------------------------------------------------------------------

UNIMED = ["mmad_meta/retinaad", "mmad_meta/liverad", "mmad_meta/hyperad"]


def test_paper_results_hold_the_reported_image_aurocs():
    results = {result["benchmark"]: result for result in paper_results()}
    assert {name: (r["datasets"], r["metric"], r["percent"]) for name, r in results.items()} == {
        "MVTec 3D-AD": (["mvtec3d"], "i_auroc", 92.53),
        "Eyecandies": (["eyecandies"], "i_auroc", 85.57),
        "MulSen-AD": (["mulsen_ad"], "i_auroc", 85.46),
        "BraTS": (["mmad_meta/brats"], "i_auroc", 95.84),
        "UniMed": (UNIMED, "i_auroc", 96.34),
    }
    assert all(r["source"] == "UniMMAD, CVPR 2026, unified setting, image AUROC" for r in results.values())
    assert results["UniMed"]["mapping"].startswith("Our reading")


def test_eval_tables_show_the_paper_beside_ours():
    results = {
        "mvtec3d": {"a": _constant_metrics(0.95), "b": _constant_metrics(0.90)},
        "synthetic": {"c": _constant_metrics(0.5)},
        **{name: {"d": _constant_metrics(0.96)} for name in UNIMED[:2]},
    }
    summary = summarize_metrics(results)
    assert PAPER_TITLE not in summary_text(summary)  # training-time tables carry no comparison
    summary["paper"] = compare_with_paper(summary)
    assert list(summary["paper"]) == ["MVTec 3D-AD"]  # not synthetic; not UniMed while hyperad is missing
    mvtec = summary["paper"]["MVTec 3D-AD"]
    assert (mvtec["ours_percent"], mvtec["paper_percent"]) == (pytest.approx(92.5), 92.53)
    assert mvtec["difference_points"] == pytest.approx(-0.03)
    assert json.loads(json.dumps(summary)) == summary

    assert f"{PAPER_TITLE}\n\n| Paper's benchmark |" in summary_markdown(summary)
    assert "| MVTec 3D-AD | mvtec3d | I-AUROC | 92.50 | 92.53 | -0.03 |" in summary_markdown(summary)
    paper_lines = summary_text(summary).split(PAPER_TITLE)[1].strip().splitlines()
    assert len(paper_lines) == 3  # header, rule, MVTec 3D-AD
    assert paper_lines[-1].split() == ["MVTec", "3D-AD", "mvtec3d", "I-AUROC", "92.50", "92.53", "-0.03"]

    results[UNIMED[2]] = {"e": _constant_metrics(0.99)}
    unimed = compare_with_paper(summarize_metrics(results))["UniMed"]
    assert unimed["ours_percent"] == pytest.approx(97.0)  # the mean of the three datasets' means
    assert unimed["difference_points"] == pytest.approx(97.0 - 96.34)


# ----------------------------------------------------------------------------
# Calibration and protocol tables
# ----------------------------------------------------------------------------


def test_markdown_table_rows_and_rule():
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n"


def test_calibration_table_marks_dataset_level_classes():
    stats = {"threshold": 1.5, "minimum": 1.0, "maximum": 2.0, "method": "f1", "good": 3, "anomalous": 2}
    record = {
        "datasets": {
            "d": {
                "split": "validation",
                "classes": {"a": {**stats, "source": "class"}, "b": {**stats, "source": "dataset"}},
            }
        },
        "test": {"datasets": {"d": {"a": {"f1": 0.75}}}},
    }
    lines = calibration_markdown(record, ("f1", "i_auroc")).splitlines()
    assert lines[0] == "| dataset | class | calibrated on | threshold | min | max | f1 | i_auroc |"
    assert lines[2] == "| d | a | validation 3+2, f1 | 1.5000 | 1.0000 | 2.0000 | 0.750 | - |"
    assert lines[3].startswith("| d | b | validation 3+2, f1 (dataset) |")


def test_continual_table_holds_the_matrix_joint_and_forgetting():
    results = {
        "tasks": [["A"], ["B"]],
        "metrics": ["i_auroc"],
        "matrix": {"i_auroc": [[0.9, 0.5], [0.8, 0.7]]},
        "forgetting": {"i_auroc": [0.1]},
        "average_forgetting": {"i_auroc": 0.1},
        "final_average": {"i_auroc": 0.75},
        "joint": {"i_auroc": [0.85, 0.65]},
    }
    text = continual_markdown(results)
    assert "### I-AUROC (%)\n\n| after task | 1: A | 2: B | mean |\n|---|---|---|---|\n" in text
    assert (
        "| 2 | 80.00 | 70.00 | 75.00 |\n| joint | 85.00 | 65.00 | 75.00 |\n| forgetting | 10.00 | - | 10.00 |\n" in text
    )
    assert text.endswith("Final average (mean of the last row): I-AUROC 75.00.\n")


def test_unified_vs_separate_table_shows_the_difference():
    results = {
        "metrics": ["p_auroc"],
        "tasks": [{"task": ["A", "B"], "p_auroc": {"unified": 0.9, "separate": 0.95, "difference": -0.05}}],
    }
    assert unified_vs_separate_markdown(results).splitlines()[2] == "| A + B | 90.00 | 95.00 | -5.00 |"
