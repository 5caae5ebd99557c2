"""The ``tenvoo-fast`` command line.

``tenvoo-fast demo`` fine-tunes a tiny MONAI diffusion UNet on synthetic phantoms for a few
steps, end to end through the public API (``presets.paper_ddpm`` -> ``inject`` -> train ->
``save_adapter``), so an install can be checked in seconds on a CPU. Each subcommand is a
``_cmd_*`` function registered in :func:`build_parser`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import __version__, presets
from .backends import available_backends, current_backend
from .checkpoint import save_adapter
from .config import METHODS
from .errors import AdapterError
from .model import adapter_layers, count_parameters, inject


def build_tiny_unet():
    """A MONAI ``DiffusionModelUNet`` with the paper model's block structure, ~0.3M parameters.

    Same layout as the paper's (3D, one channel in and out, two res blocks per level, attention
    in the last two levels, so every ``paper_ddpm`` target exists) but narrow, so it trains on a
    CPU in seconds. Input sides must be multiples of 8 (three downsamplings).
    """
    from monai.networks.nets import DiffusionModelUNet
    return DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=2,
                              channels=(8, 8, 16, 16), attention_levels=(False, False, True, True),
                              norm_num_groups=8, num_head_channels=(0, 0, 16, 16))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _volume_size(text: str) -> int:
    value = int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of 8 (the UNet downsamples three times), got {value}")
    return value


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, so readers never see
    a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock step times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cmd_demo(args: argparse.Namespace) -> int:
    """Inject adapters into the tiny UNet, train a few DDPM steps, report and save the adapter."""
    import monai
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler
    from tqdm import tqdm

    from .phantoms import brain_phantoms

    device = torch.device(args.device)
    config = presets.paper_ddpm(args.method, args.rank)
    torch.manual_seed(args.seed)
    model = inject(build_tiny_unet(), config).to(device)
    volumes = brain_phantoms(args.steps, args.size, seed=args.seed)

    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta",
                              beta_start=0.0005, beta_end=0.0195)
    inferer = DiffusionInferer(scheduler)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    trainable, total = count_parameters(model), count_parameters(model, trainable_only=False)
    n_layers = len(adapter_layers(model))
    print(f"tenvoo-fast demo: {args.method}, rank {args.rank}, {args.size}^3 phantoms, "
          f"{args.steps} steps on {device}")
    print(f"parameters: {trainable:,} trainable of {total:,} total; "
          f"{n_layers} adapted layers")
    print(f"backend: {current_backend()} (available: {', '.join(available_backends())})")

    losses, times = [], []
    model.train()
    bar = tqdm(range(args.steps), desc="training", unit="step", disable=not sys.stderr.isatty())
    for step in bar:
        images = volumes[step:step + 1].to(device)
        _sync(device)
        start = time.perf_counter()
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (1,), device=device)
        prediction = inferer(inputs=images, diffusion_model=model, noise=noise,
                             timesteps=timesteps)
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()

    for step, (loss, seconds) in enumerate(zip(losses, times), 1):
        print(f"  step {step:3d}  loss {loss:.4f}  {seconds * 1000:7.1f} ms")
    # The first step pays for lazy initialisation (allocator, kernel selection): leave it out.
    step_time = statistics.median(times[1:]) if len(times) > 1 else None
    print("median step time (excluding warm-up): "
          + (f"{step_time * 1000:.1f} ms" if step_time is not None else "n/a (one step)"))
    if not all(math.isfinite(v) for v in losses):
        print("warning: non-finite loss; try a smaller --lr", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out / "adapter.safetensors")
    _write_json_atomic(out / "metrics.json", {
        "method": args.method, "rank": args.rank, "device": str(device), "steps": args.steps,
        "size": args.size, "lr": args.lr, "seed": args.seed, "backend": current_backend(),
        "losses": losses, "step_time_s": step_time, "trainable_params": trainable,
        "total_params": total, "adapted_layers": n_layers,
        "versions": {"torch": torch.__version__, "monai": monai.__version__,
                     "tenvoo_fast": __version__},
    })
    print(f"wrote {out / 'metrics.json'} and {out / 'adapter.safetensors'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per command, each bound to its ``_cmd_*`` function."""
    parser = argparse.ArgumentParser(
        prog="tenvoo-fast",
        description="Tensor-network adapters (TenVOO, QuanTA) and baselines for 3D conv nets.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", help="fine-tune a tiny diffusion UNet on synthetic phantoms for a few steps",
        description="Inject adapters into a tiny MONAI DiffusionModelUNet, train a few DDPM "
                    "steps on synthetic brain phantoms, print a summary and save "
                    "metrics.json and adapter.safetensors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--method", choices=METHODS, default="tenvoo-l", help="adapter method")
    demo.add_argument("--rank", type=int, default=4, help="adapter rank")
    demo.add_argument("--steps", type=_positive_int, default=8, help="training steps")
    demo.add_argument("--size", type=_volume_size, default=16, help="volume side in voxels")
    demo.add_argument("--lr", type=float, default=1e-3,
                      help="Adam learning rate (the paper uses 5e-5; larger shows movement sooner)")
    demo.add_argument("--seed", type=int, default=0, help="seed for weights, phantoms and noise")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="torch device")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse exits with 2 on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "device", None) is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            parser.error(f"--device: {e}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available; use --device cpu")
    try:
        return args.func(args)
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
