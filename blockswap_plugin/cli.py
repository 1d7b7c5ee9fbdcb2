"""The ``blockswap`` command: list block types, count a model, search a student.

Invalid input ends with one ``blockswap: error: ...`` line on stderr and exit
status 2, and leaves no output file behind.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from .core.blocks import list_block_types
from .core.env import env_flag
from .core.errors import BlockSwapError
from .core.genotype import Genotype, write_json_atomic
from .core.sampler import Budget, check_budgets

_logger = logging.getLogger("blockswap_plugin.cli")

# Same names as blockswap_plugin.core.scoring.PRECISIONS, kept here so that
# building the parser does not import torch.
PRECISION_CHOICES = ("auto", "exact", "fp32", "bf16")

DATA_HINT = (
    "pass --data an image folder with one subfolder per class, or a tar file of such folders "
    "(for CIFAR-10, its train.tar)"
)


def _unknown_model_error(name: str) -> BlockSwapError:
    return BlockSwapError(f"unknown model {name!r}; use a timm model name such as wrn_40_2 (see timm.list_models())")


def _check_model_name(name: str) -> None:
    """Reject a name that timm does not know, before any data is read."""
    import timm

    from . import timm as _adapter  # noqa: F401  (registers wrn_*)

    if not timm.is_model(name):
        raise _unknown_model_error(name)


def _create_model(name: str, num_classes: Optional[int]):
    import timm

    from . import timm as _adapter  # noqa: F401  (registers wrn_*)

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise _unknown_model_error(name) from None
        raise


def _space_for(model, input_size):
    from .timm.spaces import create_space

    return create_space(model, input_size)


def cmd_blocks(args: argparse.Namespace) -> int:
    types = list_block_types()
    width = max(len(t.name) for t in types)
    paper_width = max(len(t.paper_name) for t in types)
    print(f"{'name':<{width}}  {'paper':<{paper_width}}  {'kind':<10}  description")
    for t in types:
        print(f"{t.name:<{width}}  {t.paper_name:<{paper_width}}  {t.kind:<10}  {t.description}")
    return 0


def cmd_kernel(args: argparse.Namespace) -> int:
    from .core.block_cache import block_cache_setting
    from .core.fused import kernel_status

    ok, message = kernel_status()
    print(message)
    print(block_cache_setting())
    return 0 if ok else 1


def _check_switches() -> None:
    """Reject invalid values of the package's environment switches before any work starts."""
    from .core.block_cache import check_block_cache_settings

    env_flag("BLOCKSWAP_FUSED")
    check_block_cache_settings()


def cmd_count(args: argparse.Namespace) -> int:
    import json

    model = _create_model(args.model, args.num_classes)
    space, _ = _space_for(model, args.input_size)
    if args.genotype:
        loaded = Genotype.load(args.genotype, model=space.model_name)
        if loaded.model and loaded.model != space.model_name:
            raise BlockSwapError(
                f"{args.genotype} contains a genotype for {loaded.model!r}, not {space.model_name!r}; "
                f"count it with 'blockswap count {loaded.model} --genotype {args.genotype}'"
            )
        try:
            genotype = space.check(loaded)
        except BlockSwapError as exc:
            raise BlockSwapError(f"{args.genotype}: {exc}") from None
    else:
        genotype = space.genotype(["Conv"] * len(space))
    params = space.count_params(genotype)
    macs = space.count_macs(genotype)
    if args.json:
        print(json.dumps({
            "model": space.model_name,
            "params": params,
            "macs": macs,
            "input_size": list(space.input_size),
            "blocks": list(genotype.blocks),
        }))
    else:
        print(f"model:      {space.model_name}")
        print(f"input size: {' x '.join(map(str, space.input_size))}")
        print(f"params:     {params:,}")
        print(f"MACs:       {macs:,} ({macs / 1e6:.1f} M)")
        print(f"blocks:     {' '.join(genotype.blocks)}")
    return 0


def _print_ranking(result, top: int) -> None:
    rows = result.ranking()[:top]
    # Predicted latency gets a column when a latency budget made the search compute it.
    latency = any("latency_ms" in c.costs for c in rows)
    print(f"\nTop {len(rows)} of {len(result.candidates)} candidates (Fisher potential, higher is better; "
          "score is the exact fp32 score where one was computed):")
    latency_head = f"  {'ms (pred.)':>10}" if latency else ""
    print(f"{'rank':>4}  {'index':>5}  {'score':>11}  {'exact':>11}  {'params':>9}  {'MACs':>11}{latency_head}  blocks")
    for rank, c in enumerate(rows, 1):
        exact = f"{c.scores['exact']:.5g}" if "exact" in c.scores else ""
        latency_cell = f"  {c.costs.get('latency_ms', float('nan')):>10.3f}" if latency else ""
        print(f"{rank:>4}  {c.index:>5}  {c.score:>11.5g}  {exact:>11}  {c.params:>9,}  {c.macs:>11,}{latency_cell}  "
              f"{' '.join(c.blocks)}")


