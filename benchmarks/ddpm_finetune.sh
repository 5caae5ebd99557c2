#!/usr/bin/env bash
# The main job (README): installs what is needed, then fine-tunes the tiny MONAI diffusion UNet
# with TenVOO-L adapters (the paper's targets, rank 4) on built-in synthetic phantoms, on the GPU
# if present, else the CPU. Writes runs/finetune/{metrics.json,adapter.safetensors,state.pt}.
# Extra arguments go to the command, e.g. `bash benchmarks/ddpm_finetune.sh --method tenvoo-q`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
exec tenvoo-fast finetune --preset tiny --steps 20 --lr 1e-3 --out runs/finetune "$@"
