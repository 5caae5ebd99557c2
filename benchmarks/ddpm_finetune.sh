#!/usr/bin/env bash
# The main job (README): installs what is needed, then, on built-in synthetic phantoms (GPU if
# present, else CPU):
#  1. fine-tunes the tiny MONAI diffusion UNet with TenVOO-L (the paper's targets, rank 4):
#     runs/finetune/{metrics.json, adapter.safetensors, checkpoint.json, checkpoints/};
#  2. profiles full fine-tuning, LoRA, TenVOO-L and TenVOO-Q side by side:
#     runs/profile/{profile.md, profile.png, profile.json}.
# Extra arguments go to the fine-tune, e.g. `bash benchmarks/ddpm_finetune.sh --method tenvoo-q`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
tenvoo-fast finetune --preset tiny --steps 20 --lr 1e-3 --out runs/finetune --overwrite "$@"
tenvoo-fast profile --methods full,lora,tenvoo-l,tenvoo-q --preset tiny --steps 6 \
  --out runs/profile
echo
echo "main job done: runs/finetune/metrics.json, runs/profile/profile.md, runs/profile/profile.png"
