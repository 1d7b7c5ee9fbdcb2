"""Benchmark BlockSwap's search against a plain baseline, side by side in one run.

The baseline is the computation that the BlockSwap authors' search code does.
For each candidate it builds and initialises the network, then runs one fp32
forward and backward pass in the default (contiguous) memory layout with
weight gradients on. It runs in this one process with torch's default thread
count. Our search runs with its defaults (fast precision, one scoring thread
per core).

Printed, in one run on the same minibatch of real CIFAR-10 (our search runs
first, then the baseline, then the exact agreement run):

* marginal seconds per candidate (start-up excluded) and peak memory for the
  baseline and for our search, and their ratio;
* our search end to end for ``--samples`` candidates, with resident memory
  after 50 candidates and at the end;
* agreement with exact fp32 scoring over the first ``--agreement-samples``
  candidates: both winners and the Spearman correlation of the scores;
* with ``--latency-samples N``: the winner of a search under a latency
  budget of half the teacher's latency (batch 1, one thread) next to the
  winner of a search under a parameter budget of the same size, with measured
  latency, parameters, MACs and Fisher potential.

Memory is sampled every 0.1 s with psutil: RSS of this process (the search
scores in threads of this process) and PSS (shared pages split between the
processes that map them). Child processes, if any, are added to both.

Example:
    python tools/benchmark_search.py --data ../shared/data/cifar10/train.tar
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import timm  # noqa: E402

import blockswap_plugin.timm  # noqa: E402,F401  (registers wrn_*)
from blockswap_plugin.core.env import env_flag  # noqa: E402
from blockswap_plugin.core.fisher import find_branch_points, fisher_from_activations  # noqa: E402
from blockswap_plugin.core.flops import count_macs, count_params  # noqa: E402
from blockswap_plugin.core.fused import fused_kernel  # noqa: E402
from blockswap_plugin.core.genotype import write_json_atomic  # noqa: E402
from blockswap_plugin.core.init import init_paper_  # noqa: E402
from blockswap_plugin.core.latency import device_name, load_or_build_latency_table, measure_latency  # noqa: E402
from blockswap_plugin.core.workers import default_num_workers, limit_threads  # noqa: E402
from blockswap_plugin.core.sampler import Budget, sample_genotypes  # noqa: E402
from blockswap_plugin.core.scoring import spearman  # noqa: E402
from blockswap_plugin.core.search import candidate_seed, search  # noqa: E402
from blockswap_plugin.timm.data import load_minibatch  # noqa: E402
from blockswap_plugin.timm.spaces import create_space  # noqa: E402

_logger = logging.getLogger("benchmark_search")
GB = 1024**3


class MemorySampler:
    """Background thread that records the peak RSS and PSS of this process and its children."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> Dict[str, int]:
        """RSS and PSS in bytes, summed over this process and its live children."""
        rss = pss = 0
        me = psutil.Process()
        for process in [me, *me.children(recursive=True)]:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        return {"rss": rss, "pss": pss}

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.current()
            self.peak_rss = max(self.peak_rss, now["rss"])
            self.peak_pss = max(self.peak_pss, now["pss"])
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def marginal_seconds(times: List[float], warmup: int) -> float:
    """Seconds per candidate between the ``warmup``-th and the last finish time."""
    if len(times) <= warmup + 1:
        raise ValueError(f"need more than {warmup + 1} timed candidates, got {len(times)}")
    return (times[-1] - times[warmup]) / (len(times) - 1 - warmup)


def baseline_score(build, blocks, images, labels, seed) -> float:
    """Score one candidate as the authors' code does: fp32, contiguous, weight gradients on, loss.backward()."""
    torch.manual_seed(seed)
    model = init_paper_(build(blocks)).train()
    kept = []

    def keep(module, args, output):
        output.retain_grad()
        kept.append(output)

    handles = [p.module.register_forward_hook(keep) for p in find_branch_points(model)]
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    for handle in handles:
        handle.remove()
    return float(sum(fisher_from_activations(a.detach(), a.grad).sum() for a in kept))


def refined_pick(fast: List[float], exact: List[float], refine_top: int) -> int:
    """Return the index our search picks: the top by fast score, rescored exactly until the top is exact."""
    score = list(fast)
    done = set()
    todo = sorted(range(len(fast)), key=lambda i: (-fast[i], i))[:refine_top]
    while todo:
        for i in todo:
            score[i] = exact[i]
            done.add(i)
        top = min(range(len(score)), key=lambda i: (-score[i], i))
        todo = [] if top in done else [top]
    return min(range(len(score)), key=lambda i: (-score[i], i))


