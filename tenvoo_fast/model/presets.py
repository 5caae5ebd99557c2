"""Ready-made configurations: the TenVOO paper's DDPM fine-tuning (ddpm-finetuning.md)."""
from __future__ import annotations

from .config import AdapterConfig

#: The paper's adapted modules (re.search on module names): 60 Conv3d and 51 Linear layers of
#: MONAI's DiffusionModelUNet. The middle block ('resnet_1', 'attention') is not matched, as in
#: the published code.
PAPER_DDPM_TARGETS = (
    r".*resnets.*.conv1.conv",
    r".*resnets.*.conv2.conv",
    r".*attentions.*.to_q",
    r".*attentions.*.to_v",
    r"time_embed.2",
    r".*resnets.*.time_emb_proj",
)


def paper_ddpm(method: str, rank: int = 4, *, joint: bool = False, **overrides) -> AdapterConfig:
    """The paper's targets and trainables for ``method``.

    Default: the cores, the biases of adapted layers and every parameter whose name contains
    "norm" (Table 1). ``joint=True``: everything except the adapted layers' frozen weights and
    biases (Table 2). ``overrides`` go to :class:`AdapterConfig`.
    """
    kwargs = dict(method=method, rank=rank, target_modules=list(PAPER_DDPM_TARGETS),
                  trainable=("all",) if joint else ("bias", "norm"))
    kwargs.update(overrides)
    return AdapterConfig(**kwargs)
