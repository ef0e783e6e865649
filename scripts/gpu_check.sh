#!/usr/bin/env bash
# The prepared accelerator check: run from the repository root on a machine with a GPU,
#
#   OUT=/some/dir scripts/gpu_check.sh          # about 6 minutes on one H200
#   OUT=/some/dir scripts/gpu_check.sh --dry    # the same steps, tiny, on the CPU (the suite runs
#                                               # this; float32 only)
#
# 1. environment: JAX's version and devices (a CUDA jaxlib is installed from the package
#    registry when JAX sees no GPU and the registry is reachable);
# 2. the fast part of the test suite (-m "not slow") on the GPU;
# 3. `bench` on the four configs (paper, small, deep, big-batch), float32 and bfloat16,
#    with the naive floor, SGD, AdaGrad and compile times;
# 4. a short `reproduce` run on the digits.
# Everything lands under $OUT (at most 8 files, two folders deep): log.txt, env.txt,
# bench-float32/bench.{json,md}, bench-bfloat16/bench.{json,md}, reproduce/summary.md.
# A failing step is logged and the script goes on to the next; it exits non-zero if any failed.
set -uo pipefail

dry=0
[ "${1:-}" = "--dry" ] && dry=1
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
log="$OUT/log.txt"
: >"$log"
failed=0
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: run, log, note a failure, go on
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$log"
  local start=$SECONDS
  if "$@" >>"$log" 2>&1; then
    echo "== $name: ok in $((SECONDS - start)) s" | tee -a "$log"
  else
    echo "== $name: FAILED (exit $?) after $((SECONDS - start)) s" | tee -a "$log"
    failed=1
  fi
}

if [ "$dry" = 1 ]; then
  export JAX_PLATFORMS=cpu
  tests=(tests/test_export.py -k "mlp and float32")
  bench=(--configs tiny --rounds 2 --warmup 1)
  dtypes=(float32)
  reproduce=(--epochs 1 --search-epochs 1 --alphas 1 --hidden 16 16 --methods path-sgd --inits balanced)
else
  # A CUDA build of jaxlib, if JAX has no GPU yet (needs the package registry).
  if ! "$python" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
    step install-jax-cuda "$python" -m pip install -q -U "jax[cuda13]"
  fi
  tests=(-m "not slow" -x)
  bench=()
  dtypes=(float32 bfloat16)
  reproduce=(--epochs 5 --search-epochs 3)
fi

# The package itself, on the JAX, Optax and Flax already there (no network needed).
if ! "$python" -c 'import optax_path' 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$python" - >"$OUT/env.txt" 2>&1 <<'EOF'
import platform, jax, jaxlib, optax, flax
print('python', platform.python_version(), '| jax', jax.__version__, '| jaxlib', jaxlib.__version__,
      '| optax', optax.__version__, '| flax', flax.__version__)
print('backend', jax.default_backend(), '| devices', jax.devices())
EOF
cat "$OUT/env.txt" | tee -a "$log"

step tests "$python" -m pytest -q -p no:cacheprovider "${tests[@]}"
for dtype in "${dtypes[@]}"; do
  step "bench-$dtype" "$python" -m optax_path.experiments bench "${bench[@]}" --dtype "$dtype" \
    --out "$OUT/bench-$dtype"
done
scratch=$(mktemp -d)
step reproduce "$python" -m optax_path.experiments reproduce "${reproduce[@]}" --dtype float32 \
  --out "$scratch/reproduce"
mkdir -p "$OUT/reproduce"
cp "$scratch/reproduce/summary.md" "$OUT/reproduce/" 2>/dev/null || true
rm -rf "$scratch"
echo "== done; failed=$failed; results in $OUT" | tee -a "$log"
exit "$failed"
