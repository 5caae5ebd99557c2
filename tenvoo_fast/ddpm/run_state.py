"""A fine-tuning run's resumable state: its folder, what identifies it, and its checkpoints
(trained weights and ``state.pt``: optimizer, scaler, step, losses, learning-rate history and
every RNG state), published atomically by :mod:`.run_checkpoint`."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import RunError, one_line
from ..files import check_writable_folder
from ..model import save_adapter, unwrap
from ..model.config import METHODS as ADAPTER_METHODS
from . import run_checkpoint

METRICS, ADAPTER, TRAINED, STATE = "metrics.json", "adapter.safetensors", "trained.safetensors", \
    "state.pt"
#: What a checkpoint's state.pt holds.
STATE_KEYS = {"format", "step", "losses", "lr_history", "run", "optimizer", "scaler", "rng"}
STATE_FORMAT = "tenvoo_fast.finetune_state/1"


def weights_name(identity: dict) -> str:
    return ADAPTER if identity["method"] in ADAPTER_METHODS else TRAINED


def prepare_out(out: Path, opts) -> None:
    """Check ``--out`` can take the run before anything trains: a writable folder (created if
    missing), not another run's unless resuming or ``--overwrite``; remove what a killed
    checkpoint write left there."""
    check_writable_folder(out, "--out")
    manifest = run_checkpoint.read_manifest(out) if out.is_dir() else None
    if manifest is not None and not opts.resume:
        if not opts.overwrite:
            raise RunError(f"--out {out} holds a run (checkpoint of step {manifest['step']}); "
                           "continue it with --resume, replace it with --overwrite, or choose "
                           "another --out")
        # Replaced as asked: a later --resume must not find the old run's checkpoint.
        run_checkpoint.remove(out)
        manifest = None
    if opts.resume and manifest is None:
        legacy = (out / STATE).is_file()
        raise RunError(f"--resume: {out / run_checkpoint.MANIFEST} not found; "
                       + ("this run was saved by an older tenvoo_fast without RNG states, "
                          "so it cannot resume exactly: start it again" if legacy else
                          "start the run without --resume first"))
    removed = run_checkpoint.clean_stale(out)
    if removed:
        print(f"note: removed {len(removed)} leftover(s) of an interrupted checkpoint write in "
              f"{out} (e.g. {removed[0].name})", file=sys.stderr)


def run_identity(opts, size, amp, world_size) -> dict:
    """What a resumed run must share with the saved one to continue it exactly: the model,
    what trains, the seed (base weights, data split, noise), the data and how it is batched."""
    adapter = opts.method in ADAPTER_METHODS
    return {"preset": opts.preset, "method": opts.method,
            "rank": opts.rank if adapter else None,
            "targets": list(opts.targets) if adapter else None,
            "trainable": sorted(set(opts.trainable)) if adapter else None,
            "base_weights": str(Path(opts.base_weights).resolve()) if opts.base_weights else None,
            "seed": opts.seed, "size": list(size),
            "data": str(Path(opts.data).resolve()) if opts.data else None,
            "num_volumes": None if opts.data else opts.num_volumes,
            "spacing": list(opts.spacing) if opts.spacing else None,
            "batch_size": opts.batch_size, "accum": opts.accum, "amp": amp,
            "world_size": world_size,
            # None, not False, unfolded: checkpoints from before the option compare equal.
            "fold_frozen": True if getattr(opts, "fold_frozen", False) and adapter else None,
            # None for the default recipe, as above.
            "recipe": None if opts.recipe == "tenvoo_fast" else opts.recipe}


#: The option that sets each identity entry, for the refusal message.
IDENTITY_FLAGS = {"preset": "--preset", "method": "--method", "rank": "--rank",
                   "targets": "--targets", "trainable": "--trainable",
                   "base_weights": "--base-weights", "seed": "--seed", "size": "--size",
                   "data": "--data", "num_volumes": "--num-volumes", "spacing": "--spacing",
                   "batch_size": "--batch-size", "accum": "--accum", "amp": "--amp",
                   "world_size": "the number of processes", "fold_frozen": "--fold-frozen",
                   "recipe": "--recipe"}


def read_state(out: Path, identity: dict, world_size: int) -> dict:
    """The state of the latest checkpoint in ``out``; refuses another run's, or one started
    with options that would make the continuation differ from the uninterrupted run."""
    manifest = run_checkpoint.read_manifest(out)
    folder = run_checkpoint.checkpoint_folder(out, manifest)
    path = folder / STATE
    if not path.is_file():
        raise RunError(f"--resume: {path} is missing; the checkpoint was changed by hand")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"--resume: {path} is not readable ({one_line(e)})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT \
            or not STATE_KEYS <= set(state):
        raise RunError(f"--resume: {path} is not a tenvoo-fast finetune state "
                       f"(expected {STATE_FORMAT}); restore the run folder or start afresh")
    if state["step"] != manifest["step"]:
        raise RunError(f"--resume: {path} is of step {state['step']} but the manifest says "
                       f"{manifest['step']}; the checkpoint was changed by hand")
    shown = {"recipe": lambda v: v or "tenvoo_fast"}      # None stands for the default
    differences = [f"{IDENTITY_FLAGS[key]} (saved {shown.get(key, repr)(state['run'].get(key))}"
                   f", now {shown.get(key, repr)(value)})"
                   for key, value in identity.items() if state["run"].get(key) != value]
    if differences:
        raise RunError(f"--resume: the run in {out} was started with other options: "
                       f"{'; '.join(differences)}. Resume with the same options (only --steps, "
                       "--epochs, --lr and how it runs may change), or use another --out")
    state["folder"] = folder
    return state


def restore(state: dict, rank: int, optimizer, scaler, noise_rng, lr: float, say) -> dict:
    """Put the optimizer, scaler and RNG states of a checkpoint back; apply a changed ``lr``
    to the restored optimizer (and record it). Returns the run's bookkeeping."""
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"][rank], noise_rng)
    run = {"step": state["step"], "losses": list(state["losses"]),
           "lr_history": [list(x) for x in state["lr_history"]]}
    previous = run["lr_history"][-1][1]
    if lr != previous:
        for group in optimizer.param_groups:
            group["lr"] = lr
        run["lr_history"].append([state["step"] + 1, lr])
        say(f"resume: Adam lr {lr:g} from step {state['step'] + 1} (it was {previous:g}); "
            "recorded in metrics.json (lr_history)")
    return run


