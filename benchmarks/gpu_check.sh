#!/usr/bin/env bash
# The GPU path, checked in one command on any CUDA machine (docs/gpu.md, "Checking the GPU path"):
#
#   bash benchmarks/gpu_check.sh                 # install what is missing, the gpu tests, the benchmark
#   bash benchmarks/gpu_check.sh --no-bench      # the tests only
#   bash benchmarks/gpu_check.sh --fill-wheels [fill options]   # on a networked machine: fill benchmarks/wheels
#
# 1. Installs the dependencies the image lacks from benchmarks/wheels/*.whl (no network: pip --no-index), or,
#    without that folder, says so and uses what is installed; then sublim itself (pip install --no-deps -e .).
# 2. Runs the tests marked gpu (tests/test_gpu.py; skipped, "no CUDA device", without one).
# 3. Benchmarks constrained sampling and LoRA training, tokens/s on this machine's CPU and on CUDA in one run.
# 4. Prints pass/fail/skip counts and the benchmark table. Everything goes to a log: outputs/gpu_check/<time>/
#    (or $GPU_CHECK_OUT) holds gpu_check.log, junit.xml and bench.json.
# Exit status: 1 if a test failed or could not run, 3 if only the benchmark failed, 0 otherwise.
#
# Settings: PYTHON (default python3, else python), GPU_CHECK_WHEELS (default benchmarks/wheels), GPU_CHECK_OUT,
# GPU_BENCH_ARGS (passed to `gpu_bench.py bench`, e.g. "--size tiny --repeats 1").
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/benchmarks/wheels}
HELPER="$ROOT/benchmarks/gpu_bench.py"

if [[ "${1:-}" == "--fill-wheels" ]]; then
  shift
  exec "$PYTHON" "$HELPER" fill "$WHEELS" "$@"
fi

BENCH=1
for arg in "$@"; do
  case "$arg" in
    --no-bench) BENCH=0 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done

OUT=${GPU_CHECK_OUT:-$ROOT/outputs/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || exit 1
LOG="$OUT/gpu_check.log"

step() { printf '\n== %s\n' "$*"; }

check() {
  export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline WANDB_SILENT=true
  step "machine"
  echo "python: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "nvidia-smi: not found"
  fi

  step "dependencies (wheels folder: $WHEELS)"
  # what is missing, from the wheels folder (pip --no-index); then sublim itself: pip install --no-deps -e .
  "$PYTHON" "$HELPER" deps --install --wheels "$WHEELS"
  "$PYTHON" - <<'EOF'
import importlib
versions = {}
for name in ("torch", "transformers", "peft", "pytorch_lightning", "numba", "hydra", "omegaconf", "pydantic"):
    try:
        versions[name] = importlib.import_module(name).__version__
    except Exception as err:  # noqa: BLE001 - reported, the tests say the rest
        versions[name] = f"NOT IMPORTABLE ({type(err).__name__}: {err})"
print("  ".join(f"{k} {v}" for k, v in versions.items()))
try:
    import torch

    print(f"CUDA: {torch.cuda.is_available()}" + (f", {torch.cuda.get_device_name()}, torch built for CUDA "
                                                   f"{torch.version.cuda}" if torch.cuda.is_available() else ""))
    for module in ("sublim.distill", "sublim.teacher", "sublim.train"):  # what the tests import
        importlib.import_module(module)
    print("sublim imports: ok")
except Exception as err:  # noqa: BLE001
    print(f"sublim imports: FAILED ({type(err).__name__}: {err})")
EOF

  step "tests marked gpu"
  "$PYTHON" -m pytest tests/test_gpu.py -m gpu -v -rs -p no:cacheprovider --junitxml="$OUT/junit.xml"
  local tests=$?
  echo "pytest exit status: $tests"

  local bench=0
  if (( BENCH )); then
    step "benchmark: constrained sampling and LoRA training, CPU vs CUDA"
    # shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of options
    "$PYTHON" "$HELPER" bench --out "$OUT/bench.json" ${GPU_BENCH_ARGS:-}
    bench=$?
  fi

  step "summary"
  local report=(--junit "$OUT/junit.xml")
  if (( BENCH )); then report+=(--bench "$OUT/bench.json"); fi
  "$PYTHON" "$HELPER" summary "${report[@]}"
  echo "log: $LOG"
  if (( tests != 0 )); then return 1; fi
  if (( bench != 0 )); then return 3; fi
  return 0
}

check 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