def run_baseline(build, genotypes, images, labels, seed: int, count: int, threads: Optional[int]) -> Dict:
    finish = []
    start = time.perf_counter()
    with MemorySampler() as memory, limit_threads(threads):
        for index in range(count):
            baseline_score(build, genotypes[index], images, labels, candidate_seed(seed, index))
            finish.append(time.perf_counter() - start)
            _logger.info("baseline candidate %d: %.2f s", index, finish[-1] - (finish[-2] if index else 0.0))
        used_threads = torch.get_num_threads()
    return {"finish": finish, "peak_rss": memory.peak_rss, "peak_pss": memory.peak_pss, "threads": used_threads}


def run_search(space, build, images, labels, budgets, args, samples: int, precision: str,
               refine_top: int, rss_at: Optional[int] = None) -> Dict:
    finish: List[float] = []
    rss_marks: Dict[int, Dict[str, int]] = {}
    start = time.perf_counter()

    def on_result(index: int, score: float) -> None:
        finish.append(time.perf_counter() - start)
        if len(finish) in (rss_at, samples):
            rss_marks[len(finish)] = MemorySampler.current()

    with MemorySampler() as memory:
        result = search(space, build, images, labels, samples, budgets, args.seed, progress=not args.quiet,
                        precision=precision, refine_top=refine_top, workers=args.workers, on_result=on_result)
    return {"result": result, "finish": finish, "seconds": time.perf_counter() - start,
            "peak_rss": memory.peak_rss, "peak_pss": memory.peak_pss, "rss_marks": rss_marks}


def rewrites_in_use() -> str:
    """Describe the candidate rewrites and memory handling that CPU scoring uses in this process."""
    parts = ["merged conv groups", "weight-only conv backward"]
    if fused_kernel() is not None:
        parts[:0] = ["fused BN+ReLU kernel", "fused BN+ReLU+conv with deferred Fisher terms"]
        if env_flag("BLOCKSWAP_BLOCK_CACHE"):
            parts.append("block cache")
    return " + ".join(parts)


