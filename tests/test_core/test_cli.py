"""The blockswap command on real CIFAR-10: blocks, count, search and its input errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from blockswap_plugin import cli



@pytest.fixture
def run(capsys):
    """Run the command in this process (start-up of a new interpreter costs seconds per call)."""

    def invoke(*args):
        capsys.readouterr()
        returncode = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, returncode, captured.out, captured.err)

    return invoke


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("blockswap: error:")]
    assert len(error_lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_console_script_installed():
    script = Path(sys.executable).parent / "blockswap"
    assert script.exists(), "run tools/install.sh to install the 'blockswap' console script"


def test_blocks_lists_pool(run):
    result = run("blocks")
    assert result.returncode == 0
    assert "DConvA4" in result.stdout
    assert "BG(2,M/8)" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1 + 23


def test_count_json_teacher(run):
    result = run("count", "wrn_40_2", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["params"] == 2_243_546
    assert isinstance(data["macs"], int)
    assert data["macs"] > 0


def test_count_paper_genotype(run, tmp_path, paper_genotypes):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(paper_genotypes["cifar10_wrn_40_2"]["bs404k"]))
    result = run("count", "wrn_40_2", "--genotype", path, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["params"] == 404_250


def test_count_input_size_changes_macs(run):
    small = json.loads(run("count", "wrn_16_1", "--json").stdout)
    large = json.loads(run("count", "wrn_16_1", "--json", "--input-size", "3", "64", "64").stdout)
    assert small["params"] == large["params"]
    assert large["macs"] > 3.9 * small["macs"]


def test_count_unknown_block_name(run, tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"model": "wrn_40_2", "blocks": ["Conv"] * 17 + ["DConvA3"]}))
    assert_one_line_error(run("count", "wrn_40_2", "--genotype", path), "DConvA3", "block 18 of 18", "blockswap blocks")


def test_count_wrong_length_genotype(run, tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"model": "wrn_40_2", "blocks": ["Conv"] * 6}))
    assert_one_line_error(run("count", "wrn_40_2", "--genotype", path), "6 blocks", "18")


def test_count_genotype_folder_or_missing(run, tmp_path):
    assert_one_line_error(run("count", "wrn_40_2", "--genotype", tmp_path), str(tmp_path), "is a folder")
    missing = tmp_path / "none.json"
    assert_one_line_error(run("count", "wrn_40_2", "--genotype", missing), "genotype file not found", str(missing))


def test_search_impossible_budget(run, tmp_path, cifar_train):
    out = tmp_path / "x.json"
    result = run("search", "wrn_40_2", "--data", cifar_train, "--budget-params", 50_000, "--samples", 2, "--out", out)
    assert_one_line_error(result, "50,000", "84,410", "2,243,546")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "options, message",
    [(["--budget-latency-ms", -3], "--budget-latency-ms must be positive, got -3"),
     (["--budget-params", 0], "--budget-params must be positive, got 0"),
     (["--budget-macs", 4e7, "--tolerance", 1.5], "--tolerance must be between 0 and 1, got 1.5")],
)
def test_search_bad_budget_fails_first(run, tmp_path, options, message):
    # The data folder contains no images, so reading it would fail with another
    # error: the budget error must come first, before the data is read or a
    # latency table is measured.
    out = tmp_path / "x.json"
    result = run("search", "wrn_40_2", "--data", tmp_path, *options, "--out", out)
    assert_one_line_error(result, message)
    assert list(tmp_path.iterdir()) == []


def test_search_missing_data(run, tmp_path):
    out = tmp_path / "x.json"
    missing = tmp_path / "no-such-cifar" / "train.tar"
    result = run("search", "wrn_40_2", "--data", missing, "--budget-params", 400_000, "--out", out)
    assert_one_line_error(result, str(missing), "--data")
    assert not out.exists()


def test_search_one_class_data(run, tmp_path):
    # A folder with a single class folder: every Fisher potential would be 0.
    from PIL import Image

    images = tmp_path / "data" / "only"
    images.mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (32, 32), (index * 40, 0, 0)).save(images / f"{index}.png")
    out = tmp_path / "x.json"
    result = run("search", "wrn_16_2", "--data", tmp_path / "data", "--budget-params", 100_000, "--batch-size", 2,
                 "--out", out)
    assert_one_line_error(result, "1 class", "at least 2 classes")
    assert not out.exists()


def test_search_out_under_a_file(run, tmp_path, cifar_train):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    out = blocker / "x.json"
    result = run("search", "wrn_40_2", "--data", cifar_train, "--budget-params", 400_000, "--samples", 2, "--out", out)
    assert_one_line_error(result, str(out), "choose another path")


def test_search_bad_input_leaves_no_folder(run, tmp_path, cifar_train):
    out = tmp_path / "new" / "sub" / "x.json"
    result = run("search", "wrn_40_2", "--data", cifar_train, "--budget-params", 1_000, "--samples", 2, "--out", out)
    assert_one_line_error(result, "genotypes reach")
    assert not (tmp_path / "new").exists()


def test_count_genotype_of_another_model(run, tmp_path):
    path = tmp_path / "g.json"
    path.write_text('{"model": "wrn_16_2", "blocks": ["Conv", "Conv", "Conv", "Conv", "Conv", "Conv"]}')
    result = run("count", "wrn_16_1", "--genotype", path)
    assert_one_line_error(result, "'wrn_16_2', not 'wrn_16_1'", "blockswap count wrn_16_2")


def test_search_unknown_model(run, tmp_path):
    # The data folder contains no images: the model name must be rejected before the data is read.
    result = run("search", "no_such_net", "--data", tmp_path, "--budget-params", 1000, "--out", tmp_path / "x.json")
    assert_one_line_error(result, "no_such_net")
    assert list(tmp_path.iterdir()) == []


def test_search_empty_data_folder(run, tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    result = run("search", "wrn_16_2", "--data", data, "--budget-params", 100_000, "--out", tmp_path / "x.json")
    assert_one_line_error(result, str(data), "one subfolder of images per class")
    assert not (tmp_path / "x.json").exists()


def test_search_on_cifar_is_reproducible(tmp_path, cifar_train):
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    log_lines = []
    for out, extra in zip(outs, ([], ["--quiet"])):
        # A real process through the console script, as a user runs it; the second one with --quiet.
        result = subprocess.run(
            [str(Path(sys.executable).parent / "blockswap"), "search", "wrn_40_2", "--data", str(cifar_train),
             "--budget-params", "400000", "--samples", "20", "--seed", "0", "--out", str(out), *extra],
            capture_output=True, text=True, timeout=900,
        )
        assert result.returncode == 0, result.stderr
        assert "Top 10 of 20 candidates" in result.stdout
        log_lines.append([line for line in result.stderr.splitlines() if " INFO " in line])
    assert any("search finished" in line for line in log_lines[0])
    assert log_lines[1] == []
    first, second = (json.loads(out.read_text()) for out in outs)
    winner = first["winner"]
    assert abs(winner["params"] - 400_000) < 0.025 * 400_000
    assert winner["blocks"] == second["winner"]["blocks"]
    assert [c["score"] for c in first["candidates"]] == [c["score"] for c in second["candidates"]]
    assert len(first["candidates"]) == 20
    assert first["seed"] == 0
    assert first["budgets"][0]["target"] == 400_000
    assert max(c["score"] for c in first["candidates"]) == winner["fisher_potential"]


@pytest.mark.parametrize(
    "name", ["BLOCKSWAP_FUSED", "BLOCKSWAP_BLOCK_CACHE", "BLOCKSWAP_BLOCK_CACHE_MB", "BLOCKSWAP_HUGE_PAGES"]
)
def test_bad_switch_fails_first(run, tmp_path, monkeypatch, name):
    # The data folder contains no images: the switch must be rejected before the data is read.
    monkeypatch.setenv(name, "nope")
    result = run("search", "wrn_40_2", "--data", tmp_path, "--budget-params", 400_000, "--out", tmp_path / "x.json")
    assert_one_line_error(result, name, "'nope'")
    assert list(tmp_path.iterdir()) == []
    assert_one_line_error(run("kernel"), name)


def test_kernel_reports_block_cache(run, monkeypatch):
    monkeypatch.delenv("BLOCKSWAP_BLOCK_CACHE", raising=False)
    monkeypatch.delenv("BLOCKSWAP_HUGE_PAGES", raising=False)
    monkeypatch.setenv("BLOCKSWAP_BLOCK_CACHE_MB", "256")
    assert "block cache: on, limit 256 MB (BLOCKSWAP_BLOCK_CACHE_MB), huge pages requested" in run("kernel").stdout
    monkeypatch.setenv("BLOCKSWAP_HUGE_PAGES", "0")
    assert "huge pages turned off by BLOCKSWAP_HUGE_PAGES" in run("kernel").stdout
    monkeypatch.setenv("BLOCKSWAP_BLOCK_CACHE", "off")
    assert "block cache: turned off by BLOCKSWAP_BLOCK_CACHE" in run("kernel").stdout
