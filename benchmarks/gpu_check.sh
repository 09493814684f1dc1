#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one command (issue 18): training step (fp32/bf16,
# channels-last, cached teacher), two trials packed on one GPU, multi-scale CAMs, SAM's automatic
# mask generator, and the machine line. At most 8 minutes on one GPU, start-up included; every
# model is built from scratch, so nothing is downloaded at run time but pip packages.
#
#   bash benchmarks/gpu_check.sh --out gpu-check        # on a GPU: gpu-check/gpu_check.{json,md}
#   bash benchmarks/gpu_check.sh --dry-run --out DIR    # the same code on the CPU at toy sizes
#
# Other options go to benchmarks/gpu_check.py (--parts, --cap PART=SECONDS). Python, in order:
#   1. $GPU_CHECK_PYTHON, when set;
#   2. .venv/bin/python, once `make .venv/.installed` has run;
#   3. a python3 that already imports torch and timm (a GPU image with PyTorch matched to its
#      driver, and maybe no package registry): used as it is, with this checkout on PYTHONPATH;
#      wheels in .whl/ (segment-anything, say) are unpacked beside it without an index;
#   4. otherwise `make .venv/.installed` installs the project (pip packages only).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"   # --out and other paths stay relative to the caller's folder

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  py=$GPU_CHECK_PYTHON
elif [ -f "$root/.venv/.installed" ]; then
  py="$root/.venv/bin/python"
elif command -v python3 >/dev/null 2>&1 && python3 -c 'import torch, timm, cv2, yaml' >/dev/null 2>&1; then
  py=python3
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  if compgen -G "$root/.whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$root"/.whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
  fi
else
  echo "[gpu_check] no Python with torch found: installing the project (make .venv/.installed)" >&2
  make -C "$root" .venv/.installed
  py="$root/.venv/bin/python"
fi
echo "[gpu_check] python: $py ($("$py" -c 'import sys; print(sys.version.split()[0])')), set up in ${SECONDS} s" >&2
export GPU_CHECK_COMMAND="bash benchmarks/gpu_check.sh $*"
exec "$py" "$root/benchmarks/gpu_check.py" --setup-s "$SECONDS" "$@"
