#!/usr/bin/env bash
# Everything a lent GPU is for, in one call (the device tool's machine, or any CUDA machine):
#   build   - the native extensions in place (CPU and CUDA kernels; build.log says if nvcc or
#             a header is missing there, and the later stages then run without the cuda backend);
#   tests   - tests/kernels/test_cuda.py: every backend against the fp64 oracle in fp32/bf16/fp16;
#   layers  - the layer benchmarks (DDPM shapes, bf16 autocast) beside peft/LyCORIS peers;
#   paper   - the paper preset (128x128x96, bf16) fine-tuned for real: full, lora, tenvoo-l,
#             tenvoo-q side by side, the TenVOO methods again on the reference backend, and a
#             torch.profiler summary of TenVOO-L, TenVOO-L/Q with --autotune (measured
#             backend and strategy per layer), and TenVOO-L forced to the factorized and
#             implicit-gemm strategies on the triton backend.
# Usage: STAGES=build,tests,layers,paper bash benchmarks/gpu_session.sh   (raw results in $OUT)
# Under a 10-minute limit per command, run it as three calls: STAGES=build,tests, then layers,
# then paper (the build is kept between calls on the same machine).
# Wheels in .whl/ (MONAI, nibabel, LyCORIS: the device image lacks them) are installed first.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
STAGES=${STAGES:-build,tests,layers,paper}
STEPS=${STEPS:-24}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # no install: the device has no network
if [[ ,$STAGES, == *,build,* ]]; then
  ( time TENVOO_FAST_BUILD_CUDA=1 TENVOO_FAST_CUDA_ARCH="${CUDA_ARCH:-9.0}" \
      MAX_JOBS=16 timeout 400 python3 setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1
  echo "build: exit $? (tail of $OUT/build.log:)"; tail -3 "$OUT/build.log"
fi
python3 - <<'PY' | tee "$OUT/environment.txt"
import datetime, torch, triton, monai, tenvoo_fast
print(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      torch.cuda.get_device_name(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "monai", monai.__version__, "tenvoo_fast",
      tenvoo_fast.__version__, "backends", tenvoo_fast.available_backends())
PY
cli="python3 -m tenvoo_fast"
if [[ ,$STAGES, == *,tests,* ]]; then
  timeout 480 python3 -m pytest tests/kernels/test_cuda.py tests/kernels/test_triton.py -q -p no:cacheprovider -rs 2>&1 \
    | tee "$OUT/tests.log" | tail -5
fi
if [[ ,$STAGES, == *,layers,* ]]; then
  timeout 300 python3 -m pytest benchmarks/test_layers.py benchmarks/test_peers.py -q \
    -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/layers.json" 2>&1 | tail -3
  python3 benchmarks/report.py "$OUT/layers.json" > "$OUT/layers.md" && cat "$OUT/layers.md"
fi
if [[ ,$STAGES, == *,paper,* ]]; then
  common="--preset paper --amp bf16 --accum 1 --steps $STEPS --device cuda"
  timeout 420 $cli profile $common --methods ${PAPER_METHODS:-full,lora,tenvoo-l,tenvoo-q} \
    --out runs/paper 2>&1 \
    | grep -v "it/s\]$" | tail -12
  timeout 240 $cli profile ${common/--steps $STEPS/--steps 12} --methods tenvoo-l,tenvoo-q \
    --backend reference \
    --out runs/paper-reference 2>&1 | tail -6
  [[ ${TRACE:-1} == 1 ]] && timeout 180 $cli finetune --preset paper --amp bf16 --accum 1 --steps 6 --device cuda \
    --method tenvoo-l --profile --overwrite --out runs/paper-trace 2>&1 | tail -4
  timeout 300 $cli profile ${common/--steps $STEPS/--steps 12} --methods tenvoo-l,tenvoo-q \
    --autotune --out runs/paper-autotune 2>&1 | tail -8
  for s in factorized implicit-gemm; do   # whole-model strategy comparison (TenVOO-L, triton)
    timeout 240 $cli profile ${common/--steps $STEPS/--steps 12} --methods tenvoo-l \
      --backend triton --strategy $s --out runs/paper-$s 2>&1 | tail -4
  done
  tar czf "$OUT/paper.tgz" runs/paper*/profile.* runs/paper*/*/metrics.json \
    runs/paper-trace/metrics.json runs/paper-trace/profile.txt 2>/dev/null
fi
ls -la "$OUT"
