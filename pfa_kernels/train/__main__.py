"""python -m pfa_kernels.train (or pfa-train): train a network with PFA or a baseline rule.

    python -m pfa_kernels.train                                   # digits, PFA r = 10 (no download)
    python -m pfa_kernels.train --config cifar10_resnet20 --set rule.mode=fa
    torchrun --nproc_per_node 8 -m pfa_kernels.train --config imagenet_resnet18 --set data.root=/data/imagenet
    python -m pfa_kernels.train --config imagenet_resnet18 --resume   # continue from log.dir/checkpoint.pt
    python -m pfa_kernels.train --eval runs/imagenet_resnet18/best.pt --set data.root=/data/imagenet

A new run refuses a log.dir that holds an earlier run's checkpoint or metrics (--resume continues it, --overwrite
replaces it); --resume refuses keys that cannot change within a run (model, rule, ...) and records the others.
--eval evaluates a checkpoint's model (and its weight average) with the checkpoint's config and any --set overrides,
prints the metrics and writes them beside the checkpoint (<name>.eval.json); nothing trains.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import config as config_module
from .values import ConfigError


def parser() -> argparse.ArgumentParser:
    epilog = (f"recipes (--config): {', '.join(config_module.recipes())}\n\nconfig keys (--set key=value), "
              f"type, default and meaning:\n{config_module.describe()}")
    result = argparse.ArgumentParser(prog="python -m pfa_kernels.train", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--config", help="a recipe name from configs/ or a path to a YAML file (default: digits)")
    result.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set optim.lr=0.1 --set rule.mode=fa")
    result.add_argument("--resume", action="store_true", help="continue exactly from log.dir/checkpoint.pt")
    result.add_argument("--overwrite", action="store_true",
                        help="start a new run in a log.dir that holds an earlier run, deleting that run's checkpoint, "
                             "metrics, plots and TensorBoard events")
    result.add_argument("--eval", metavar="CHECKPOINT", help="evaluate this checkpoint (checkpoint.pt, best.pt) on "
                        "the validation set of its config, --set overrides applied; no training")
    result.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    result.add_argument("--no-progress", action="store_true", help="no progress bars")
    return result


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.eval:
        return _evaluate(args)
    try:
        config = config_module.load(args.config or "digits", args.set)
        if args.print_config:
            print(json.dumps(config, indent=2))
            return 0
        from .loop import run

        metrics = run(config, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    except ConfigError as error:
        # A value, run folder or checkpoint the run cannot use: the message says which and what to do.
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {k: metrics[k] for k in ("epoch", "val_top1", "val_top5") if k in metrics}
    if metrics.get("layers"):
        angles = [row["path_alignment"] for row in metrics["layers"]]
        summary["mean_alignment_deg"] = sum(angles) / len(angles)
    print(json.dumps(summary))
    return 0


def _evaluate(args) -> int:
    try:
        given = [name for name, value in (("--config", args.config), ("--resume", args.resume),
                                          ("--overwrite", args.overwrite), ("--print-config", args.print_config))
                 if value]
        if given:
            raise ConfigError(f"--eval takes the model and data from the checkpoint's own config (change keys with "
                              f"--set); it cannot be combined with {', '.join(given)}")
        from .loop import evaluate_checkpoint

        metrics = evaluate_checkpoint(args.eval, args.set)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({key: value for key, value in metrics.items() if key != "layers"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
