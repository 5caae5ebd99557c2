#!/usr/bin/env bash
# Everything a lent GPU is for, in ONE call of at most 8 minutes (a lent GPU has 15 minutes in
# all, its start included, and one command may run 10). Stages, each under its own time cap:
#   build   (130 s) - the native extensions in place, CUDA kernels for $CUDA_ARCH (build.log; on
#                     failure the later stages run without the cuda backend);
#   tests    (60 s) - a fast subset of the GPU oracle tests (tests/kernels/test_cuda.py: TenVOO-L/Q
#                     and QuanTA against the fp64 oracle in fp32 and bf16, every backend);
#   paper   (150 s) - the paper preset (128x128x96, bf16): full, TenVOO-L, TenVOO-Q side by side,
#                     $STEPS steps each, eager, one step counted (--count-launches);
#   graph    (90 s) - the same three with --graph (each step replayed as a CUDA graph);
#   memory   (40 s) - TenVOO-L with --checkpoint-activations (peak memory, bytes saved for
#                     backward; full's and TenVOO-L's without are in the paper stage).
# Optional, not in the default call (STAGES=channels,compile,layers, a second call):
#   channels (90 s) - full and TenVOO-L with --graph --channels-last (cuDNN's 3-D layout);
#   compile (150 s) - full and TenVOO-L with --compile (inductor compiles the paper UNet's forward
#                     and backward first: minutes, not measured yet, so it cannot share the
#                     decisive call);
#   layers  (300 s) - the layer benchmarks (DDPM shapes, bf16 autocast) beside the peft/LyCORIS
#                     peers.
# Raw results (device, versions, date, commands, logs) go to $OUT, to be committed under
# benchmarks/results/<device>-<date>/. The default caps add up to 470 s; a stage that overruns
# is killed and the next one starts, so the call ends in time whatever happens.
#
# Usage on the device:   bash benchmarks/gpu_session.sh
# Rehearsal on a CPU:    REHEARSAL=1 bash benchmarks/gpu_session.sh
#   (the same stages and commands on the tiny preset, 3 steps, no CUDA build: what
#   tests/test_gpu_session.py runs, so that the device call cannot fail on a typo).
# Wheels in .whl/ (MONAI, nibabel: the device image lacks them) are installed first.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
STAGES=${STAGES:-build,tests,paper,graph,memory}
mkdir -p "$OUT"
if [[ ${REHEARSAL:-0} == 1 ]]; then
  DEVICE=cpu PRESET=tiny STEPS=${STEPS:-3} CAP_SCALE=${CAP_SCALE:-2}
  echo "rehearsal: tiny preset on the CPU, $STEPS steps"
else
  DEVICE=cuda PRESET=paper STEPS=${STEPS:-12} CAP_SCALE=1
fi
cap() { echo $(( $1 * CAP_SCALE )); }    # a stage's time cap in seconds
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/session.log"; }
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # no install: the device has no network
cli="python3 -m tenvoo_fast"

if [[ ,$STAGES, == *,build,* ]]; then
  log "build"
  if [[ $DEVICE == cuda ]]; then
    ( time TENVOO_FAST_BUILD_CUDA=1 TENVOO_FAST_CUDA_ARCH="${CUDA_ARCH:-9.0}" MAX_JOBS=16 \
        timeout "$(cap 130)" python3 setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1
  else
    ( time TENVOO_FAST_BUILD_CUDA=0 timeout "$(cap 130)" python3 setup.py build_ext --inplace \
        ) > "$OUT/build.log" 2>&1
  fi
  log "build: exit $? (tail of $OUT/build.log:)"; tail -3 "$OUT/build.log"
fi
python3 - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import datetime, subprocess, torch, triton, monai, tenvoo_fast
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip() or "unknown"
print(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device,
      "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "monai", monai.__version__, "tenvoo_fast", tenvoo_fast.__version__, "commit", commit,
      "backends", tenvoo_fast.available_backends())
PY

if [[ ,$STAGES, == *,tests,* ]]; then
  log "tests"
  timeout "$(cap 60)" python3 -m pytest tests/kernels/test_cuda.py -q -p no:cacheprovider -rs \
    -k "tenvoo_conv_on_cuda and (float32 or bfloat16) or quanta_on_cuda and (float32 or \
bfloat16) or identical_to_base_at_init" 2>&1 | tee "$OUT/tests.log" | tail -4
fi

if [[ ,$STAGES, == *,layers,* ]]; then
  log "layers"
  timeout "$(cap 300)" python3 -m pytest benchmarks/test_layers.py benchmarks/test_peers.py -q \
    -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/layers.json" 2>&1 | tail -3
  python3 benchmarks/report.py "$OUT/layers.json" > "$OUT/layers.md" && head -5 "$OUT/layers.md"
fi

common="--preset $PRESET --device $DEVICE --accum 1 --steps $STEPS"
[[ $DEVICE == cuda ]] && common="$common --amp bf16"
[[ $DEVICE == cpu ]] && common="$common --num-volumes 3"
if [[ ,$STAGES, == *,paper,* ]]; then
  log "paper: $common"
  timeout "$(cap 150)" $cli profile $common --methods full,tenvoo-l,tenvoo-q --count-launches \
    --out "$OUT/paper" > "$OUT/paper.log" 2>&1
  log "paper: exit $?"; grep -A5 "^| method" "$OUT/paper/profile.md" 2>/dev/null | head -6
fi
if [[ ,$STAGES, == *,graph,* ]]; then
  log "graph: $common --graph"
  timeout "$(cap 90)" $cli profile $common --methods full,tenvoo-l,tenvoo-q --graph \
    --out "$OUT/graph" > "$OUT/graph.log" 2>&1
  log "graph: exit $?"; grep -A5 "^| method" "$OUT/graph/profile.md" 2>/dev/null | head -6
fi
if [[ ,$STAGES, == *,memory,* ]]; then
  log "memory: $common --checkpoint-activations"
  timeout "$(cap 40)" $cli profile $common --methods tenvoo-l --checkpoint-activations \
    --out "$OUT/memory" > "$OUT/memory.log" 2>&1
  log "memory: exit $?"; grep -A3 "^| method" "$OUT/memory/profile.md" 2>/dev/null | head -4
fi
if [[ ,$STAGES, == *,channels,* ]]; then
  log "channels: $common --graph --channels-last"
  timeout "$(cap 90)" $cli profile $common --methods full,tenvoo-l --graph --channels-last \
    --out "$OUT/channels" > "$OUT/channels.log" 2>&1
  log "channels: exit $?"; grep -A4 "^| method" "$OUT/channels/profile.md" 2>/dev/null | head -5
fi
if [[ ,$STAGES, == *,compile,* ]]; then
  log "compile: $common --compile"
  timeout "$(cap 150)" $cli profile $common --methods full,tenvoo-l --compile \
    --out "$OUT/compile" > "$OUT/compile.log" 2>&1
  log "compile: exit $?"; grep -A4 "^| method" "$OUT/compile/profile.md" 2>/dev/null | head -5
fi
log "done"
ls -la "$OUT"
