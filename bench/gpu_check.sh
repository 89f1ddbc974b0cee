#!/usr/bin/env bash
# One-call check of the GPU path on a machine with a CUDA GPU and no network (torch with CUDA,
# triton, ninja and pytest already installed):
#   1. builds paradis_fast._C with its CUDA kernels (csrc/cuda/*.cu);
#   2. runs tests/test_gpu.py and the CUDA cases of tests/test_autocast.py: the ops' CUDA kernels
#      (Triton and CUDA C++) against the float64 oracles, fp32 and bf16, and under autocast in bf16
#      and fp16; a training step against the reference backend, torch.compile;
#   3. runs bench/run.py on CUDA (the naive loop, the best plain PyTorch way, torch._grouped_mm
#      where it applies, cuDNN BatchNorm, paradis_fast) and prints its ratio table last.
# The whole check stays within GPU_CHECK_SECONDS (default 480). Exits non-zero if the build or a
# test fails. Usage: bash bench/gpu_check.sh [extra bench/run.py arguments, default --no-compile]
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=${GPU_CHECK_SECONDS:-480}
DEADLINE=$((SECONDS + BUDGET))
OUT=${GPU_CHECK_OUT:-bench/results/gpu}
BENCH_ARGS=("$@")
[ ${#BENCH_ARGS[@]} -eq 0 ] && BENCH_ARGS=(--no-compile)  # torch.compile of the loop is not a GPU baseline
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset PARADIS_BACKEND TRITON_INTERPRET

step() { echo; echo "=== gpu_check [$((SECONDS))s/${BUDGET}s]: $*"; }
left() { echo $((DEADLINE - SECONDS > 10 ? DEADLINE - SECONDS : 10)); }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python - <<'EOF' || exit 1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "| device:",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed (the triton backend will be skipped)")
if not (torch.version.cuda and torch.cuda.is_available()):
    raise SystemExit("gpu_check: torch sees no CUDA device; run this on a GPU machine with a CUDA build of torch")
EOF

step "build the extension with its CUDA kernels (offline)"
if ! timeout "$(left)" pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  echo "pip install -e . failed (see $OUT/build.log); building in place instead"
  timeout "$(left)" python setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
tail -3 "$OUT/build.log"
python - <<'EOF' || exit 1
import torch
from paradis_fast.ops import available_backends, library
for op in ("sliced_conv2d", "switch_batch_norm"):
    source = "Triton" if op in library.TRITON_CUDA_OPS else "CUDA C++"
    print(f"{op}: backends for CUDA tensors {available_backends(op, 'cuda')}, CUDA kernels: {source}")
if "switch_batch_norm" in library.TRITON_CUDA_OPS:
    raise SystemExit("gpu_check: the CUDA kernels were not built into paradis_fast._C")
EOF

step "GPU tests"
timeout "$(left)" python -m pytest -q -rs tests/test_gpu.py tests/test_autocast.py -k "not (test_autocast and cpu)" 2>&1 | tee "$OUT/tests.log" | tail -25
tests_status=${PIPESTATUS[0]}
if [ "$tests_status" -ne 0 ]; then
  echo "gpu_check: GPU tests FAILED (status $tests_status, log $OUT/tests.log); running the benchmark anyway"
fi

step "benchmark on CUDA: bench/run.py --device cuda ${BENCH_ARGS[*]}"
timeout "$(left)" python bench/run.py --device cuda --out "$OUT" "${BENCH_ARGS[@]}"
bench_status=$?
# the ratio table stays the last thing printed when all went well
if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then
  echo "gpu_check: FAILED (tests status $tests_status, benchmark status $bench_status) after ${SECONDS}s" >&2
  exit 1
fi
