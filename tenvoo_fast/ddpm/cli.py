"""The ``tenvoo-fast`` command line.

``tenvoo-fast finetune`` is the paper's 3D DDPM fine-tuning as a training program
(:mod:`.finetune`); ``--preset tiny`` checks an install in seconds on a CPU. ``profile``,
``sample`` and ``evaluate`` compare, sample and score fine-tuned models; ``check-kernels``
compiles the GPU kernels ahead of time. Each subcommand is registered in :func:`build_parser`
with the function it runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys


from .._version import __version__
from ..dispatch import STRATEGIES, WEIGHT_POLICIES
from ..errors import AdapterError, RunError, one_line
from . import compare, convert_files, evaluate, finetune, sample
from .federated import command as federated_command
from .options import (HelpFormatter, Parser, add_finetune_arguments, check_device, comma_list,
                      default_device, non_negative_int, positive_float, positive_int)
from .training import Interrupted

__all__ = ["build_parser", "main"]

#: What each command needs beyond the library, and the install extra that brings it.
NEEDS = {"finetune": (("monai", "einops", "nibabel", "tqdm"), "ddpm"),
         "profile": (("monai", "einops", "nibabel", "tqdm", "matplotlib"), "ddpm"),
         "sample": (("monai", "einops", "nibabel", "matplotlib"), "ddpm"),
         "evaluate": (("monai", "nibabel"), "ddpm"),
         "convert": (("monai", "einops"), "ddpm"),
         "federated": (("monai", "einops", "flwr", "ray"), "federated"),
         "check-kernels": (("triton",), "triton")}
EXTRAS = {"ddpm": "the DDPM program's extra", "triton": "the Triton extra",
          "federated": "the federated extra (Flower with its simulation engine)"}


def missing_packages(command: str) -> list[str]:
    """The packages ``command`` needs that are not installed."""
    return [m for m in NEEDS.get(command, ((), None))[0] if importlib.util.find_spec(m) is None]


def _command(run):
    """A subcommand that calls ``run(args)`` (a module's ``run``) and exits 0."""
    def command(args: argparse.Namespace) -> int:
        run(args)
        return 0
    command.__doc__ = f"Run :func:`{run.__module__}.run` with the parsed options."
    return command


def _method_list(text: str) -> list[str]:
    methods = comma_list(text)
    unknown = [m for m in methods if m not in finetune.METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(finetune.METHODS)}")
    if not methods:
        raise argparse.ArgumentTypeError("name at least one method")
    return methods


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per command, each bound to the function it runs."""
    parser = Parser(
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
        formatter_class=HelpFormatter)
    add_finetune_arguments(ft)
    ft.set_defaults(func=_command(finetune.run))

    pr = commands.add_parser(
        "profile", help="several methods side by side: step time, peak memory, parameters",
        description="Run 'finetune' for each method, one after another in this process, on the "
                    "same preset and options (each into DIR/METHOD); write DIR/profile.md (a "
                    "table with ratios against the first method), DIR/profile.png and "
                    "DIR/profile.json. Options left out take finetune's defaults. On the CPU "
                    "peak memory is the process's peak RSS, which only grows across methods.",
        formatter_class=HelpFormatter)
    pr.add_argument("--methods", type=_method_list, default="full,lora,tenvoo-l,tenvoo-q",
                    help="comma-separated methods; ratios are against the first")
    pr.add_argument("--preset", choices=("paper", "tiny"), default="paper",
                    help="the UNet (as in finetune)")
    pr.add_argument("--steps", type=positive_int, default=10,
                    help=f"optimizer steps per method; the step time is the median after "
                         f"{finetune.WARMUP_STEPS} warm-up steps")
    pr.add_argument("--out", default="runs/profile", metavar="DIR", help="output folder")
    passed = pr.add_argument_group("passed on to finetune (default: finetune's)")
    passed.add_argument("--rank", type=int, help="adapter rank")
    passed.add_argument("--size", type=positive_int, nargs=3, metavar=("D", "H", "W"),
                        help="volume size")
    passed.add_argument("--accum", type=positive_int,
                        help="gradient-accumulation micro-batches per optimizer step")
    passed.add_argument("--batch-size", type=positive_int, help="volumes per batch")
    passed.add_argument("--num-volumes", type=positive_int, help="number of synthetic phantoms")
    passed.add_argument("--lr", type=positive_float, help="Adam learning rate")
    passed.add_argument("--data", metavar="DIR", help="folder of NIfTI volumes")
    passed.add_argument("--base-weights", metavar="PATH", help="torch state_dict of the UNet")
    passed.add_argument("--device", default=default_device(),
                        help="torch device")
    passed.add_argument("--amp", choices=tuple(finetune.AMP_DTYPES), help="autocast dtype")
    passed.add_argument("--backend", help="adapter backend (auto, reference, ...)")
    passed.add_argument("--strategy", choices=STRATEGIES, help="merged, factorized, implicit-gemm or auto")
    passed.add_argument("--weight-policy", choices=WEIGHT_POLICIES,
                        help="recompute or keep the effective weight (see finetune)")
    passed.add_argument("--autotune", action="store_true", default=None,
                        help="measure each layer's backend and strategy first (see finetune)")
    passed.add_argument("--checkpoint-activations", action="store_true", default=None,
                        help="checkpoint the UNet's blocks (see finetune)")
    passed.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the model (see finetune)")
    passed.add_argument("--fold-frozen", action="store_true", default=None,
                        help="fold T(θ0) into fp32 base weights (see finetune)")
    passed.add_argument("--channels-last", action="store_true", default=None,
                        help="the UNet in channels_last_3d (see finetune)")
    passed.add_argument("--graph", action="store_true", default=None,
                        help="capture each step as a CUDA graph (see finetune)")
    passed.add_argument("--seed", type=non_negative_int, help="seed")
    passed.add_argument("--count-launches", action="store_true", default=None,
                        help="count one step's launches, copies, views and host syncs per "
                             "method (see finetune): a table in profile.md, a panel in "
                             "profile.png")
    pr.set_defaults(func=_command(compare.run))

    sa = commands.add_parser(
        "sample", help="generate volumes from a fine-tuned UNet (adapter merged)",
        description="Build the base UNet as finetune does (same --preset, --seed, "
                    "--base-weights), load and merge an adapter.safetensors from a finetune run, "
                    "and generate volumes with DDPM or DDIM sampling; writes "
                    "DIR/sample_XXX.nii.gz and DIR/sample_XXX.png (mid-slices).",
        formatter_class=HelpFormatter)
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
    sa.add_argument("--steps", type=positive_int,
                    help="sampling steps; default "
                         + ", ".join(f"{v} ({k})" for k, v in sample.DEFAULT_STEPS.items()))
    sa.add_argument("--num", type=positive_int, default=1, help="number of volumes")
    sa.add_argument("--size", type=positive_int, nargs=3, metavar=("D", "H", "W"),
                    help="volume size; default as finetune's")
    sa.add_argument("--seed", type=non_negative_int, default=0,
                    help="seed of the random base weights (use the finetune run's) and noise")
    sa.add_argument("--device", default=default_device(),
                    help="torch device")
    sa.add_argument("--out", default="runs/sample", metavar="DIR", help="output folder")
    sa.set_defaults(func=_command(sample.run))

    ev = commands.add_parser(
        "evaluate", help="score generated volumes: MS-SSIM, and FID/MMD with --feature-weights",
        description="Compare a folder of generated NIfTI volumes (e.g. from 'sample') with a "
                    "folder of held-out ones: MS-SSIM over every (generated, reference) pair "
                    "(MONAI, 3D, 5 scales, window 7, or 5 or 3 for small volumes); FID and MMD "
                    "on the features of a 3D ResNet-50 (Med3D layout) when --feature-weights is "
                    "given, otherwise reported as not computed. Volumes are read as finetune "
                    "--data reads them (intensities scaled to [0, 1]) and resized to one size. "
                    "Writes --out (JSON).",
        formatter_class=HelpFormatter)
    ev.add_argument("--generated", required=True, metavar="DIR",
                    help="folder of generated volumes (.nii, .nii.gz)")
    ev.add_argument("--reference", required=True, metavar="DIR",
                    help="folder of held-out (validation) volumes (.nii, .nii.gz)")
    ev.add_argument("--feature-weights", metavar="PATH",
                    help="state dict of a 3D ResNet-50 in Med3D's layout (e.g. MedicalNet's "
                         "resnet_50_23dataset.pth) for FID and MMD; without it they are not "
                         "computed")
    ev.add_argument("--size", type=positive_int, nargs=3, metavar=("D", "H", "W"),
                    help="resize every volume to this size (default: the first generated "
                         "volume's size)")
    ev.add_argument("--device", default="cpu", help="torch device")
    ev.add_argument("--out", default="runs/evaluate/evaluation.json", metavar="FILE",
                    help="output JSON file")
    ev.set_defaults(func=_command(evaluate.run))

    cv = commands.add_parser(
        "convert", help="adapters from the published TenVOO code or peft as tenvoo_fast "
                        "adapter files, and LoRA back to peft",
        description="Convert IN to OUT for the preset's UNet. IN a published TenVOO "
                    "checkpoint (its full state dict, or a save_peft file) or a peft adapter "
                    "folder: OUT is a tenvoo_fast adapter file, which sample --adapter and "
                    "load_adapter take. IN a tenvoo_fast LoRA adapter file: OUT "
                    "is a peft adapter folder (PeftModel.from_pretrained loads it). The base "
                    "is --base-weights, or the random UNet of --seed; a published full state "
                    "dict can give its own (--save-base).",
        formatter_class=HelpFormatter)
    cv.add_argument("input", metavar="IN", help="published checkpoint (.pt), peft adapter "
                                                "folder, or tenvoo_fast adapter file")
    cv.add_argument("output", metavar="OUT", help="adapter file (.safetensors) or peft folder")
    cv.add_argument("--preset", choices=("paper", "tiny"), default="paper", help="the UNet")
    cv.add_argument("--base-weights", metavar="PATH",
                    help="torch state_dict of the base UNet the adapter was trained on (MONAI "
                         "core or MONAI Generative layout)")
    cv.add_argument("--seed", type=non_negative_int, default=0,
                    help="seed of the random base weights, without --base-weights")
    cv.add_argument("--save-base", metavar="PATH",
                    help="published full state dict without --base-weights: write the base it "
                         "holds (adapted weights with the folds undone) here, as a torch "
                         "state_dict for --base-weights")
    cv.set_defaults(func=_command(convert_files.run))

    fd = commands.add_parser(
        "federated", help="federated fine-tuning of adapters on Flower (simulated clients)",
        description="Fine-tune adapters across clients that keep their data: each round every "
                    "client trains on its own data, sends only its trained tensors "
                    "(safetensors), the server aggregates them (FedAvg, FedPETuning or "
                    "Rate-My-LoRA weights; exact in ΔW or by averaging factors) and every "
                    "client validates the result. Runs as a Flower simulation in this process; "
                    "writes DIR/metrics.json, DIR/federated.png and DIR/round-NNN.safetensors.",
        formatter_class=HelpFormatter)
    federated_command.add_arguments(fd)
    fd.set_defaults(func=_command(federated_command.run))

    ck = commands.add_parser(
        "check-kernels", help="compile every Triton kernel and CUDA source ahead of time (no GPU needed)",
        description="Compile every Triton kernel, in every configuration the dispatch can "
                    "launch, for each architecture; print one line per kernel and "
                    "architecture (ok/failed); exit 1 if any failed.",
        formatter_class=HelpFormatter)
    ck.add_argument("--arch", type=_arch_list, default="80,90",
                    help="comma-separated compute capabilities, e.g. 80,90")
    ck.set_defaults(func=_cmd_check_kernels)
    return parser


def _arch_list(text: str) -> list[int]:
    try:
        archs = [int(a) for a in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give compute capabilities as integers, "
                                         "e.g. 80,90") from None
    if not archs:
        raise argparse.ArgumentTypeError("name at least one architecture")
    return archs


def _cmd_check_kernels(args: argparse.Namespace) -> int:
    """Compile the Triton kernels for ``--arch``; 1 if any failed."""
    from ..kernels import compile_check
    failures = compile_check.run(args.arch)
    print(f"check-kernels: {'all ok' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code: 0, 2 for bad input or a run that cannot go
    on (one ``error:`` line), or 128 + the signal for a run stopped by SIGTERM/SIGINT after
    saving its checkpoint."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_packages(args.command)
    if missing:
        extra = NEEDS[args.command][1]
        print(f"error: tenvoo-fast {args.command} needs {', '.join(missing)}, not installed; "
              f"install {EXTRAS[extra]}: pip install 'tenvoo_fast[{extra}]'", file=sys.stderr)
        return 2
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        return args.func(args)
    except (AdapterError, RunError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        return e.code


if __name__ == "__main__":
    sys.exit(main())
