#!/usr/bin/env bash
# Build the wheel folder a GPU machine (no network, its own Python 3.12 + CUDA torch) needs to run newllm:
# exactly the packages of newllm's dependency closure that its image lacks (benchmarks/gpu_deps.py plan),
# one version of each, the versions installed in this venv (the tested ones).
#
#   benchmarks/gpu_wheels.sh                      # -> .whl/ (cp312, manylinux x86-64), prints its size
#   benchmarks/gpu_wheels.sh --python-version 3.11 --out /tmp/whl311   # same list for a cp311 rehearsal
#
# Options: --out DIR (default .whl), --python-version X.Y (default 3.12), --max-mb N (default 40: fail above).
# The folder is built aside and then replaces DIR whole, so no stale second version can stay in it.
# A package with no binary wheel on the index is built here with `pip wheel` (pure-Python ones only).
set -euo pipefail
cd "$(dirname "$0")/.."

out=.whl pyver=3.12 max_mb=40
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --python-version) pyver=$2; shift 2 ;;
    --max-mb) max_mb=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown option $1 (allowed: --out DIR, --python-version X.Y, --max-mb N)" >&2; exit 2 ;;
  esac
done
[[ $pyver =~ ^3\.[0-9]+$ ]] || { echo "gpu_wheels.sh: --python-version=$pyver: give X.Y, e.g. 3.12" >&2; exit 2; }

python=${PYTHON:-.venv/bin/python}
plan=$("$python" benchmarks/gpu_deps.py plan --python-version "$pyver")
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu_wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# pip matches manylinux_2_N tags exactly: offer every glibc level up to the machine's (Ubuntu 24.04: 2.39).
platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done

# The machine's torch comes from its image; a torch pin here must not reach pip (nor this machine's cap).
export PIP_CONSTRAINT=
for spec in $plan; do
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        "${platforms[@]}" -d "$tmp" "$spec" 2>"$tmp/.err"; then
    echo "gpu_wheels.sh: no binary wheel for $spec: building one from its sdist" >&2
    "$python" -m pip wheel -q --no-deps --no-binary=:all: -w "$tmp" "$spec"
  fi
done
rm -f "$tmp/.err"

# Only wheels that install on the target: pure Python, or this CPython's ABI.
tag=cp${pyver/./}
for w in "$tmp"/*.whl; do
  case "$(basename "$w")" in
    *-none-any.whl|*-"$tag"-*.whl|*-abi3-*.whl) ;;
    *) echo "gpu_wheels.sh: $(basename "$w") does not install on CPython $pyver" >&2; exit 1 ;;
  esac
done
want=$(wc -w <<<"$plan") got=$(ls "$tmp"/*.whl | wc -l)
[[ $want -eq $got ]] || { echo "gpu_wheels.sh: planned $want packages, got $got wheels" >&2; exit 1; }

rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$tmp" "$out" && trap - EXIT
bytes=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
ls -1 "$out"
printf 'gpu_wheels.sh: %d wheels for CPython %s in %s, %.1f MB\n' "$got" "$pyver" "$out" "$(bc -l <<<"$bytes/1000000")"
if (( bytes > max_mb * 1000000 )); then
  echo "gpu_wheels.sh: over --max-mb=$max_mb MB (the device tool carries at most 64 MiB with the working tree)" >&2
  exit 1
fi
