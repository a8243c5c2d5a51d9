#!/bin/bash
# The GPU measurements behind the README's GPU tables, each sized for one call of about 8 minutes:
#   bash scripts/gpu_campaign.sh kernels      # CUDA kernel tests, then scripts/bench_kernels.py
#   bash scripts/gpu_campaign.sh throughput   # scripts/bench_uptrain.py
#   bash scripts/gpu_campaign.sh decode       # scripts/bench_decode.py
#   bash scripts/gpu_campaign.sh quality      # scripts/quality_per_token.py
# Results (JSON + PNG stamped with git SHA, command, date, device) go to $OUT when it is set, else
# to benchmarks/results/<device>/. On a machine where supra is not installed and nothing can be
# downloaded, SUPRA_SITE=<dir> first installs the wheels and packages carried in .whl/ and supra
# itself into <dir>.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=()
if [ -n "${OUT:-}" ]; then out=(--out "$OUT"); fi
if [ -n "${SUPRA_SITE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SUPRA_SITE" .whl/*.whl
  cp -r .whl/site/. "$SUPRA_SITE/"
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$SUPRA_SITE" .
  export PYTHONPATH="$SUPRA_SITE" PATH="$SUPRA_SITE/bin:$PATH"
fi
case "${1:-}" in
  # -P: import the installed supra, not the checkout's supra/ (which lacks supra.kernels).
  kernels) python3 -P -m pytest -q tests/test_kernels_triton.py tests/test_kernels_triton_hybrid.py tests/test_kernels_triton_delta_rule.py || echo "KERNEL TESTS FAILED (timings follow)"
           python3 scripts/bench_kernels.py "${out[@]}" ;;
  throughput) python3 scripts/bench_uptrain.py "${out[@]}" ;;
  decode) python3 scripts/bench_decode.py "${out[@]}" ;;
  quality) python3 scripts/quality_per_token.py "${out[@]}" ;;
  *) echo "usage: $0 kernels|throughput|decode|quality" >&2; exit 2 ;;
esac
