#!/usr/bin/env bash
# One prepared GPU check (issue 10): correctness of CUDA against the CPU, then speed on the GPU.
#
#   bash benchmarks/device_check.sh            # in the repository root, on the GPU machine
#
# Needs: Python with the project's dependencies, onnxruntime-gpu (1.31+, built for CUDA 13)
# and its CUDA 13 / cuDNN 9 libraries (system-wide, or the pip nvidia-*-cu13 packages);
# no network.  convlens is imported from this tree (PYTHONPATH), nothing is installed.
# Models: the bundled demo model always; the benchmark models small (and vgg) where
# benchmarks/.cache/models/export-*/ was copied over (with their .plain.onnx), and the
# benchmark photos where benchmarks/.cache/photos was (else the demo photos, reused).
# Writes device_check.md and device_check.json into $OUT (or ./device_check_out).
# Exit status: 0 all checks passed; 1 a check failed; 2 the GPU cannot be used.
# Takes about 3-6 minutes on an H200 with small + demo (a 480 s guard stops it).
# A dry run on a CPU-only machine: DEVICE=cpu bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_check_out}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "$PY" - <<'EOF'
import onnxruntime as ort, numpy, sys
print("python", sys.version.split()[0], "numpy", numpy.__version__, "onnxruntime", ort.__version__)
print("providers", ort.get_available_providers())
EOF
} 2>&1 | tee "$OUT/environment.txt"

if [ "$DEVICE" = cuda ]; then
  # does CUDA really load? (onnxruntime-gpu falls back to the CPU, saying why on stderr)
  if ! "$PY" -c "
from convlens.engine.runtime import open_session, DeviceError
import sys
try:
    open_session('convlens/demo/textures.onnx', 'cuda', runtime='onnxruntime')
except DeviceError as e:
    print(e); sys.exit(2)
print('CUDA loads')
" 2>&1 | tee -a "$OUT/environment.txt"; then
    echo "CUDA does not load: see $OUT/environment.txt" >&2
    exit 2
  fi
fi

timeout 480 "$PY" benchmarks/device_check.py --out "$OUT" --device "$DEVICE" \
  --images "${IMAGES:-256}" --repeats "${REPEATS:-3}" 2>&1 | tee "$OUT/device_check.log"
rc=${PIPESTATUS[0]}
[ -f "$OUT/device_check.md" ] && cat "$OUT/device_check.md"
exit "$rc"
