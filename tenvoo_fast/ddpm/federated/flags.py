"""``tenvoo-fast federated``'s flags: the parser, the options they give, and the checks made
before any client starts (shared by the command and by a deployment's run config)."""
from __future__ import annotations

import argparse

from ...dispatch import STRATEGIES
from ...dispatch.backends import validate as validate_backend
from ...errors import AdapterError, RunError
from ...model.presets import PAPER_DDPM_TARGETS
from ..data import nifti_files
from ..finetune import METHODS, volume_size
from ..options import comma_list, non_negative_int, positive_float, positive_int
from .aggregation import MODES, SCHEMES
from .rounds import FederatedOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FederatedOptions()
    parser.add_argument("--clients", type=positive_int, default=d.clients,
                        help="number of clients (hospitals)")
    parser.add_argument("--client-data", type=comma_list, metavar="DIR,DIR,...",
                        help="one NIfTI folder per client, comma-separated (default: each "
                             "client's own synthetic phantoms, shifted in intensity, contrast, "
                             "noise and field of view)")
    parser.add_argument("--num-volumes", type=_counts, default=d.num_volumes,
                        metavar="N[,N,...]",
                        help="phantoms per client: one count for all, or one per client")
    parser.add_argument("--rounds", type=positive_int, default=d.rounds,
                        help="communication rounds (a resumed run continues to this)")
    parser.add_argument("--local-steps", type=positive_int, default=d.local_steps,
                        help="optimizer steps each client trains per round")
    parser.add_argument("--local-adaptation", type=non_negative_int, default=0,
                        help="after the last round, each client fine-tunes the aggregated "
                             "adapter this many steps and reports its validation loss")
    parser.add_argument("--aggregation", choices=SCHEMES, default=d.aggregation,
                        help="client weights: equal, by training volumes, or Rate-My-LoRA's")
    parser.add_argument("--mode", choices=MODES, default=d.mode,
                        help="exact: the mean of the clients' updates ΔW merged into the base; "
                             "factors: the mean of the adapter tensors (not the mean ΔW)")
    parser.add_argument("--lambda", dest="lam", type=float, default=d.lam,
                        help="Rate-My-LoRA's penalty λ (decays 5%% a round)")
    parser.add_argument("--preset", choices=("paper", "tiny"), default=d.preset,
                        help="the UNet")
    parser.add_argument("--method", choices=[m for m in METHODS if m not in
                                             ("full", "bias", "norm")], default=d.method,
                        help="adapter method")
    parser.add_argument("--rank", type=positive_int, default=d.rank, help="adapter rank")
    parser.add_argument("--base-weights", metavar="PATH",
                        help="torch state_dict of the base UNet (default: random, --seed)")
    parser.add_argument("--size", type=positive_int, nargs=3, metavar=("D", "H", "W"),
                        help="volume size (default: the preset's)")
    parser.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    parser.add_argument("--backend", default=d.backend,
                        help="adapter backend of the clients (as finetune's)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                        help="execution strategy of the clients (as finetune's)")
    parser.add_argument("--amp", choices=("bf16", "none"), default=d.amp,
                        help="the clients' autocast dtype (they run on the CPU)")
    parser.add_argument("--seed", type=non_negative_int, default=d.seed, help="seed")
    parser.add_argument("--out", default=d.out, metavar="DIR", help="output folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last finished round")
    parser.add_argument("--write-app", metavar="DIR",
                        help="do not run: write the Flower App folder with these options as its "
                             "run config, for `flwr run DIR CONNECTION` on a real SuperLink with "
                             "one SuperNode per client (README, 'Federated')")


def _counts(text: str) -> list[int]:
    try:
        return [int(v) for v in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give counts, e.g. 8 or 4,8,12") from None


def options(args: argparse.Namespace) -> FederatedOptions:
    return FederatedOptions(
        preset=args.preset, method=args.method, rank=args.rank, targets=list(PAPER_DDPM_TARGETS),
        base_weights=args.base_weights, clients=args.clients,
        client_data=list(args.client_data) if args.client_data else None,
        num_volumes=list(args.num_volumes), size=list(args.size) if args.size else None,
        rounds=args.rounds, local_steps=args.local_steps,
        local_adaptation=args.local_adaptation, lr=args.lr, aggregation=args.aggregation,
        mode=args.mode, lam=args.lam, seed=args.seed, backend=args.backend,
        strategy=args.strategy, amp=args.amp, out=args.out, resume=args.resume)


def check(opts: FederatedOptions) -> None:
    """What can be known before any client starts: sizes, the client folders, λ."""
    volume_size(opts.preset, opts.size)
    if opts.client_data is not None:
        if len(opts.client_data) != opts.clients:
            raise RunError(f"--client-data: {len(opts.client_data)} folders for --clients "
                           f"{opts.clients}; give one folder per client")
        for c, folder in enumerate(opts.client_data):
            nifti_files(folder, flag=f"--client-data (client {c})")
    elif len(opts.num_volumes) not in (1, opts.clients) or min(opts.num_volumes) < 2:
        raise RunError(f"--num-volumes {','.join(map(str, opts.num_volumes))}: give one count "
                       f"(at least 2: one validates) for all clients or one per client "
                       f"({opts.clients})")
    try:
        validate_backend(opts.backend)
    except AdapterError as e:
        raise RunError(f"--backend {opts.backend}: {e}") from None
    if not 0 <= opts.lam < 1:
        raise RunError(f"--lambda {opts.lam}: Rate-My-LoRA's penalty must be in [0, 1)")
