#!/usr/bin/env python
"""BlockSwap on real CIFAR-10, end to end: teacher, search, distillation, evaluation, results page.

Steps:

1. Train the teacher on a CPU-sized schedule, or reuse the cached one
   (``--cache-dir``, keyed by model, subset, epochs and seed).
2. Search a student at ``--budget`` (fraction of the teacher's parameters).
3. Train the winner with attention transfer from the teacher.
4. With ``--compare``, also train on the same schedule: the winner without
   distillation, the single-blocktype student closest to the budget, and a
   random in-budget student (both with attention transfer).
5. Evaluate every model on the whole test split (top-1, parameters, MACs,
   CPU latency at batch 1 and 64) and write ``results.json``. With
   ``--report DIR`` the script also writes ``DIR/results.md`` and ``DIR/results.png``.

Example::

    python tools/cifar_pipeline.py --data ../shared/data/cifar10 --output output/cifar_pipeline
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import blockswap_plugin as bp  # noqa: E402
from blockswap_plugin.core.genotype import write_json_atomic  # noqa: E402
from blockswap_plugin.timm.data import load_minibatch  # noqa: E402
from blockswap_plugin.timm.spaces import create_space  # noqa: E402
from train_timm import create_loaders, evaluate, load_config, run_train  # noqa: E402

_logger = logging.getLogger("cifar_pipeline")

# results.md may hold other sections; the script rewrites only the text between these two lines.
REPORT_START = "<!-- cifar_pipeline.py: start of generated section -->"
REPORT_END = "<!-- cifar_pipeline.py: end of generated section -->"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/cifar10", help="folder with train.tar and test.tar")
    parser.add_argument("--output", default="output/cifar_pipeline", help="folder for checkpoints and results.json")
    cache = os.environ.get("BLOCKSWAP_CACHE", os.path.expanduser("~/.cache/blockswap-plugin"))
    parser.add_argument("--cache-dir", default=os.path.join(cache, "teachers"),
                        help="folder of cached teacher checkpoints (default: $BLOCKSWAP_CACHE/teachers)")
    parser.add_argument("--teacher", default="wrn_16_2", help="teacher model name (a CIFAR wide ResNet)")
    parser.add_argument("--train-subset", type=int, default=0, help="training images used (0 for all 50,000)")
    parser.add_argument("--monitor-subset", type=int, default=1000,
                        help="test images for the per-epoch log (the final evaluation uses all of them)")
    parser.add_argument("--test-subset", type=int, default=0,
                        help="test images for the final evaluation (0 for all 10,000; smaller only for smoke runs)")
    parser.add_argument("--teacher-epochs", type=int, default=6, help="teacher training epochs")
    parser.add_argument("--student-epochs", type=int, default=4, help="student training epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--lr", type=float, default=0.1, help="initial SGD learning rate (cosine to 0)")
    parser.add_argument("--budget", type=float, default=0.25, help="student budget, fraction of teacher parameters")
    parser.add_argument("--samples", type=int, default=100, help="candidates scored by the search")
    parser.add_argument("--beta", type=float, default=1000.0, help="attention transfer weight")
    parser.add_argument("--seed", type=int, default=0, help="seed of data subset, search and training")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--no-amp", dest="amp", action="store_false",
                        help="train in fp32 with contiguous tensors instead of bf16 autocast and channels-last")
    parser.add_argument("--compare", action="store_true", help="also train the three baseline students")
    parser.add_argument("--report", help="folder to write results.md and results.png into (for example docs)")
    parser.add_argument("--report-only", metavar="RESULTS_JSON",
                        help="skip training and write the --report folder from an earlier results.json")
    return parser.parse_args(argv)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} CPU"


def command_line(args: argparse.Namespace) -> str:
    """Return the command that repeats this run, with every setting spelled out (defaults change over time)."""
    parts = ["python tools/cifar_pipeline.py"]
    for key, value in vars(args).items():
        if key == "amp":
            parts += [] if value else ["--no-amp"]
        elif key not in ("report_only", "cache_dir", "output") and value is not None and value is not False:
            flag = "--" + key.replace("_", "-")
            parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def base_config(args: argparse.Namespace, output: Path, epochs: int) -> Dict[str, Any]:
    overrides = [
        f"model={args.teacher}", f"data_dir={args.data}", f"train_subset={args.train_subset}",
        f"val_subset={args.monitor_subset}", f"epochs={epochs}", f"batch_size={args.batch_size}",
        f"lr={args.lr}", f"workers={args.workers}", f"seed={args.seed}", f"output={output}", "cutout=0",
        "log_interval=100", f"amp={str(args.amp).lower()}", f"channels_last={str(args.amp).lower()}",
    ]
    return load_config(None, overrides)


def teacher_checkpoint(args: argparse.Namespace) -> Tuple[Path, bool]:
    """Return the cached teacher checkpoint and whether it was cached, training and caching it when absent."""
    # The data enters the key through its path and size, so another CIFAR-10 copy trains its own teacher.
    train_tar = Path(args.data).resolve() / "train.tar"
    size = train_tar.stat().st_size if train_tar.exists() else 0
    data_tag = hashlib.sha1(f"{train_tar}:{size}".encode()).hexdigest()[:8]
    key = f"{args.teacher}_{data_tag}_n{args.train_subset}_e{args.teacher_epochs}_b{args.batch_size}_s{args.seed}"
    key += "_bf16.pth.tar" if args.amp else "_fp32.pth.tar"
    cached = Path(args.cache_dir) / key
    if cached.is_file():
        _logger.info("teacher loaded from cache %s", cached)
        return cached, True
    output = Path(args.output) / "teacher"
    run_train(base_config(args, output, args.teacher_epochs), rank=0, world_size=1)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".tmp")
    shutil.copyfile(output / "last.pth.tar", partial)
    os.replace(partial, cached)
    _logger.info("teacher cached at %s", cached)
    return cached, False


def single_type_genotype(space, target: float) -> List[str]:
    """Return the one-type genotype whose parameter count is closest to ``target``."""
    best = None
    for name in space.block_types:
        if all(name in space.params[i] for i in range(len(space))):
            blocks = [name] * len(space)
            gap = abs(space.count_params(blocks) - target)
            if best is None or gap < best[0]:
                best = (gap, blocks)
    return best[1]


def train_student(args, name: str, blocks: List[str], teacher: Path, distil: bool) -> Path:
    output = Path(args.output) / name
    genotype_path = output / "genotype.json"
    bp.Genotype(args.teacher, blocks).save(genotype_path)
    config = base_config(args, output, args.student_epochs)
    config["student"] = {"genotype": str(genotype_path)}
    config["teacher"] = {"model": args.teacher, "checkpoint": str(teacher)} if distil else None
    config["distill"] = {"beta": args.beta, "kd_weight": 0.0}
    run_train(config, rank=0, world_size=1)
    return output / "last.pth.tar"


@torch.inference_mode()
def latency_ms(model: torch.nn.Module, batch: int, repeats: int) -> float:
    """Median wall time (ms) of one forward pass at ``batch`` x 3 x 32 x 32, after 3 warm-up passes."""
    model.eval()
    x = torch.randn(batch, 3, 32, 32)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(args, label: str, model: torch.nn.Module, test_loader) -> Dict[str, Any]:
    metrics = evaluate(model, test_loader, torch.device("cpu"))
    row = {
        "model": label,
        "top1": round(metrics["top1"], 2),
        "test_images": metrics["images"],
        "params": bp.count_params(model),
        "macs": bp.count_macs(model, (1, 3, 32, 32)),
        "latency_b1_ms": round(latency_ms(model, 1, 30), 2),
        "latency_b64_ms": round(latency_ms(model, 64, 5), 1),
        "genotype": list(getattr(getattr(model, "blockswap_genotype", None), "blocks", []) or []),
    }
    _logger.info("%s: top-1 %.2f %%, %d params", label, row["top1"], row["params"])
    return row


def print_table(results: Dict[str, Any]) -> None:
    """Print the results as a plain-text table on stdout."""
    print(f"{'model':<28} {'top-1 %':>8} {'params':>10} {'MACs':>9} {'b=1 ms':>8} {'b=64 ms':>8}")
    for row in results["rows"]:
        print(f"{row['model']:<28} {row['top1']:>8.2f} {row['params']:>10,} {row['macs'] / 1e6:>8.1f}M "
              f"{row['latency_b1_ms']:>8.2f} {row['latency_b64_ms']:>8.1f}")


def write_report(results: Dict[str, Any], folder: Path) -> None:
    """Write results.md (table and settings) and results.png (top-1 against parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = results["rows"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for row in rows:
        axis.scatter(row["params"] / 1e3, row["top1"], s=40)
        axis.annotate(row["model"], (row["params"] / 1e3, row["top1"]), fontsize=7,
                      xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel("parameters (thousands)")
    axis.set_ylabel(f"top-1 on {rows[0]['test_images']:,} CIFAR-10 test images (%)")
    axis.set_title("BlockSwap on a CPU-sized CIFAR-10 schedule")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    partial = folder / ".results.png.tmp.png"
    figure.savefig(partial, dpi=120)
    os.replace(partial, folder / "results.png")

    settings = results["settings"]
    lines = [
        "## BlockSwap on real CIFAR-10 (CPU-sized schedule)",
        "",
        "Produced by `tools/cifar_pipeline.py`; rerun it to reproduce. Command:",
        "",
        f"    {results['command']}",
        "",
        f"Machine: {settings['machine']}, {settings['threads']} torch threads, torch {settings['torch']}, "
        f"timm {settings['timm']}. Wall time of this run: {results['seconds'] / 60:.1f} minutes"
        + (" (teacher loaded from the cache of an earlier run of the same command)."
           if settings.get("teacher_cached") else ", teacher training included."),
        "",
        f"Schedule: {settings['train_subset'] or 50000} training images, teacher {settings['teacher_epochs']} "
        f"epochs, students {settings['student_epochs']} epochs, SGD momentum 0.9, lr {settings['lr']} cosine, "
        f"batch {settings['batch_size']}, weight decay 5e-4, padded crop and flip (no Cutout). "
        f"Search: {settings['samples']} candidates at {settings['budget']:.0%} of the teacher's parameters "
        f"(+-2.5 %), one minibatch of 128 training images. Attention transfer beta {settings['beta']:g}. "
        + ("Training runs under bf16 autocast with channels-last tensors; evaluation in fp32."
           if settings.get("amp") else "Training and evaluation in fp32."),
        "",
        f"Top-1 on {rows[0]['test_images']:,} test images; MACs at 32x32.",
        "",
        "| model | top-1 (%) | params | MACs | latency b=1 (ms) | latency b=64 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['top1']:.2f} | {row['params']:,} | {row['macs'] / 1e6:.1f}M | "
            f"{row['latency_b1_ms']:.2f} | {row['latency_b64_ms']:.1f} |"
        )
    lines += ["", "Genotypes:", ""]
    for row in rows:
        if row["genotype"]:
            lines.append(f"- {row['model']}: {' '.join(row['genotype'])}")
    lines += ["", "![top-1 against parameters](results.png)", ""]
    by_name = {row["model"]: row for row in rows}
    ours = by_name.get("BlockSwap + AT")
    if ours is not None:
        lines += ["Top-1 of BlockSwap + AT against each other row on this run:", ""]
        for row in rows:
            if row is not ours:
                lines.append(f"- {row['model']}: {ours['top1'] - row['top1']:+.2f} points")
        if "elapsed_s" in ours:
            lines += [
                "",
                f"The steps that `tools/main_job.sh` runs (teacher, search, BlockSwap + AT, evaluation) reached "
                f"the BlockSwap + AT row {ours['elapsed_s'] / 60:.1f} minutes after the start of this run.",
            ]
        lines.append("")
    lines += [
        "NOTE: one short run per row on a 2-core CPU, one seed. Accuracies are far below the paper's",
        "200-epoch figures (WRN-40-2 teacher 3.96 % error), and differences of a point or two between",
        "students are within the spread of one short run. Latencies are medians of 30 (batch 1) and 5",
        "(batch 64) forward passes and move with the machine's load.",
        "",
    ]
    text = "\n".join([REPORT_START, *lines, REPORT_END]) + "\n"
    page = folder / "results.md"
    if not page.exists():
        text = "# Results\n\n" + text
    else:
        # Keep the text that the page contains outside this script's section (the detector results, for example).
        old = page.read_text(encoding="utf-8")
        if REPORT_START in old and REPORT_END in old:
            head, rest = old.split(REPORT_START, 1)
            text = head + text + rest.split(REPORT_END, 1)[1]
    partial = folder / ".results.md.tmp"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, page)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.report_only:
        if not args.report:
            print("cifar_pipeline: error: --report-only needs --report DIR", file=sys.stderr)
            return 2
        write_report(json.loads(Path(args.report_only).read_text()), Path(args.report))
        return 0

    missing = [name for name in ("train.tar", "test.tar") if not (Path(args.data) / name).exists()]
    if missing:
        print(f"cifar_pipeline: error: {', '.join(missing)} not found in --data {args.data}; pass the folder "
              "that contains CIFAR-10's train.tar and test.tar (class-folder tar files)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    try:
        teacher_path, teacher_cached = teacher_checkpoint(args)
        teacher = timm.create_model(args.teacher, num_classes=10)
        teacher.load_state_dict(torch.load(teacher_path, map_location="cpu", weights_only=False)["state_dict"])

        images, labels, _ = load_minibatch(str(Path(args.data) / "train.tar"), 128, args.seed, (3, 32, 32))
        searched = bp.blockswap(teacher, (images, labels), args.budget, num_samples=args.samples, seed=args.seed)
        winner = list(searched.blockswap_genotype.blocks)
        result = searched.blockswap_search.result
        write_json_atomic(Path(args.output) / "search.json", result.to_dict())

        students = {"BlockSwap + AT": (winner, True)}
        if args.compare:
            space, _ = create_space(teacher, (3, 32, 32))
            random_pick = next(c for c in result.candidates if c.blocks != winner)
            students["BlockSwap, no distillation"] = (winner, False)
            students["single blocktype + AT"] = (single_type_genotype(space, result.budgets[0].target), True)
            students["random in-budget + AT"] = (random_pick.blocks, True)

        config = base_config(args, Path(args.output), 1)
        config["val_subset"] = args.test_subset
        _, test_loader = create_loaders(config, distributed=False, train=False)
        results = {
            "command": command_line(args),
            "seconds": 0.0,
            "settings": {
                **{k: v for k, v in vars(args).items() if k not in ("report", "report_only")},
                "machine": f"{cpu_model()}, {os.cpu_count()} cores",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "timm": timm.__version__,
                "teacher_cached": teacher_cached,
            },
            "rows": [],
        }
        jobs = [(f"teacher {args.teacher}", None)] + list(students.items())
        for index, (label, student) in enumerate(jobs):
            if student is None:
                model = teacher
            else:
                blocks, distil = student
                model = bp.load_student(train_student(args, f"student_{index - 1}", blocks, teacher_path, distil))
            row = measure(args, label, model, test_loader)
            # Wall time from the start up to this row, so one --compare run also times the plain pipeline.
            row["elapsed_s"] = round(time.perf_counter() - started, 1)
            results["rows"].append(row)
            # Written after every row, so an interrupted run keeps what it measured.
            results["seconds"] = time.perf_counter() - started
            write_json_atomic(Path(args.output) / "results.json", results)
    except bp.BlockSwapError as exc:
        _logger.error("%s", exc)
        print(f"cifar_pipeline: error: {exc}", file=sys.stderr)
        return 2

    if args.report:
        write_report(results, Path(args.report))
    print_table(results)
    _logger.info("pipeline finished in %.1f minutes", results["seconds"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
