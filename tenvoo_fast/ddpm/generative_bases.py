"""Base weights saved by MONAI Generative (the ``generative`` package the pretrained 3D brain
DDPMs of this field were trained with, before the code moved into MONAI core).

Their layout is recognised from the keys (attention projections directly under the block,
``to_q`` instead of ``attn.to_q``; upsampling convs named ``conv`` instead of ``postconv``) and
converted by MONAI's own loader (``DiffusionModelUNet.load_old_state_dict``). The old attention
block defined ``proj_attn`` but never applied it, so the UNet is built with ``include_fc=False``
(no output projection) to compute what the old class computed. MONAI's loader leaves a weight
the checkpoint lacks as initialised; here every weight starts as NaN and one left so is an error.
"""
from __future__ import annotations

import contextlib
import io
import re
from typing import Callable

import torch
from torch import nn

from ..errors import RunError, one_line

#: An old attention block's projection: ``<block>.to_q.weight`` with no ``attn.`` before it.
_OLD_ATTENTION = re.compile(r"\.to_[qkv]\.(weight|bias)$")


def old_layout(state: dict, own: dict) -> list[str]:
    """Keys of ``state`` in MONAI Generative's layout that ``own`` (a current UNet's state dict,
    either ``include_fc``) names otherwise; empty if ``state`` is in the current layout."""
    old = []
    for k in state:
        if k in own:
            continue
        attention = _OLD_ATTENTION.search(k)
        if attention and not k.endswith(".attn" + attention.group(0)) and (
                k[:attention.start()] + ".attn" + attention.group(0)) in own:
            old.append(k)
        elif ".upsampler.conv." in k and k.replace(".upsampler.conv.",
                                                    ".upsampler.postconv.") in own:
            old.append(k)
    return old


def without_projection(state: dict, own: dict) -> bool:
    """Whether ``state`` is a current-layout UNet saved with ``include_fc=False``: all it lacks
    of ``own`` (built with the projection) are the attention output projections."""
    missing = [k for k in own if k not in state]
    return bool(missing) and all(".attn.out_proj." in k for k in missing) and all(
        k in own for k in state)


def load_generative(build: Callable[..., nn.Module], state: dict, where: str,
                    what: str) -> tuple[nn.Module, str]:
    """(``build(include_fc=False)`` holding ``state``, a sentence saying what was detected).
    A checkpoint that does not fit is a :class:`RunError` naming ``where`` and the keys."""
    model = build(include_fc=False)
    renamed = len(old_layout(state, model.state_dict()))
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(float("nan"))
    remaining = dict(state)      # MONAI's loader pops what it uses
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # it prints what it matched
            model.load_old_state_dict(remaining)
    except KeyError as e:
        raise RunError(f"{where}: MONAI Generative layout, but {what} needs the key "
                       f"{one_line(e)}, which it lacks") from e
    except RuntimeError as e:
        wrong = re.search(r"size mismatch for ([^:]+): copying a param with shape "
                          r"(torch.Size\([^)]*\)).*?current model is (torch.Size\([^)]*\))",
                          str(e), re.S)
        detail = (f"{wrong.group(1)} is {wrong.group(2)}, expected {wrong.group(3)}" if wrong
                  else one_line(e)[:300])
        raise RunError(f"{where}: MONAI Generative layout, but it does not fit {what}: "
                       f"{detail}") from e
    unset = [k for k, t in model.state_dict().items()
             if t.is_floating_point() and torch.isnan(t).all()]
    if unset:
        raise RunError(f"{where}: MONAI Generative layout, but {len(unset)} weights of {what} "
                       f"are not in it (e.g. {unset[0]})")
    unused = [k for k in remaining if not k.endswith(("proj_attn.weight", "proj_attn.bias"))]
    if unused:
        raise RunError(f"{where}: MONAI Generative layout, but {len(unused)} of its keys fit "
                       f"nothing in {what} (e.g. {unused[0]})")
    note = (f"{where}: a MONAI Generative checkpoint ({renamed} keys in the old layout, "
            "converted by MONAI's load_old_state_dict); the UNet is built with "
            "include_fc=False, as the old attention never applied its output projection")
    return model, note
