#!/usr/bin/env bash
# The main job (README): installs what is needed, then fine-tunes a tiny MONAI diffusion UNet
# with TenVOO adapters on built-in synthetic phantoms (GPU if present, else CPU) and writes
# runs/demo/metrics.json and runs/demo/adapter.safetensors. Extra arguments go to the command,
# e.g. `bash benchmarks/ddpm_finetune.sh --method tenvoo-q --steps 20`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
exec tenvoo-fast demo --out runs/demo "$@"
