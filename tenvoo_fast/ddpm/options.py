"""The fine-tuning program's options: argument types that fail in one line, the ``finetune``
options (shared by ``tenvoo-fast finetune`` and each run of ``tenvoo-fast profile``) and the
device check."""
from __future__ import annotations

import argparse
import math

import torch

from ..dispatch import STRATEGIES, WEIGHT_POLICIES
from ..errors import RunError, one_line
from .finetune import AMP_DTYPES, METHODS
from .profiler import PROFILE_STEPS
from .recipes import RECIPES
from .run_options import FinetuneOptions, default_device
from .unets import DEFAULT_SIZES

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like the commands' own errors."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


#: The devices the commands run on.
DEVICE_TYPES = ("cpu", "cuda")


def check_device(text: str) -> torch.device:
    """``--device TEXT`` as a torch device the commands can run on; a RunError otherwise."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise RunError(f"--device {text}: not a torch device ({one_line(e)}); use cpu or "
                       "cuda") from None
    if device.type not in DEVICE_TYPES:
        raise RunError(f"--device {text}: tenvoo-fast runs on cpu or cuda devices, not "
                       f"{device.type}; use --device cpu or --device cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {text}: no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA "
                           f"device(s), numbered from 0")
    return device


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, unless there is none to show (None, a flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``finetune`` options (defaults: :class:`.run_options.FinetuneOptions`)."""
    d = FinetuneOptions(device="cpu")
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=("paper", "tiny", "published"), default=d.preset,
                       help="the paper's 166.7M-parameter UNet, a tiny one for CPUs, or "
                            "'published': the paper's UNet trained as the published TenVOO "
                            "script trains it (--recipe published)")
    model.add_argument("--method", choices=METHODS, default=d.method,
                       help="adapter method; full/bias/norm inject nothing and train all "
                            "parameters / only biases / only parameters named 'norm'")
    model.add_argument("--rank", type=int, default=d.rank, help="adapter rank")
    model.add_argument("--targets", type=comma_list, default=d.targets,
                       help="comma-separated regular expressions of the layers to adapt")
    model.add_argument("--trainable", type=comma_list, default=d.trainable,
                       help="what trains besides the adapter cores: comma list of bias, norm, "
                            "all")
    model.add_argument("--base-weights", metavar="PATH",
                       help="torch state_dict of the UNet, loaded before injection "
                            "(default: random weights)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="DIR",
                      help="folder of NIfTI volumes (.nii, .nii.gz); default: synthetic phantoms")
    data.add_argument("--num-volumes", type=positive_int, default=d.num_volumes,
                      help="number of synthetic phantoms")
    data.add_argument("--size", type=positive_int, nargs=3, metavar=("D", "H", "W"),
                      help="volume size; default "
                           + ", ".join(f"{'x'.join(map(str, v))} ({k})"
                                       for k, v in DEFAULT_SIZES.items()))
    data.add_argument("--spacing", type=positive_float, nargs=3, metavar=("SD", "SH", "SW"),
                      help="resample NIfTI volumes to this voxel size (mm), then pad/crop to "
                           "--size; default: resize the whole volume to --size")
    data.add_argument("--workers", type=non_negative_int, default=d.workers,
                      help="DataLoader worker processes")
    train = parser.add_argument_group("training")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=d.steps,
                        help="optimizer steps in total (a resumed run continues to this); "
                             "default: 100, or 10 epochs with --recipe published")
    length.add_argument("--epochs", type=positive_float, help="train for this many epochs")
    train.add_argument("--recipe", choices=tuple(RECIPES), default=d.recipe,
                       help="how to train: this package's defaults (tenvoo_fast; published "
                            "with --preset published), or the published TenVOO "
                            "script's (loss summed over accumulation, partial last step of an "
                            "epoch, 10 epochs, fp16 with a gradient scaler on CUDA, random "
                            "validation timesteps, NIfTI padded/cropped to 160x224x160 first; "
                            "README, 'Recipes')")
    train.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    train.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="volumes per batch")
    train.add_argument("--accum", type=positive_int, default=d.accum,
                       help="gradient-accumulation micro-batches per optimizer step")
    train.add_argument("--seed", type=non_negative_int, default=d.seed,
                       help="seed for base weights, phantoms, data split and noise")
    train.add_argument("--device", default=default_device(),
                       help="torch device")
    train.add_argument("--backend", default=d.backend,
                       help="adapter backend: auto (the fastest that can run each layer) or one "
                            "of tenvoo_fast.available_backends(), e.g. reference")
    train.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                       help="how the fast backends run each adapted layer: merged weight, "
                            "factorized (adapter on the activations), implicit-gemm (the "
                            "Triton conv generating its weight tiles; backend triton), or auto "
                            "(per layer); layers that cannot run the named one run merged")
    train.add_argument("--weight-policy", choices=WEIGHT_POLICIES, default=d.weight_policy,
                       help="the merged strategy's effective weight between forward and "
                            "backward: recompute (rebuild it in backward; least memory) or "
                            "keep (one weight per adapted layer kept in the compute dtype, as "
                            "a plain conv keeps its weight; fewer launches and flops)")
    train.add_argument("--autotune", action="store_true",
                       help="before training, time every backend and strategy on each adapted "
                            "layer's real input and use the fastest (tenvoo_fast.autotune)")
    train.add_argument("--checkpoint-activations", action="store_true",
                       help="keep only each UNet block's inputs for backward and rerun the "
                            "block there: far less activation memory for one more forward of "
                            "each block; the same gradients")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the model (inductor, default mode) for training; "
                            "validation and checkpoints use the plain model")
    train.add_argument("--fold-frozen", action="store_true",
                       help="fold each frozen copy's T(θ0) into its fp32 base weight instead of "
                            "keeping it (one fp32 weight-size tensor less per adapted layer; "
                            "not bit-exact at initialisation; low-precision bases keep theirs)")
    train.add_argument("--channels-last", action="store_true",
                       help="keep the UNet's weights (and so its activations) in "
                            "torch.channels_last_3d, the layout cuDNN's 3-D convolutions run in")
    train.add_argument("--graph", action="store_true",
                       help="run each optimizer step over static buffers, captured once as a "
                            "CUDA graph and replayed (one host call per step instead of "
                            "thousands); on the CPU the same static step runs uncaptured")
    train.add_argument("--amp", choices=tuple(AMP_DTYPES),
                       help="autocast dtype; default bf16 on a GPU, none on the CPU (fp16 uses a "
                            "gradient scaler and needs a GPU)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=d.out, metavar="DIR", help="output folder")
    run.add_argument("--resume", action="store_true",
                     help="continue the run saved in --out (same model and method)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out (without it, a folder holding a "
                          "checkpoint is refused unless --resume)")
    run.add_argument("--save-every", type=non_negative_int,
                     default=d.save_every, metavar="N",
                     help="checkpoint every N optimizer steps (0: not by steps); a checkpoint "
                          "is also written every --save-every-minutes, on SIGTERM/SIGINT and at "
                          "the end")
    run.add_argument("--save-every-minutes", type=non_negative_float,
                     default=d.save_every_minutes, metavar="M",
                     help="checkpoint when M minutes have passed since the last one (0: not "
                          "by time)")
    run.add_argument("--strict-base", action="store_true",
                     help="with --resume, refuse (instead of warning about) base weights other "
                          "than those the checkpoint's adapter was trained on")
    run.add_argument("--log-every", type=positive_int, default=d.log_every, metavar="N",
                     help="without a terminal, print a progress line every N steps")
    run.add_argument("--dry-run", action="store_true",
                     help="build, inject, count and write metrics.json; no training")
    run.add_argument("--profile", action="store_true",
                     help=f"profile {PROFILE_STEPS} optimizer steps after a warm-up "
                          "step: DIR/trace.json (Chrome trace) and DIR/profile.txt")
    run.add_argument("--count-launches", action="store_true",
                     help="count the operator calls, Triton launches, copies, views, "
                          "allocations and host syncs of one step after the warm-up (its time "
                          "is left out of the median), in total and per layer; they go to "
                          "metrics.json ('launches')")


