"""The ``tenvoo-fast`` command line.

``tenvoo-fast finetune`` is the paper's 3D DDPM fine-tuning as a training program
(:mod:`tenvoo_fast.finetune`); ``--preset tiny`` checks an install in seconds on a CPU. Each
subcommand is a ``_cmd_*`` function registered in :func:`build_parser`.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from . import __version__, finetune, presets
from . import evaluate as evaluate_
from . import profile as profile_
from . import sample as sample_
from .errors import AdapterError, RunError, one_line
from .strategy import STRATEGIES
from .unets import DEFAULT_SIZES

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


class _Parser(argparse.ArgumentParser):
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, unless there is none to show (None, a flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _command(run):
    """A subcommand that calls ``run(args)`` (a module's ``run``) and exits 0."""
    def command(args: argparse.Namespace) -> int:
        run(args)
        return 0
    command.__doc__ = f"Run :func:`{run.__module__}.run` with the parsed options."
    return command


def _method_list(text: str) -> list[str]:
    methods = _comma_list(text)
    unknown = [m for m in methods if m not in finetune.METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(finetune.METHODS)}")
    if not methods:
        raise argparse.ArgumentTypeError("name at least one method")
    return methods


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per command, each bound to its ``_cmd_*`` function."""
    parser = _Parser(
        prog="tenvoo-fast",
        description="Tensor-network adapters (TenVOO, QuanTA) and baselines for 3D conv nets.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ft = commands.add_parser(
        "finetune", help="the paper's 3D DDPM fine-tuning: train, report, save, resume",
        description="Fine-tune a MONAI 3D DiffusionModelUNet with the paper's DDPM objective on "
                    "synthetic phantoms or a folder of NIfTI files; writes DIR/metrics.json, the "
                    "trained adapter (or parameters) and the checkpoint (DIR/checkpoint.json, "
                    "DIR/checkpoints/) that --resume continues from exactly. Under "
                    "torchrun it trains with DistributedDataParallel.",
        formatter_class=_HelpFormatter)
    model = ft.add_argument_group("model")
    model.add_argument("--preset", choices=("paper", "tiny"), default="paper",
                       help="the paper's 166.7M-parameter UNet, or a tiny one for CPUs")
    model.add_argument("--method", choices=finetune.METHODS, default="tenvoo-l",
                       help="adapter method; full/bias/norm inject nothing and train all "
                            "parameters / only biases / only parameters named 'norm'")
    model.add_argument("--rank", type=int, default=4, help="adapter rank")
    model.add_argument("--targets", type=_comma_list, default=",".join(presets.PAPER_DDPM_TARGETS),
                       help="comma-separated regular expressions of the layers to adapt")
    model.add_argument("--trainable", type=_comma_list, default="bias,norm",
                       help="what trains besides the adapter cores: comma list of bias, norm, "
                            "all")
    model.add_argument("--base-weights", metavar="PATH",
                       help="torch state_dict of the UNet, loaded before injection "
                            "(default: random weights)")
    data = ft.add_argument_group("data")
    data.add_argument("--data", metavar="DIR",
                      help="folder of NIfTI volumes (.nii, .nii.gz); default: synthetic phantoms")
    data.add_argument("--num-volumes", type=_positive_int, default=20,
                      help="number of synthetic phantoms")
    data.add_argument("--size", type=_positive_int, nargs=3, metavar=("D", "H", "W"),
                      help="volume size; default "
                           + ", ".join(f"{'x'.join(map(str, v))} ({k})"
                                       for k, v in DEFAULT_SIZES.items()))
    data.add_argument("--spacing", type=_positive_float, nargs=3, metavar=("SD", "SH", "SW"),
                      help="resample NIfTI volumes to this voxel size (mm), then pad/crop to "
                           "--size; default: resize the whole volume to --size")
    data.add_argument("--workers", type=_non_negative_int, default=0,
                      help="DataLoader worker processes")
    train = ft.add_argument_group("training")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=100,
                        help="optimizer steps in total (a resumed run continues to this)")
    length.add_argument("--epochs", type=_positive_float, help="train for this many epochs")
    train.add_argument("--lr", type=_positive_float, default=5e-5, help="Adam learning rate")
    train.add_argument("--batch-size", type=_positive_int, default=1, help="volumes per batch")
    train.add_argument("--accum", type=_positive_int, default=4,
                       help="gradient-accumulation micro-batches per optimizer step")
    train.add_argument("--seed", type=_non_negative_int, default=0,
                       help="seed for base weights, phantoms, data split and noise")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device")
    train.add_argument("--backend", default="auto",
                       help="adapter backend: auto (the fastest that can run each layer) or one "
                            "of tenvoo_fast.available_backends(), e.g. reference")
    train.add_argument("--strategy", choices=STRATEGIES, default="auto",
                       help="how the fast backends run each adapted layer: merged weight, "
                            "factorized (adapter on the activations), implicit-gemm (the "
                            "Triton conv generating its weight tiles; backend triton), or auto "
                            "(per layer); layers that cannot run the named one run merged")
    train.add_argument("--autotune", action="store_true",
                       help="before training, time every backend and strategy on each adapted "
                            "layer's real input and use the fastest (tenvoo_fast.autotune)")
    train.add_argument("--amp", choices=tuple(finetune.AMP_DTYPES),
                       help="autocast dtype; default bf16 on a GPU, none on the CPU (fp16 uses a "
                            "gradient scaler and needs a GPU)")
    run = ft.add_argument_group("run")
    run.add_argument("--out", default="runs/finetune", metavar="DIR", help="output folder")
    run.add_argument("--resume", action="store_true",
                     help="continue the run saved in --out (same model and method)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out (without it, a folder holding a "
                          "checkpoint is refused unless --resume)")
    run.add_argument("--save-every", type=_non_negative_int,
                     default=finetune.SAVE_EVERY_STEPS, metavar="N",
                     help="checkpoint every N optimizer steps (0: not by steps); a checkpoint "
                          "is also written every --save-every-minutes, on SIGTERM/SIGINT and at "
                          "the end")
    run.add_argument("--save-every-minutes", type=_non_negative_float,
                     default=finetune.SAVE_EVERY_MINUTES, metavar="M",
                     help="checkpoint when M minutes have passed since the last one (0: not "
                          "by time)")
    run.add_argument("--strict-base", action="store_true",
                     help="with --resume, refuse (instead of warning about) base weights other "
                          "than those the checkpoint's adapter was trained on")
    run.add_argument("--log-every", type=_positive_int, default=10, metavar="N",
                     help="without a terminal, print a progress line every N steps")
    run.add_argument("--dry-run", action="store_true",
                     help="build, inject, count and write metrics.json; no training")
    run.add_argument("--profile", action="store_true",
                     help=f"profile {finetune.PROFILE_STEPS} optimizer steps after a warm-up "
                          "step: DIR/trace.json (Chrome trace) and DIR/profile.txt")
    ft.set_defaults(func=_command(finetune.run))

    pr = commands.add_parser(
        "profile", help="several methods side by side: step time, peak memory, parameters",
        description="Run 'finetune' for each method, one after another in this process, on the "
                    "same preset and options (each into DIR/METHOD); write DIR/profile.md (a "
                    "table with ratios against the first method), DIR/profile.png and "
                    "DIR/profile.json. Options left out take finetune's defaults. On the CPU "
                    "peak memory is the process's peak RSS, which only grows across methods.",
        formatter_class=_HelpFormatter)
    pr.add_argument("--methods", type=_method_list, default="full,lora,tenvoo-l,tenvoo-q",
                    help="comma-separated methods; ratios are against the first")
    pr.add_argument("--preset", choices=("paper", "tiny"), default="paper",
                    help="the UNet (as in finetune)")
    pr.add_argument("--steps", type=_positive_int, default=10,
                    help=f"optimizer steps per method; the step time is the median after "
                         f"{finetune.WARMUP_STEPS} warm-up steps")
    pr.add_argument("--out", default="runs/profile", metavar="DIR", help="output folder")
    passed = pr.add_argument_group("passed on to finetune (default: finetune's)")
    passed.add_argument("--rank", type=int, help="adapter rank")
    passed.add_argument("--size", type=_positive_int, nargs=3, metavar=("D", "H", "W"),
                        help="volume size")
    passed.add_argument("--accum", type=_positive_int,
                        help="gradient-accumulation micro-batches per optimizer step")
    passed.add_argument("--batch-size", type=_positive_int, help="volumes per batch")
    passed.add_argument("--num-volumes", type=_positive_int, help="number of synthetic phantoms")
    passed.add_argument("--lr", type=_positive_float, help="Adam learning rate")
    passed.add_argument("--data", metavar="DIR", help="folder of NIfTI volumes")
    passed.add_argument("--base-weights", metavar="PATH", help="torch state_dict of the UNet")
    passed.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    passed.add_argument("--amp", choices=tuple(finetune.AMP_DTYPES), help="autocast dtype")
    passed.add_argument("--backend", help="adapter backend (auto, reference, ...)")
    passed.add_argument("--strategy", choices=STRATEGIES, help="merged, factorized, implicit-gemm or auto")
    passed.add_argument("--autotune", action="store_true", default=None,
                        help="measure each layer's backend and strategy first (see finetune)")
    passed.add_argument("--seed", type=_non_negative_int, help="seed")
    pr.set_defaults(func=_command(profile_.run))

    sa = commands.add_parser(
        "sample", help="generate volumes from a fine-tuned UNet (adapter merged)",
        description="Build the base UNet as finetune does (same --preset, --seed, "
                    "--base-weights), load and merge an adapter.safetensors from a finetune run, "
                    "and generate volumes with DDPM or DDIM sampling; writes "
                    "DIR/sample_XXX.nii.gz and DIR/sample_XXX.png (mid-slices).",
        formatter_class=_HelpFormatter)
    sa.add_argument("--preset", choices=("paper", "tiny"), default="paper", help="the UNet")
    sa.add_argument("--adapter", metavar="PATH",
                    help="adapter.safetensors from finetune (default: the base model alone)")
    sa.add_argument("--base-weights", metavar="PATH",
                    help="torch state_dict of the UNet (default: random weights drawn from "
                         "--seed, as finetune draws them)")
    sa.add_argument("--strict-base", action="store_true",
                    help="refuse (instead of warning about) a base UNet other than the one the "
                         "adapter was trained on (its preset, --seed, --base-weights and weight "
                         "fingerprint are recorded in the adapter file)")
    sa.add_argument("--scheduler", choices=("ddpm", "ddim"), default="ddpm",
                    help="DDPM ancestral sampling or DDIM")
    sa.add_argument("--steps", type=_positive_int,
                    help="sampling steps; default "
                         + ", ".join(f"{v} ({k})" for k, v in sample_.DEFAULT_STEPS.items()))
    sa.add_argument("--num", type=_positive_int, default=1, help="number of volumes")
    sa.add_argument("--size", type=_positive_int, nargs=3, metavar=("D", "H", "W"),
                    help="volume size; default as finetune's")
    sa.add_argument("--seed", type=_non_negative_int, default=0,
                    help="seed of the random base weights (use the finetune run's) and noise")
    sa.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device")
    sa.add_argument("--out", default="runs/sample", metavar="DIR", help="output folder")
    sa.set_defaults(func=_command(sample_.run))

    ev = commands.add_parser(
        "evaluate", help="score generated volumes: MS-SSIM, and FID/MMD with --feature-weights",
        description="Compare a folder of generated NIfTI volumes (e.g. from 'sample') with a "
                    "folder of held-out ones: MS-SSIM over every (generated, reference) pair "
                    "(MONAI, 3D, 5 scales, window 7, or 5 or 3 for small volumes); FID and MMD "
                    "on the features of a 3D ResNet-50 (Med3D layout) when --feature-weights is "
                    "given, otherwise reported as not computed. Volumes are read as finetune "
                    "--data reads them (intensities scaled to [0, 1]) and resized to one size. "
                    "Writes --out (JSON).",
        formatter_class=_HelpFormatter)
    ev.add_argument("--generated", required=True, metavar="DIR",
                    help="folder of generated volumes (.nii, .nii.gz)")
    ev.add_argument("--reference", required=True, metavar="DIR",
                    help="folder of held-out (validation) volumes (.nii, .nii.gz)")
    ev.add_argument("--feature-weights", metavar="PATH",
                    help="state dict of a 3D ResNet-50 in Med3D's layout (e.g. MedicalNet's "
                         "resnet_50_23dataset.pth) for FID and MMD; without it they are not "
                         "computed")
    ev.add_argument("--size", type=_positive_int, nargs=3, metavar=("D", "H", "W"),
                    help="resize every volume to this size (default: the first generated "
                         "volume's size)")
    ev.add_argument("--device", default="cpu", help="torch device")
    ev.add_argument("--out", default="runs/evaluate/evaluation.json", metavar="FILE",
                    help="output JSON file")
    ev.set_defaults(func=_command(evaluate_.run))

    ck = commands.add_parser(
        "check-kernels", help="compile every Triton kernel and CUDA source ahead of time (no GPU needed)",
        description="Compile every Triton kernel, in every configuration the dispatch can "
                    "launch, for each architecture; print one line per kernel and "
                    "architecture (ok/failed); exit 1 if any failed.",
        formatter_class=_HelpFormatter)
    ck.add_argument("--arch", type=_arch_list, default="80,90",
                    help="comma-separated compute capabilities, e.g. 80,90")
    ck.set_defaults(func=_cmd_check_kernels)
    return parser


def _arch_list(text: str) -> list[int]:
    try:
        archs = [int(a) for a in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give compute capabilities as integers, "
                                         "e.g. 80,90") from None
    if not archs:
        raise argparse.ArgumentTypeError("name at least one architecture")
    return archs


def _cmd_check_kernels(args: argparse.Namespace) -> int:
    """Compile the Triton kernels for ``--arch``; 1 if any failed."""
    from . import check_kernels
    failures = check_kernels.run(args.arch)
    print(f"check-kernels: {'all ok' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code: 0, 2 for bad input or a run that cannot go
    on (one ``error:`` line), or 128 + the signal for a run stopped by SIGTERM/SIGINT after
    saving its checkpoint."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        return args.func(args)
    except (AdapterError, RunError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except finetune.Interrupted as e:
        return e.code


if __name__ == "__main__":
    sys.exit(main())