def _search_budgets(args: argparse.Namespace) -> List[Budget]:
    # Checked before any data is read or a latency table is measured (a minute or more).
    for option in ("budget_params", "budget_macs", "budget_latency_ms"):
        value = getattr(args, option)
        if value is not None and not float(value) > 0:
            raise BlockSwapError(f"--{option.replace('_', '-')} must be positive, got {value:g}")
    if not 0 < args.tolerance < 1:
        raise BlockSwapError(f"--tolerance must be between 0 and 1, got {args.tolerance:g}; 0.025 means +-2.5 %")
    budgets = []
    if args.budget_params is not None:
        budgets.append(Budget("params", float(args.budget_params), args.tolerance))
    if args.budget_macs is not None:
        budgets.append(Budget("macs", float(args.budget_macs), args.tolerance))
    if args.budget_latency_ms is not None:
        budgets.append(Budget("latency_ms", float(args.budget_latency_ms), args.tolerance, kind="max"))
    if not budgets:
        raise BlockSwapError("no budget given; pass --budget-params, --budget-macs or --budget-latency-ms (or several)")
    return budgets


def _latency_tables(args, space, model, build_candidate, shard) -> dict:
    """Measure (or read from the cache) the latency table when a latency budget is set; rank 0 measures first."""
    if args.budget_latency_ms is None:
        return {}
    import torch.distributed as dist

    from .core.latency import load_or_build_latency_table
    from .core.workers import available_cores

    threads = args.latency_threads or available_cores()

    def load():
        return load_or_build_latency_table(
            space, model, args.latency_batch_size, "cpu", threads, progress=not args.quiet and shard.rank == 0,
            build_candidate=build_candidate,
        )

    if shard.distributed and shard.rank != 0:
        dist.barrier()
        table = load()
    else:
        table = load()
        if shard.distributed:
            dist.barrier()
    if shard.rank == 0:
        print(f"latency table: {space.model_name} at batch {table.batch_size} on {table.device}, "
              f"{table.num_threads} thread(s): teacher {table.teacher_ms:.3f} ms; prediction = "
              f"{table.scale:.3f} x sum of block entries {table.fixed_ms:+.3f} ms (calibrated line, so the "
              "constant can be negative)")
    return {"latency_ms": table.cost_table()}


