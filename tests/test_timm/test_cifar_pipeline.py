"""tools/cifar_pipeline.py at a tiny scale: every stage runs and the report is written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pipeline_tiny_compare_report(tmp_path, cifar_train, cifar_test):
    command = [
        sys.executable, str(REPO / "tools" / "cifar_pipeline.py"), "--data", str(cifar_train.parent),
        "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--teacher", "wrn_16_1",
        "--train-subset", "128", "--monitor-subset", "64", "--test-subset", "128", "--teacher-epochs", "1",
        "--student-epochs", "1", "--samples", "2", "--workers", "0", "--compare", "--report", str(tmp_path / "docs"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    labels = [row["model"] for row in results["rows"]]
    assert labels == ["teacher wrn_16_1", "BlockSwap + AT", "BlockSwap, no distillation",
                      "single blocktype + AT", "random in-budget + AT"]
    assert all(row["test_images"] == 128 for row in results["rows"])
    teacher_params = results["rows"][0]["params"]
    assert 0.975 * 0.25 * teacher_params < results["rows"][1]["params"] < 1.025 * 0.25 * teacher_params
    assert results["rows"][1]["genotype"] == results["rows"][2]["genotype"]
    assert (tmp_path / "docs" / "results.png").stat().st_size > 0
    assert "| BlockSwap + AT |" in (tmp_path / "docs" / "results.md").read_text()
    assert list((tmp_path / "cache").glob("wrn_16_1_*.pth.tar"))

    # A rerun of the report rewrites its own section and keeps the rest of the page.
    page = tmp_path / "docs" / "results.md"
    page.write_text("# Results\n\nintro stays\n\n" + page.read_text().split("\n", 2)[2] + "\n## Detectors\n\nkept\n")
    rerun = subprocess.run(
        [sys.executable, str(REPO / "tools" / "cifar_pipeline.py"), "--report-only",
         str(tmp_path / "out" / "results.json"), "--report", str(tmp_path / "docs")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    text = page.read_text()
    assert text.count("| BlockSwap + AT |") == 1
    assert "intro stays" in text
    assert text.rstrip().endswith("kept")