def rng_states(noise_rng: torch.Generator) -> dict:
    """Every RNG a step draws from, as tensors and lists (loadable with weights_only=True):
    the noise/timestep generator, and torch's, numpy's and Python's global ones."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"noise": noise_rng.get_state(), "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(gauss)],
            "python": [version, list(internal), gauss_next]}


def set_rng_states(rng: dict, noise_rng: torch.Generator) -> None:
    noise_rng.set_state(rng["noise"])
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(out: Path, model, optimizer, scaler, run: dict, identity: dict,
          base_origin: dict) -> None:
    """Publish the checkpoint of ``run['step']``: the trained weights and state.pt in one
    step folder (run_checkpoint), the weights also at the top of ``out``."""
    from safetensors.torch import save_file

    name = weights_name(identity)

    def write(folder: Path) -> list[str]:
        if name == ADAPTER:
            save_adapter(model, folder / name, base_origin=base_origin)
        else:
            tensors = {n: p.detach().cpu().contiguous()
                       for n, p in unwrap(model).named_parameters() if p.requires_grad}
            save_file(tensors, folder / name, metadata={"method": identity["method"]})
        torch.save({"format": STATE_FORMAT, "step": run["step"], "losses": run["losses"],
                    "lr_history": run["lr_history"], "run": identity,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "rng": run["rng"]}, folder / STATE)
        return [name, STATE]

    run_checkpoint.publish(out, run["step"], write, top_level=[name])


def check_finite_parameters(model, step: int, out: Path) -> None:
    """Refuse to checkpoint non-finite trained parameters (the last good checkpoint stays)."""
    bad = [n for n, p in unwrap(model).named_parameters()
           if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise RunError(f"step {step}: the update made {len(bad)} trained tensor(s) non-finite "
                       f"(e.g. {bad[0]}), so nothing was saved; {last_good(out)}; try a smaller "
                       "--lr")


def last_good(out: Path) -> str:
    manifest = run_checkpoint.read_manifest(out) if out.is_dir() else None
    if manifest is None:
        return "no checkpoint was saved before"
    return (f"the last good checkpoint (step {manifest['step']}) is kept in {out}: continue from "
            "it with --resume")