def cmd_search(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from .core.search import search
    from .core.sharding import current_shard, init_distributed_from_env
    from .timm.data import count_classes, load_minibatch, open_image_dataset

    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise BlockSwapError(f"--out {out} is a folder; give a file path such as {out / 'search.json'}")
    # Check --out now, so a bad path fails before the search, but create its folder only at the end:
    # a search that fails leaves nothing behind.
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BlockSwapError(f"cannot write --out {out}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK):
        raise BlockSwapError(f"cannot write --out {out}: the folder {existing} is not writable; choose another path")
    if not Path(args.data).exists():
        raise BlockSwapError(f"data path not found: {args.data}; {DATA_HINT}")
    if args.samples < 1:
        raise BlockSwapError(f"--samples must be at least 1, got {args.samples}")
    if args.workers is not None and args.workers < 1:
        raise BlockSwapError(f"--workers must be at least 1, got {args.workers}; omit it for one per CPU core")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BlockSwapError(f"--device {args.device} requested but no CUDA device is available; use --device cpu")
    budgets = _search_budgets(args)
    _check_model_name(args.model)

    created_group = init_distributed_from_env(torch.device(args.device))
    try:
        shard = current_shard()
        device = torch.device(args.device)
        if device.type == "cuda" and shard.distributed:
            device = torch.device("cuda", torch.cuda.current_device())
        num_classes = args.num_classes
        dataset = None
        if num_classes is None:
            # The classifier size is part of the parameter count, so take it from the data.
            dataset = open_image_dataset(args.data)
            num_classes = count_classes(dataset)
        model = _create_model(args.model, num_classes)
        space, build_candidate = _space_for(model, args.input_size)
        check_budgets(space, [b for b in budgets if b.metric != "latency_ms"])
        tables = _latency_tables(args, space, model, build_candidate, shard)
        # The latency budget can be checked only now that the table exists, but still before the minibatch is loaded.
        check_budgets(space, budgets, tables)

        images, labels, _ = load_minibatch(
            args.data, args.batch_size, args.seed, space.input_size,
            mean=model.pretrained_cfg.get("mean"), std=model.pretrained_cfg.get("std"), dataset=dataset,
        )
        if int(labels.max()) >= getattr(model, "num_classes", 0):
            raise BlockSwapError(
                f"the data has class index {int(labels.max())} but {args.model} has {model.num_classes} classes; "
                "set --num-classes to the number of classes in the data"
            )
        start = time.perf_counter()
        result = search(
            space, build_candidate, images.to(device), labels.to(device), args.samples, budgets, args.seed,
            device=device, progress=not args.quiet, precision=args.precision, refine_top=args.refine_top,
            workers=args.workers, cost_tables=tables,
        )
        seconds = time.perf_counter() - start
        if shard.rank != 0:
            return 0
        result.extra["data"] = str(args.data)
        result.extra["input_size"] = list(space.input_size)
        result.extra["num_classes"] = model.num_classes
        result.extra["seconds_per_candidate"] = round(seconds / len(result.candidates), 4)
        _print_ranking(result, args.top)
        write_json_atomic(out, result.to_dict())
        best = result.best
        latency = f", {best.costs['latency_ms']:.3f} ms predicted" if "latency_ms" in best.costs else ""
        print(
            f"\nwinner: candidate {best.index}, {best.params:,} params, {best.macs / 1e6:.1f} M MACs{latency}, "
            f"Fisher potential {best.score:.5g}"
        )
        print(
            f"{len(result.candidates)} candidates in {seconds:.1f} s ({seconds / len(result.candidates):.3f} s each; "
            f"precision {result.extra['precision']}, {shard.world_size} rank(s) x {result.extra['workers']} worker(s))"
        )
        print(f"result written to {out}")
        return 0
    finally:
        if created_group:
            dist.destroy_process_group()


def _input_size(values: Optional[List[int]]):
    return tuple(values) if values else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockswap",
        description="BlockSwap: Fisher-guided block substitution for network compression on a budget.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("blocks", help="list the block types of the candidate pool")
    p.set_defaults(func=cmd_blocks)

    p = sub.add_parser(
        "kernel",
        help="build (first time, about 80 s) or load the compiled CPU scoring helpers and print whether they work",
    )
    p.set_defaults(func=cmd_kernel)

    p = sub.add_parser("count", help="print parameters and MACs of a model or a student")
    p.add_argument("model", help="timm model name, for example wrn_40_2")
    p.add_argument("--genotype", help="genotype JSON file (a 'blockswap search' result also works)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's own)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size for MACs (default: the model's pretrained_cfg input size)")
    p.add_argument("--json", action="store_true", help="print one JSON object with integer params and macs")
    p.set_defaults(func=cmd_count)

    p = sub.add_parser(
        "search", help="search a BlockSwap student inside a parameter, MAC or latency budget",
        description="Search a BlockSwap student. Run under 'torchrun --nproc_per_node N' to split the "
                    "candidates over N ranks; on one machine, scoring threads already use every CPU core.",
    )
    p.add_argument("model", help="timm model name of the teacher, for example wrn_40_2")
    p.add_argument("--data", required=True, help="training images: a folder of class folders or a tar file of them")
    p.add_argument("--budget-params", type=float, help="target parameter count of the student")
    p.add_argument("--budget-macs", type=float, help="target MACs of the student at the model's input size")
    p.add_argument("--budget-latency-ms", type=float,
                   help="maximum predicted forward latency of the student in milliseconds on this CPU, "
                        "from a per-block latency table measured once and cached")
    p.add_argument("--tolerance", type=float, default=0.025,
                   help="relative tolerance of the parameter and MAC budgets (default: 0.025, +-2.5%%)")
    p.add_argument("--latency-batch-size", type=int, default=1,
                   help="batch size of the latency measurements (default: 1)")
    p.add_argument("--latency-threads", type=int,
                   help="torch threads of the latency measurements (default: all CPU cores of this process)")
    p.add_argument("--samples", type=int, default=1000, help="number of candidates to score (default: 1000)")
    p.add_argument("--batch-size", type=int, default=128, help="images in the scoring minibatch (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, data and initialisation (default: 0)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="scoring precision: exact (fp32 reference), fp32 (fast fp32), bf16 (fast bf16 autocast), "
                        "auto (bf16 where the device supports it natively, else fp32; the default)")
    p.add_argument("--refine-top", type=int, default=8,
                   help="score this many of the best candidates again in exact fp32 and pick the winner among "
                        "them (default: 8; 0 turns it off; ignored with --precision exact)")
    p.add_argument("--workers", type=int,
                   help="candidates scored at once per rank, each on one CPU thread, so also the cores used. "
                        "The exact rescoring of the top candidates uses as many threads "
                        "(default: one per CPU core, shared among local ranks)")
    p.add_argument("--device", default="cpu", help="device to score on: cpu or cuda (default: cpu)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the number of classes in --data)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size (default: the model's pretrained_cfg input size)")
    p.add_argument("--top", type=int, default=10, help="rows of the printed ranking (default: 10)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="hide the progress bar and the log lines; warnings and errors still print")
    p.add_argument("--out", required=True, help="JSON file for the result; missing folders are created")
    p.set_defaults(func=cmd_search)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "input_size"):
        args.input_size = _input_size(args.input_size)
    level = logging.INFO
    if args.verbose:
        level = logging.DEBUG
    elif getattr(args, "quiet", False):
        level = logging.WARNING
    # filelock logs every lock of the compiled helpers' build folder at DEBUG.
    logging.getLogger("filelock").setLevel(max(level, logging.INFO))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        _check_switches()
        return args.func(args)
    except BlockSwapError as exc:
        _logger.debug("command failed", exc_info=True)
        print(f"blockswap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockswap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
