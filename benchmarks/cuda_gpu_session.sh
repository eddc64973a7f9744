#!/bin/bash
# One GPU session for the cuda backend: just-in-time build, the GPU tests, then timings.
#   bash benchmarks/cuda_gpu_session.sh OUTDIR
# Writes OUTDIR/build.txt, OUTDIR/tests.txt and OUTDIR/cuda_check.md. About 5 minutes on an
# H100/H200 machine (build ~1-2 min with 16 cores, tests ~2 min, timings ~1 min).
set -u
OUT=${1:-.}
mkdir -p "$OUT"
export FASTPE_VERBOSE_BUILD=${FASTPE_VERBOSE_BUILD:-0}
start=$(date +%s)
python - <<'PY' 2>&1 | tee "$OUT/build.txt"
import time
t = time.time()
from fastpe import _ext
reason = _ext.unavailable_reason()
print(f"cuda backend: {reason or 'ready'} ({time.time() - t:.1f} s)")
raise SystemExit(1 if reason else 0)
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
python -m pytest tests/test_cuda_relative_attention.py tests/test_cuda_rotary.py tests/test_cuda_concat_projection.py \
  tests/test_cuda_compile.py -q -m gpu -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/tests.txt"
python benchmarks/cuda_check.py --out "$OUT" 2>&1 | tail -30
echo "total $(( $(date +%s) - start )) s"
