#!/bin/bash
# The GPU measurements behind the README's GPU tables. One loan runs them all:
#   bash scripts/gpu_campaign.sh all         # every part below, each under its own time bound (<= 9 min in all)
#   bash scripts/gpu_campaign.sh rehearse    # every part at tiny sizes on CPU, no CUDA (the suite runs this)
# or one part at its full size:
#   bash scripts/gpu_campaign.sh kernels      # CUDA kernel tests, then scripts/bench_kernels.py
#   bash scripts/gpu_campaign.sh throughput   # scripts/bench_uptrain.py
#   bash scripts/gpu_campaign.sh decode       # scripts/bench_decode.py
#   bash scripts/gpu_campaign.sh quality      # scripts/quality_per_token.py
# Results (JSON + PNG stamped with git SHA, command, date, device) go to $OUT when it is set, else
# to benchmarks/results/<device>/. On a machine where supra is not installed and nothing can be
# downloaded, SUPRA_SITE=<dir> first installs the wheels and packages carried in .whl/ (`make wheels`
# puts fla's there) and supra itself into <dir>.
#
# `all` gives each part a wall-clock bound (`timeout`) and goes on past a part that fails or runs out, so
# its device time is at most the bounds' sum, 8 min 20 s, plus the SUPRA_SITE install (~30 s). Expected
# per part on an H100 (not yet measured; from compile counts and FLOPs): kernel tests ~60-100 s, mostly
# Triton JIT compiles of the tests' kernel variants; bench_kernels --quick ~120 s (compiles, fla's
# autotuning, do_bench); throughput ~60 s (4-layer Llama-7B shape, 2 x 2 configs of 4 steps of 65k
# tokens, ~0.6 s a step at 50% MFU); decode ~40 s (a 32k prefill and 8-token rounds); quality <= 80 s
# (60 s of uptraining per method, then the evaluations). A part over its bound writes no result file.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=()
if [ -n "${OUT:-}" ]; then out=(--out "$OUT"); fi
if [ -n "${SUPRA_SITE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SUPRA_SITE" .whl/*.whl || exit 1
  if [ -d .whl/site ]; then cp -r .whl/site/. "$SUPRA_SITE/"; fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$SUPRA_SITE" . || exit 1
  export PYTHONPATH="$SUPRA_SITE" PATH="$SUPRA_SITE/bin:$PATH"
fi
PY="${PYTHON:-python3}"
KERNEL_TESTS=(tests/test_kernels_triton.py tests/test_kernels_triton_hybrid.py tests/test_kernels_triton_delta_rule.py)
failed=()

# part NAME SECONDS COMMAND...: run one part under a time bound; record it when it fails.
part() {
  local name=$1 bound=$2
  shift 2
  echo "== $name (bound ${bound}s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$bound" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
  if [ $rc -ne 0 ]; then failed+=("$name (exit $rc)"); fi
}

fla_line() {
  if "$PY" -c "import fla" 2>/dev/null; then echo "fla: installed, compared"
  else echo "fla: not installed (make wheels carries it in .whl/): the fla comparison is skipped"; fi
}

case "${1:-}" in
  all)
    fla_line
    # -P: import the installed supra, not the checkout's supra/ (which lacks supra.kernels).
    part kernel-tests 100 "$PY" -P -m pytest -q -x "${KERNEL_TESTS[@]}"
    part bench-kernels 150 "$PY" scripts/bench_kernels.py --quick "${out[@]}"
    part throughput 90 "$PY" scripts/bench_uptrain.py --models llama7b-shape --seq-lens 2048 8192 --warmup 1 \
      --steps 3 "${out[@]}"
    part decode 80 "$PY" scripts/bench_decode.py --models llama7b-shape --lengths 2048 32768 --rounds 2 \
      --decode-tokens 8 "${out[@]}"
    part quality 80 "$PY" scripts/quality_per_token.py --budgets 1e6 2e6 --eval-tokens 5e5 --deadline 60 \
      "${out[@]}" ;;
  rehearse)
    # The same parts, their --dry-run sizes, on CPU through the Triton interpreter.
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    fla_line
    part kernel-tests 120 "$PY" -m pytest -q --collect-only "${KERNEL_TESTS[@]}"
    part bench-kernels 900 "$PY" scripts/bench_kernels.py --dry-run --quick "${out[@]}"
    part throughput 600 "$PY" scripts/bench_uptrain.py --dry-run "${out[@]}"
    part decode 600 "$PY" scripts/bench_decode.py --dry-run "${out[@]}"
    part quality 900 "$PY" scripts/quality_per_token.py --dry-run ${OUT:+--work "$OUT/runs"} "${out[@]}" ;;
  kernels) "$PY" -P -m pytest -q "${KERNEL_TESTS[@]}" || echo "KERNEL TESTS FAILED (timings follow)"
           "$PY" scripts/bench_kernels.py "${out[@]}" ;;
  throughput) "$PY" scripts/bench_uptrain.py "${out[@]}" ;;
  decode) "$PY" scripts/bench_decode.py "${out[@]}" ;;
  quality) "$PY" scripts/quality_per_token.py "${out[@]}" ;;
  *) echo "usage: $0 all|rehearse|kernels|throughput|decode|quality" >&2; exit 2 ;;
esac
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
