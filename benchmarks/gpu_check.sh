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
#
# GPU_CHECK_DRY=1 runs it on the CPU, as CI does (tests/test_gpu_check.py): no build (the
# installed extension), no nvidia-smi, no sanitizer, the tests collected only, every
# benchmark with --device cpu and tiny sizes (Triton in its interpreter); every step's command
# line runs and the summary is written, so that a script error shows up before a lent GPU's
# minutes are spent on it.
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
dry=${GPU_CHECK_DRY:-0}
if ((dry)); then  # the sizes of each step, and what a dry run leaves out
  dev=cpu collect=(--collect-only) sanitize=()
  conv_sizes=(--levels 4 --batch 1 --repeats 1)
  bench_sizes=(--levels 8,4 --channels 16 --model hg1 --repeats 2 --model-repeats 1 --image-size 64)
  deploy_sizes=(--model-repeats 1 --image-size 64 --dtypes float32)
  resnet_sizes=(--archs resnet18 --dtypes float32 --batch 1 --repeats 1)
  export TRITON_INTERPRET=1
else
  dev=cuda collect=() sanitize=()
  conv_sizes=(--levels 64,32,16 --batch 16)
  bench_sizes=(--levels 128,64,32,16,8,4 --channels 128,256 --model hg2,hg8)
  deploy_sizes=(--model-repeats 5)
  resnet_sizes=(--repeats 5)
fi

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

if ((dry)); then
  echo "dry run on the CPU (GPU_CHECK_DRY=1): no build, tests collected only, tiny benchmarks" >> "$summary"
  step "the installed extension (dry run: no build)" "$out/build.log" \
    "$PY" -c "from fasthg.ops import _ext; assert _ext._C is not None, _ext.LOAD_ERROR" || { cat "$summary"; exit 1; }
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$summary"
  step "build for the local GPU" "$out/build.log" \
    env FASTHG_CUDA=1 MAX_JOBS="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . ||
    { cat "$summary"; exit 1; }  # nothing after it can run
fi
"$PY" -m fasthg info >> "$summary"
step "tests marked cuda" "$out/tests.log" "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --durations=15 \
  "${collect[@]}" || true
# Without PyTorch's caching allocator, so that an access past a tensor leaves its allocation.
if ((!dry)); then
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  sanitize=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 --print-limit 20)
fi
step "compute-sanitizer memcheck (op tests, small shapes)" "$out/memcheck.log" \
  "${sanitize[@]}" "$PY" -m pytest $("$PY" -m fasthg.ops --test-files) tests/test_conv1x1.py -m cuda -q \
  -p no:cacheprovider -k "not resnet50_sizes and not hourglass_sizes and not compile and not opcheck and not gradcheck" \
  "${collect[@]}" || true
# (its log, the table, goes into the summary: OUT_DIR holds 8 files already)
conv_log=$(mktemp)
step "Triton bn_relu_conv1x1 vs BN-ReLU + cuDNN conv" "$conv_log" \
  "$PY" -m fasthg.bench.conv1x1 --device "$dev" "${conv_sizes[@]}" || true
step "fasthg bench on the GPU" "$out/bench.log" "$PY" -m fasthg bench --device "$dev" "${bench_sizes[@]}" \
  --model-layouts nchw --out "$out/bench" || true
# Deployment: the ONNX export, and inference against the runtimes installed (not in OUT_DIR: 8 files there)
deploy_dir=$(mktemp -d)
deploy_check() {  # hg2 (fresh weights) exported to ONNX and checked; its inference in every runtime here
  "$PY" -c "import sys; from fasthg import checkpoint; from fasthg.models import hg2; checkpoint.save(sys.argv[1], hg2())" \
    "$deploy_dir/hg2.pt" &&
  "$PY" -m fasthg export "$deploy_dir/hg2.pt" "$deploy_dir/hg2.onnx" &&
  "$PY" -m fasthg bench --device "$dev" --inference-fold --model hg2 --model-layouts nhwc $deploy_args \
    --out "$deploy_dir/bench"
}
export -f deploy_check
deploy_args=${deploy_sizes[*]}  # (bash exports strings, not arrays)
export PY deploy_dir dev deploy_args
step "fasthg export + inference runtimes on the GPU" "$deploy_dir/deploy.log" bash -c deploy_check || true

resnet_dir=$(mktemp -d)
if "$PY" -c "import torchvision" 2>/dev/null; then
  step "torchvision ResNets accelerated, and bn_add_relu at their shapes" "$resnet_dir/resnet.log" \
    "$PY" benchmarks/test_bench_resnet.py --device "$dev" --no-compile "${resnet_sizes[@]}" --out "$resnet_dir" || true
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
