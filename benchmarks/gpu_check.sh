#!/usr/bin/env bash
# The GPU check in one command, for a machine with an NVIDIA GPU, torch (CUDA) and nvcc
# already installed and no network:
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. builds fasthg._C for the visible GPU (no build isolation, no downloads),
# 2. runs every test marked `cuda`,
# 3. runs the native and Triton op tests once more under compute-sanitizer memcheck
#    (small shapes: the hourglass-size cases are left out),
# 4. times the Triton BN-ReLU-conv1x1 unit against the fused BN-ReLU + cuDNN conv
#    (python -m fasthg.bench.conv1x1: 256->128 and 128->256 at 64, 32, 16, batch 16, bf16 and
#    float32, forward and forward+backward),
# 5. runs `fasthg bench` on the GPU (every level and channel count the hourglass runs, the
#    models in NCHW, float32 and bfloat16; no torch.compile, whose per-shape compiles alone
#    would outrun the 9 minutes this script has: `fasthg bench --device cuda --compile
#    --levels 64,32 --model hg2` gives those, and `--model-layouts nhwc` the models in
#    channels_last); the table and JSON are rewritten after every case, so a bench cut
#    short by the budget still leaves what it measured,
# 6. exports hg2 to ONNX (`fasthg export`, checked against PyTorch) and times hg2's inference
#    at batch 1 and 8: eager, folded, compile-freezing and, where onnxruntime-gpu is installed,
#    ONNX Runtime's CUDA provider (`fasthg bench --inference-fold`; its table goes into the summary),
# 7. times torchvision's ResNet-18 and ResNet-50 training steps (batch 32, channels_last,
#    float32 and bf16): eager, fasthg.accelerate (BN-ReLU and BN-add-ReLU fused) and the
#    no-BN/ReLU ceiling, and bn_add_relu at ResNet-50's block outputs, native and Triton against
#    eager (benchmarks/test_bench_resnet.py; skipped where torchvision is not installed),
# writing every log, JSON, table and chart into OUT_DIR (at most 8 files) and printing a
# short summary last. A failed build stops it at once; a failed later step is reported (its
# log's tail, and FAILED in the summary) and the steps after it still run, since GPU time is
# scarce and each step tells something on its own; the exit is non-zero if any step failed
# or ran past the budget of 9 minutes in all (GPU_CHECK_SECONDS=540).
set -euo pipefail
export PYTHONUNBUFFERED=1
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
summary="$out/summary.txt"
: > "$summary"

budget=${GPU_CHECK_SECONDS:-540}
failed=()

step() {  # step NAME LOG COMMAND...: run and time it; on failure, say so with the log's tail
  local name=$1 log=$2; shift 2
  local t0=$SECONDS left=$((budget - SECONDS)) rc=0
  echo "== $name" >&2
  if ((left <= 0)); then
    echo "FAILED: no time left for $name (budget ${budget} s)" | tee -a "$summary" >&2
    failed+=("$name")
    return 1
  fi
  timeout --kill-after=10 "$left" "$@" > "$log" 2>&1 || rc=$?
  if ((rc != 0)); then
    local why="exit $rc"
    ((rc == 124 || rc == 137)) && why="ran past the budget of ${budget} s"
    echo "FAILED: $name ($why; log: $log); last lines:" | tee -a "$summary" >&2
    tail -n 40 "$log" >&2
    failed+=("$name")
    return 1
  fi
  echo "ok   $name ($((SECONDS - t0)) s)" >> "$summary"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$summary"
step "build for the local GPU" "$out/build.log" \
  env FASTHG_CUDA=1 MAX_JOBS="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . ||
  { cat "$summary"; exit 1; }  # nothing after it can run
"$PY" -m fasthg info >> "$summary"
step "tests marked cuda" "$out/tests.log" "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --durations=15 || true
# Without PyTorch's caching allocator, so that an access past a tensor leaves its allocation.
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
step "compute-sanitizer memcheck (op tests, small shapes)" "$out/memcheck.log" \
  env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 --print-limit 20 \
  "$PY" -m pytest $("$PY" -m fasthg.ops --test-files) tests/test_conv1x1.py -m cuda -q -p no:cacheprovider \
  -k "not hourglass_sizes and not compile and not opcheck and not gradcheck" || true
# (its log, the table, goes into the summary: OUT_DIR holds 8 files already)
conv_log=$(mktemp)
step "Triton bn_relu_conv1x1 vs BN-ReLU + cuDNN conv" "$conv_log" \
  "$PY" -m fasthg.bench.conv1x1 --device cuda --levels 64,32,16 --batch 16 || true
step "fasthg bench on the GPU" "$out/bench.log" "$PY" -m fasthg bench --device cuda --levels 128,64,32,16,8,4 \
  --channels 128,256 --model hg2,hg8 --model-layouts nchw --out "$out/bench" || true
# Deployment: the ONNX export, and inference against the runtimes installed (not in OUT_DIR: 8 files there)
deploy_dir=$(mktemp -d)
deploy_check() {  # hg2 (fresh weights) exported to ONNX and checked; its inference in every runtime here
  "$PY" -c "import sys; from fasthg import checkpoint; from fasthg.models import hg2; checkpoint.save(sys.argv[1], hg2())" \
    "$deploy_dir/hg2.pt" &&
  "$PY" -m fasthg export "$deploy_dir/hg2.pt" "$deploy_dir/hg2.onnx" &&
  "$PY" -m fasthg bench --device cuda --inference-fold --model hg2 --model-layouts nhwc --model-repeats 5 \
    --out "$deploy_dir/bench"
}
export -f deploy_check
export PY deploy_dir
step "fasthg export + inference runtimes on the GPU" "$deploy_dir/deploy.log" bash -c deploy_check || true

resnet_dir=$(mktemp -d)
if "$PY" -c "import torchvision" 2>/dev/null; then
  step "torchvision ResNets accelerated, and bn_add_relu at their shapes" "$resnet_dir/resnet.log" \
    "$PY" benchmarks/test_bench_resnet.py --device cuda --no-compile --repeats 5 --out "$resnet_dir" || true
else
  echo "skipped: torchvision ResNets (torchvision is not installed)" >> "$summary"
fi

{  # (|| true: under pipefail a grep that matches nothing would end the script here)
  echo
  grep -E "passed|failed" "$out/tests.log" | tail -n 1 | sed 's/^/tests marked cuda: /' || true
  grep -E "ERROR SUMMARY" "$out/memcheck.log" | tail -n 1 | sed 's/^/memcheck: /' || true
  echo
  echo "fused vs eager, forward+backward (training) at 256 channels, float32, from $out/bench/bench.md:"
  grep -E "forward\+backward" "$out/bench/bench.md" | grep -E "\| 16x256x|train step" | grep "float32" |
    grep -v "| eager |" | cut -d"|" -f2-10 || true
  echo
  grep -E "^bn_relu_conv1x1:|^\|" "$conv_log" || true
  echo
  grep -E "^wrote .*onnx|checked" "$deploy_dir/deploy.log" || true
  grep -E "inference" "$deploy_dir/bench/bench.md" | cut -d"|" -f2-10 || true
  echo
  cat "$resnet_dir/resnet.md" 2>/dev/null || true
  if ((${#failed[@]})); then
    echo
    echo "FAILED steps: ${failed[*]}"
  fi
} >> "$summary"
cat "$summary"
((${#failed[@]} == 0))
