"""``tenvoo-fast convert IN OUT``: adapters trained elsewhere as tenvoo_fast adapter files, and
tenvoo_fast LoRA as a peft adapter folder, for the DDPM's UNet presets.

What IN is decides the direction:

- a published TenVOO checkpoint (a torch file: the full state dict, or a ``save_peft`` file)
  -> OUT, a tenvoo_fast adapter file. The base is ``--base-weights``; without it, a full state
  dict's own base (adapted weights with the published folds undone) is written to
  ``--save-base`` and recorded as the adapter's base;
- a peft adapter folder (``adapter_config.json``) -> OUT, a tenvoo_fast adapter file, on the
  base ``--base-weights`` or the random UNet of ``--seed`` (as finetune draws it);
- a tenvoo_fast adapter file of LoRA -> OUT, a peft adapter folder, on the same base.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from ..convert import convert, export_peft
from ..errors import AdapterError, RunError, one_line
from ..files import atomic_path
from ..model.inject import adapter_layers
from ..model.adapter_file import (load_adapter, load_published, read_adapter_metadata,
                                  save_adapter)
from ..model.published_checkpoint import published_base, read_published
from . import finetune

#: The file a peft adapter folder is recognised by.
PEFT_CONFIG = "adapter_config.json"


def source_kind(path: Path) -> tuple[str, dict | None]:
    """(``"published"``, its state dict), (``"peft"``, None) or (``"tenvoo_fast"``, None); a
    :class:`RunError` for anything else."""
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return "peft", None
        raise RunError(f"convert {path}: a folder without {PEFT_CONFIG}, so not a peft adapter "
                       "folder; give a peft adapter folder, a published TenVOO checkpoint or a "
                       "tenvoo_fast adapter file")
    if not path.is_file():
        raise RunError(f"convert {path}: no such file or folder")
    try:
        read_adapter_metadata(path)
        return "tenvoo_fast", None
    except AdapterError:
        pass
    state = read_published(path)
    if state is not None:
        return "published", state
    raise RunError(f"convert {path}: not a published TenVOO checkpoint (no tenvoo_weights or "
                   "quanta_weights keys), a peft adapter folder or a tenvoo_fast adapter file")


def run(opts: argparse.Namespace) -> Path:
    src, out = Path(opts.input), Path(opts.output)
    kind, state = source_kind(src)
    if opts.save_base:
        if kind != "published":
            raise RunError(f"--save-base: only for a published checkpoint's own base; {src} is "
                           f"a {kind} adapter")
        if opts.base_weights:
            raise RunError("--save-base writes the base a published checkpoint holds; with "
                           "--base-weights there is nothing to write: drop one of them")
        if Path(opts.save_base).resolve() in (src.resolve(), out.resolve()):
            raise RunError(f"--save-base {opts.save_base}: is IN or OUT; choose another file")
    origin = {"preset": opts.preset, "seed": opts.seed, "base_weights": opts.base_weights}
    torch.manual_seed(opts.seed)              # as finetune does before building the base
    if kind == "published":
        model = _published(src, state, opts, origin)
    else:
        model = finetune.base_unet(opts.preset, opts.base_weights)
        if kind == "peft":
            try:
                from peft import PeftModel
            except ImportError:
                raise RunError(f"convert {src}: reading a peft adapter folder needs peft; "
                               "pip install peft") from None
            model = convert(PeftModel.from_pretrained(model, str(src)))
        else:
            load_adapter(model, src, base_mismatch="error")
            print(f"{src}: a tenvoo_fast adapter file; writing it as a peft adapter folder")
            export_peft(model, out)
            print(f"wrote {out}")
            return out
    save_adapter(model, out, base_origin=origin)
    print(f"wrote {out} ({kind} adapter, {len(adapter_layers(model))} adapted layers, base: "
          f"{json.dumps(origin)})")
    return out


def _published(src: Path, state: dict, opts, origin: dict):
    """The preset's UNet with the published checkpoint ``state`` (read from ``src``) loaded, its
    base compared; without --base-weights on the base the checkpoint holds, written to
    --save-base once the checkpoint has loaded."""
    if opts.base_weights:
        model = finetune.base_unet(opts.preset, opts.base_weights)
    elif opts.save_base:
        model = finetune.unet_from_state(opts.preset, published_base(state), f"convert {src}")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        origin["base_weights"] = str(opts.save_base)
    else:
        raise RunError(f"convert {src}: give --base-weights (the base it was trained on), "
                       "or --save-base PATH to write the base this checkpoint holds (its "
                       "adapted weights with the published folds undone) and use that")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_published(model, state, str(src), base_mismatch="error")
    for w in caught:
        print(f"warning: {one_line(w.message)}", file=sys.stderr)
    if opts.save_base:
        with atomic_path(opts.save_base) as tmp:
            torch.save(base_state, tmp)
        print(f"wrote {opts.save_base}: the base in {src}, its adapted weights with the "
              "published folds undone (within fp32 rounding of the true weights), its biases "
              "and norms as fine-tuned (the original base's are not in the checkpoint)")
    return model
