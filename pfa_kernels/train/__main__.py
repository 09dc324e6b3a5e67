"""python -m pfa_kernels.train (or pfa-train): train a network with PFA or a baseline rule.

    python -m pfa_kernels.train                                   # digits, PFA r = 10 (no download)
    python -m pfa_kernels.train --config cifar10_resnet20 --set rule.mode=fa
    torchrun --nproc_per_node 8 -m pfa_kernels.train --config imagenet_resnet18 --set data.root=/data/imagenet
    python -m pfa_kernels.train --config imagenet_resnet18 --resume   # continue from log.dir/checkpoint.pt

A new run refuses a log.dir that holds an earlier run's checkpoint or metrics (--resume continues it, --overwrite
replaces it); --resume refuses keys that cannot change within a run (model, rule, ...) and records the others.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import config as config_module
from .values import ConfigError


def parser() -> argparse.ArgumentParser:
    epilog = (f"recipes (--config): {', '.join(config_module.recipes())}\n\nconfig keys (--set key=value), "
              f"type, default and meaning:\n{config_module.describe()}")
    result = argparse.ArgumentParser(prog="python -m pfa_kernels.train", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--config", default="digits", help="a recipe name from configs/ or a path to a YAML file")
    result.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set optim.lr=0.1 --set rule.mode=fa")
    result.add_argument("--resume", action="store_true", help="continue exactly from log.dir/checkpoint.pt")
    result.add_argument("--overwrite", action="store_true",
                        help="start a new run in a log.dir that holds an earlier run, deleting that run's checkpoint, "
                             "metrics, plots and TensorBoard events")
    result.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    result.add_argument("--no-progress", action="store_true", help="no progress bars")
    return result


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        config = config_module.load(args.config, args.set)
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


if __name__ == "__main__":
    sys.exit(main())