def machine_description() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{device_name(torch.device('cpu'))}, {psutil.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / GB:.0f} GB RAM, torch {torch.__version__}, "
            f"Python {platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10/train.tar"),
                        help="CIFAR-10 training images (tar file or class folders)")
    parser.add_argument("--model", default="wrn_40_2", help="teacher model (default: wrn_40_2)")
    parser.add_argument("--budget-params", type=float, default=400_000, help="parameter budget (default: 400000)")
    parser.add_argument("--batch-size", type=int, default=128, help="scoring minibatch (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="search seed (default: 0)")
    parser.add_argument("--samples", type=int, default=1000,
                        help="candidates of our search, timed end to end (default: 1000)")
    parser.add_argument("--baseline-samples", type=int, default=10,
                        help="candidates scored by the baseline (default: 10)")
    parser.add_argument("--agreement-samples", type=int, default=200,
                        help="first candidates also scored in exact fp32 for the winner and Spearman check "
                             "(default: 200; 0 skips it)")
    parser.add_argument("--baseline-threads", type=int,
                        help="torch threads of the baseline (default: torch's default, one per core)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="timing starts when candidate WARMUP+1 of the baseline, and of each scoring thread "
                             "of our search, finishes (default: 2)")
    parser.add_argument("--precision", default="auto", help="precision of our search (default: auto)")
    parser.add_argument("--workers", type=int, help="candidates our search scores at once (default: one per core)")
    parser.add_argument("--latency-samples", type=int, default=0,
                        help="candidates of each search in the latency-budget comparison (default: 0, skipped)")
    parser.add_argument("--skip-speed", action="store_true",
                        help="skip the baseline, speed, memory and agreement runs (for the latency comparison alone)")
    parser.add_argument("--json", help="also write all figures to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if not args.skip_speed:
        # The marginal time needs at least two timed finishes after the warm-up ones.
        workers = args.workers or default_num_workers(torch.device("cpu"))
        if args.baseline_samples < args.warmup + 2:
            parser.error(f"--baseline-samples must be at least --warmup + 2 = {args.warmup + 2}, "
                         f"got {args.baseline_samples}")
        if args.samples < args.warmup * workers + 2:
            parser.error(f"--samples must be at least --warmup x scoring threads + 2 = "
                         f"{args.warmup * workers + 2}, got {args.samples}")
        if 0 < min(args.agreement_samples, args.samples) < args.warmup * workers + 2:
            parser.error(f"--agreement-samples must be 0 or at least {args.warmup * workers + 2}, "
                         f"got {args.agreement_samples}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    print(f"machine at start: {machine_description()}")
    images, labels, num_classes = load_minibatch(args.data, args.batch_size, args.seed, (3, 32, 32))
    model = timm.create_model(args.model, num_classes=num_classes)
    space, build = create_space(model, (3, 32, 32))
    budgets = [Budget("params", args.budget_params)]
    genotypes = sample_genotypes(space, max(args.baseline_samples, 1), budgets, args.seed)

    if args.skip_speed:
        figures = {"machine": machine_description(), "model": args.model, "budget_params": args.budget_params}
        figures["latency"] = latency_comparison(model, space, build, images, labels, args)
        print_latency(figures["latency"])
        if args.json:
            write_json_atomic(args.json, figures)
        return 0

    # Build or load the compiled helpers before any memory is sampled: a first
    # build inside the search would count the compiler's memory as ours.
    fused_kernel()
    # Our search runs first, so that its peak RSS does not include heap that
    # glibc keeps from the baseline's fp32 passes.
    ours = run_search(space, build, images, labels, budgets, args, args.samples, args.precision,
                      refine_top=8, rss_at=min(50, args.samples))
    base = run_baseline(build, genotypes, images, labels, args.seed, args.baseline_samples, args.baseline_threads)
    result = ours["result"]
    workers = result.extra["workers"]
    base_marginal = marginal_seconds(base["finish"], args.warmup)
    ours_marginal = marginal_seconds(ours["finish"], args.warmup * workers)

    figures = {
        "machine": machine_description(),
        "model": args.model, "budget_params": args.budget_params, "batch_size": args.batch_size,
        "baseline": {"marginal_s": base_marginal, "peak_rss_gb": base["peak_rss"] / GB,
                     "threads": base["threads"], "candidates": args.baseline_samples},
        "ours": {"marginal_s": ours_marginal, "end_to_end_s": ours["seconds"], "candidates": args.samples,
                 "precision": result.extra["precision"], "workers": workers, "threads": result.extra["threads"],
                 "peak_rss_gb": ours["peak_rss"] / GB, "peak_pss_gb": ours["peak_pss"] / GB,
                 "rss_gb_at": {str(k): v["rss"] / GB for k, v in ours["rss_marks"].items()},
                 "pss_gb_at": {str(k): v["pss"] / GB for k, v in ours["rss_marks"].items()},
                 "winner": result.best.index, "rewrites": rewrites_in_use()},
        "ratio": base_marginal / ours_marginal,
    }

    if args.agreement_samples:
        count = min(args.agreement_samples, args.samples)
        exact = run_search(space, build, images, labels, budgets, args, count, "exact", refine_top=0)
        exact_scores = [c.score for c in exact["result"].candidates]
        fast_scores = [c.scores[result.extra["precision"]] for c in result.candidates[:count]]
        fast_order = sorted(range(count), key=lambda i: (-fast_scores[i], i))
        exact_winner = max(range(count), key=lambda i: (exact_scores[i], -i))
        refined_winner = refined_pick(fast_scores, exact_scores, refine_top=8)
        figures["agreement"] = {
            "candidates": count,
            "spearman": spearman(fast_scores, exact_scores),
            "exact_winner": exact_winner,
            "fast_winner": fast_order[0],
            "refined_winner": refined_winner,
            "exact_winner_rank_in_fast": fast_order.index(exact_winner) + 1,
            "exact_marginal_s": marginal_seconds(exact["finish"], args.warmup * workers),
        }

    print_report(figures)
    if args.json:
        write_json_atomic(args.json, figures)
    if args.latency_samples:
        figures["latency"] = latency_comparison(model, space, build, images, labels, args)
        print_latency(figures["latency"])
        if args.json:
            write_json_atomic(args.json, figures)
    return 0


def print_latency(latency: Dict) -> None:
    print()
    print(f"latency at batch 1, {latency['threads']} threads: teacher {latency['teacher_ms']:.2f} ms measured "
          f"({latency['table_teacher_ms']:.2f} ms when the table was made); latency budget {latency['limit_ms']:.2f} ms")
    print("| student | latency measured (ms) | latency predicted (ms) | params | MACs | Fisher potential |")
    print("|---|---|---|---|---|---|")
    print(f"| teacher | {latency['teacher_ms']:.2f} | {latency['table_teacher_ms']:.2f} | "
          f"{latency['teacher_params']:,} | {latency['teacher_macs'] / 1e6:.1f} M | |")
    for row in latency["rows"]:
        print(f"| {row['search']} | {row['measured_ms']:.2f} | {row['predicted_ms']:.2f} | {row['params']:,} | "
              f"{row['macs'] / 1e6:.1f} M | {row['fisher']:.4g} |")
    for row in latency["rows"]:
        print(f"{row['search']}: {' '.join(row['blocks'])}")


def latency_comparison(model, space, build, images, labels, args) -> Dict:
    """Search under a latency budget of half the teacher's, then under a parameter budget of the same size.

    The first search keeps only students whose predicted latency (batch 1,
    one thread) is at most half the teacher's. The second keeps students
    within 2.5 % of the first winner's parameter count, as a plain parameter
    budget would. Both winners are then timed on the device.
    """
    # One thread: its latency is measured as thread CPU time, which other jobs
    # on a shared machine barely disturb.
    threads = 1
    table = load_or_build_latency_table(space, model, batch_size=1, num_threads=threads, progress=not args.quiet,
                                        build_candidate=build)
    tables = {"latency_ms": table.cost_table()}
    latency = Budget("latency_ms", table.teacher_ms / 2, kind="max")
    rows = []

    def run(name: str, budgets: List[Budget]) -> Dict:
        result = search(space, build, images, labels, args.latency_samples, budgets, args.seed,
                        progress=not args.quiet, workers=args.workers, cost_tables=tables)
        best = result.best
        measured = measure_latency(build(best.blocks), (1, 3, 32, 32), num_threads=threads, min_run_time=1.0)
        row = {"search": name, "params": best.params, "macs": best.macs, "fisher": best.score,
               "predicted_ms": best.costs["latency_ms"], "measured_ms": measured, "blocks": best.blocks,
               "seconds": result.seconds}
        rows.append(row)
        return row

    fast = run(f"latency budget {latency.target:.2f} ms", [latency])
    run(f"parameter budget {fast['params']:,} +-2.5 %", [Budget("params", fast["params"])])
    teacher_ms = measure_latency(model, (1, 3, 32, 32), num_threads=threads, min_run_time=1.0)
    return {"teacher_ms": teacher_ms, "table_teacher_ms": table.teacher_ms, "limit_ms": latency.target,
            "teacher_params": count_params(model), "teacher_macs": count_macs(model, (1, 3, 32, 32)),
            "threads": threads, "rows": rows}


def print_report(f: Dict) -> None:
    b, o = f["baseline"], f["ours"]
    marks = o["rss_gb_at"]
    first, last = sorted(marks, key=int)[0], sorted(marks, key=int)[-1]
    print()
    print(f"machine at end: {f['machine']}")
    print(f"{f['model']}, budget {f['budget_params']:,.0f} params, batch {f['batch_size']}")
    print()
    print("| search | setting | s / candidate (marginal) | peak RSS |")
    print("|---|---|---|---|")
    print(f"| baseline | fp32, contiguous, weight grads, 1 process x {b['threads']} threads, "
          f"{b['candidates']} candidates | {b['marginal_s']:.3f} | {b['peak_rss_gb']:.2f} GB |")
    print(f"| ours | {o['precision']}, channels-last, activation grads only, {o.get('rewrites', 'no rewrites')}, "
          f"{o['workers']} threads x "
          f"{o['threads']} intra-op thread, {o['candidates']} candidates | {o['marginal_s']:.3f} | "
          f"{o['peak_rss_gb']:.2f} GB |")
    print()
    print(f"ratio (baseline s / candidate over ours): {f['ratio']:.1f}x")
    print(f"our search end to end: {o['end_to_end_s']:.1f} s for {o['candidates']} candidates "
          "(sampling, scoring, exact rescoring of the top 8)")
    if first != last:
        print(f"RSS after {first} candidates: {marks[first]:.2f} GB; after {last}: {marks[last]:.2f} GB "
              f"({100 * (marks[last] / marks[first] - 1):+.1f} %)")
    if "agreement" in f:
        a = f["agreement"]
        print(f"agreement over the first {a['candidates']} candidates: Spearman {a['spearman']:.4f}; "
              f"exact winner {a['exact_winner']}, {o['precision']} winner {a['fast_winner']} "
              f"(exact winner ranked {a['exact_winner_rank_in_fast']} by {o['precision']}); "
              f"exact mode {a['exact_marginal_s']:.3f} s / candidate")
        same = "same winner" if a["refined_winner"] == a["exact_winner"] else "DIFFERENT WINNER"
        print(f"our search's pick over these candidates (top 8 rescored exactly): {a['refined_winner']} ({same})")
        print(f"winner of our search over all {o['candidates']} candidates: {o['winner']}")


if __name__ == "__main__":
    sys.exit(main())
