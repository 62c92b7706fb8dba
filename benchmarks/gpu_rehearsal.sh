#!/usr/bin/env bash
# Rehearse benchmarks/gpu_check.sh here, on the CPU, against a stand-in for the GPU image: a venv of its
# Python (3.12) holding torch 2.11 (PyPI's CUDA 13 build, the image's; it runs on the CPU) and only the image's
# packages that newllm's closure reaches (benchmarks/gpu_deps.py image: at the versions the device docs give,
# else pip's), none of this checkout's venv. Then the cp312 wheel folder is built as for the GPU, and
# gpu_check.sh runs with --device cpu --tiny (rehearsal sizes: same steps and code paths, small models) against
# a clean --target. Optionally the fast test tier runs on torch 2.11 too.
#
#   benchmarks/gpu_rehearsal.sh --smoke                    # ~15-20 min on a busy 2-core machine
#   benchmarks/gpu_rehearsal.sh --tests                    # the full check, then `pytest -m "not slow"` on torch 2.11
#
# Options: --python PY (default: pyenv's 3.12, else python3.12), --venv DIR (default /tmp/newllm_gpu312; kept
# between runs: the first build downloads ~4.5 GB), --out DIR (default /tmp/newllm_rehearsal),
# --smoke, --tests, --time-scale X (passed on; default 6: this machine's 2 shared cores against 16 and a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

py="" venv=/tmp/newllm_gpu312 out=/tmp/newllm_rehearsal smoke=() tests=0 scale=6
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) py=$2; shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --smoke) smoke=(--smoke); shift ;;
    --tests) tests=1; shift ;;
    --time-scale) scale=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_rehearsal.sh: unknown option $1 (see its header)" >&2; exit 2 ;;
  esac
done
if [[ -z $py ]]; then
  py=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | tail -n 1 || true)
  py=${py:-$(command -v python3.12 || true)}
fi
[[ -n $py && -x $py ]] || { echo "gpu_rehearsal.sh: no Python 3.12 found: give --python" >&2; exit 2; }
pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')

# The stand-in image. PIP_CONSTRAINT off: this machine caps torch at its local CPU wheel (2.13).
export PIP_CONSTRAINT=
if [[ ! -x $venv/bin/python ]]; then
  "$py" -m venv "$venv"
fi
# python-dateutil<4: 4.0 needs tzdata, which the image does not hold (so its dateutil is older).
mapfile -t image < <(.venv/bin/python benchmarks/gpu_deps.py image --python-version "$pyver")
"$venv/bin/python" -m pip install -q --progress-bar off torch==2.11.0 "${image[@]}" "python-dateutil<4"
extra=$("$venv/bin/python" -m pip list --format=freeze 2>/dev/null | cut -d= -f1 | tr 'A-Z_' 'a-z-' | sort |
        comm -23 - <(grep -v '^#' benchmarks/gpu_image.txt | cut -d= -f1 | sort) || true)
if [[ -n $extra ]]; then
  echo "gpu_rehearsal.sh: the stand-in holds packages the image lacks: $(echo $extra) (remove them from $venv)" >&2
  exit 1
fi

whl=$out/whl
benchmarks/gpu_wheels.sh --python-version "$pyver" --out "$whl"
git rev-parse --short HEAD >"$whl/COMMIT" 2>/dev/null || true
rc=0
benchmarks/gpu_check.sh --device cpu --tiny "${smoke[@]}" --python "$venv/bin/python" --wheels "$whl" \
  --target "$out/site" --out "$out/check" --time-scale "$scale" || rc=$?
if [[ $tests -eq 1 ]]; then
  # test_notebooks imports nbclient, a dev extra that neither the image nor the wheel folder holds; so is
  # pytest-xdist, which pyproject's addopts use (-n auto): -o addopts=-ra runs the tier in one process
  echo "=== the fast tier on $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)')"
  PYTHONPATH=$out/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    -o addopts=-ra -m "not slow" --ignore=tests/test_notebooks.py tests/ 2>&1 | tee "$out/fast_tier.log" | tail -n 5 || rc=$?
fi
exit $rc
