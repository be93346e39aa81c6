"""The training entry point shared by ``launch/train.py``, torchrun and the SLURM launcher."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ssl_xcit import distributed as dist_utils
from ssl_xcit.train.config import ConfigError, load_config, DinoConfig
from ssl_xcit.train.loop import TrainResult, train


def run_training(cfg: DinoConfig, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Join the process group described by the environment (if any), train, leave the group."""
    dist_utils.init_distributed(cfg.run.device)
    try:
        return train(cfg, stop_requested=stop_requested)
    finally:
        dist_utils.cleanup()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="DINO pretraining of an XCiT on a folder of images (no labels needed). "
                    "Runs alone, or under torchrun for several GPUs/nodes; resumes from the "
                    "checkpoint in output_dir when there is one.",
        epilog="example: python launch/train.py --config configs/quickstart.yaml "
               "data_path=../shared/data/cifar10.tar.gz output_dir=runs/quick epochs=2")
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml); defaults are DINO's")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. lr=1e-3 optim.epochs=10 local_crops_number=6")
    return parser


def main(argv: list[str] | None = None) -> TrainResult:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return run_training(cfg)
