#!/usr/bin/env bash
# newllm on a CUDA machine in one call: install what the image lacks, run the device tests, the default run,
# bf16 and compiled quick runs, the three benchmarks and an Optuna study; print a summary table last.
#
#   benchmarks/gpu_check.sh                          # on the GPU machine: ~8 min at most (each step has a limit)
#   benchmarks/gpu_check.sh --smoke                  # a ~2-minute subset
#   benchmarks/gpu_check.sh --device cpu --smoke --python /tmp/py312/bin/python   # the CPU rehearsal
#
# Options:
#   --device cuda|cuda:N|cpu  where the tests, runs and benchmarks run (default cuda)
#   --smoke                   the subset: env, install, deps, a third of the device tests, a quick run, bf16,
#                             one Phase-1 benchmark case
#   --wheels DIR              the wheel folder from benchmarks/gpu_wheels.sh (default .whl)
#   --target DIR              where they are installed, emptied first (default /tmp/newllm_site); it goes on
#                             PYTHONPATH, so the machine's own torch and packages stay as they are
#   --out DIR                 summary, log, CSVs, the default run's metrics (default $OUT, else gpu_check_out);
#                             at most 8 files, as the device tool brings back
#   --python PY               the interpreter (default python3: on the GPU image, the one that holds torch)
#   --budget S                seconds for the whole check (default 470, --smoke 130): each step runs under its
#                             own limit, cut to what is left of the budget; a step with under 10 s left is
#                             SKIPPED, so the summary always comes, inside the device tool's call
#   --time-scale X            multiply every limit and the budget by X (default 1; the CPU rehearsal: 6)
#   --tiny                    rehearsal sizes (a 2-core CPU): runs with context_dim 32, vocab 512, 300 dialogues,
#                             3 Optuna trials, one small case per benchmark; the code paths are the same
# A step that fails says so at once (its last lines) and the next one runs; the exit status is 1 if any
# step failed or was skipped. Runs and studies go to a scratch folder; only --out comes back.
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda smoke=0 wheels=.whl target=/tmp/newllm_site out=${OUT:-gpu_check_out} python=python3 scale=1 budget="" tiny=0
usage() { echo "gpu_check.sh: $1 (see the header of benchmarks/gpu_check.sh)" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device=${2:-}; shift 2 ;;
    --smoke) smoke=1; shift ;;
    --tiny) tiny=1; shift ;;
    --wheels) wheels=${2:-}; shift 2 ;;
    --target) target=${2:-}; shift 2 ;;
    --out) out=${2:-}; shift 2 ;;
    --python) python=${2:-}; shift 2 ;;
    --time-scale) scale=${2:-}; shift 2 ;;
    --budget) budget=${2:-}; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) usage "unknown option $1" ;;
  esac
done
[[ $device =~ ^(cpu|cuda(:[0-9]+)?)$ ]] || usage "--device=$device is not allowed: cpu, cuda or cuda:N"
[[ $scale =~ ^[0-9]+([.][0-9]+)?$ ]] || usage "--time-scale=$scale: a positive number"
budget=${budget:-$([[ $smoke -eq 1 ]] && echo 130 || echo 470)}
[[ $budget =~ ^[0-9]+$ ]] || usage "--budget=$budget: whole seconds"
budget=$(awk -v b="$budget" -v s="$scale" 'BEGIN { printf "%d", b * s }')
compgen -G "$wheels/*.whl" >/dev/null || usage "--wheels=$wheels holds no .whl files: run benchmarks/gpu_wheels.sh"
command -v "$python" >/dev/null || usage "--python=$python is not an interpreter here"
[[ -n $target && $target != / ]] || usage "--target=$target: give a folder of its own"

mkdir -p "$out"
out=$(cd "$out" && pwd) log=$out/gpu_check.log summary=$out/summary.txt
: >"$log"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HOME=$scratch/hf
export PYTHONPATH=$target${PYTHONPATH:+:$PYTHONPATH}
# the checkout's commit; where no .git travelled (the device tool), the one written beside the wheels
commit=$(git rev-parse --short HEAD 2>/dev/null || cat "$wheels/COMMIT" 2>/dev/null || echo unknown)

rows=()
failed=0
# step NAME LIMIT_S COMMAND...: run it under a time limit (scaled), log everything, record status and seconds.
step() {
  local name=$1 limit=$2 rc=0 t0=$SECONDS status left
  shift 2
  limit=$(awk -v l="$limit" -v s="$scale" 'BEGIN { printf "%d", l * s }')
  left=$((budget - SECONDS - 15))  # 15 s kept for the last step's figure and the summary
  if [[ $left -lt 10 ]]; then
    failed=$((failed + 1))
    echo "!!! $name: SKIPPED, the ${budget} s budget is spent"
    rows+=("$name|SKIPPED|0|")
    : >"$scratch/step.log"
    return
  fi
  [[ $limit -le $left ]] || limit=$left
  printf '\n=== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"$log"
  # bash -c: the command may be one of the functions below (exported, with the variables they read)
  timeout --kill-after=15 "$limit" bash -c '"$@"' step "$@" >"$scratch/step.log" 2>&1 || rc=$?
  cat "$scratch/step.log" >>"$log"
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT ${limit}s" ;;
    *) status="FAIL rc=$rc" ;;
  esac
  if [[ $rc -ne 0 ]]; then
    failed=$((failed + 1))
    echo "!!! $name: $status -- its last lines:"
    tail -n 15 "$scratch/step.log" | sed 's/^/    /'
  else
    echo "--- $name: ok in $((SECONDS - t0)) s"
  fi
  rows+=("$name|$status|$((SECONDS - t0))|")
}
# figure ARGS...: the key figure of the step just run (benchmarks/gpu_figures.py ARGS), into its row.
figure() {
  [[ ${rows[-1]} == *"|ok|"* ]] && note "$("$python" benchmarks/gpu_figures.py "$@" 2>/dev/null | tail -n 1)"
}
note() {  # note TEXT: the key figure of the step just run, if it ran to the end
  [[ ${rows[-1]} == *"|ok|"* ]] && rows[-1]="${rows[-1]}${1:-?}"
}

install() {
  rm -rf "$target" && mkdir -p "$target" &&
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
    "$wheels"/*.whl &&
  # The project itself (--no-deps: its needs are the wheels and the image): its metadata is what Hydra's entry
  # point and gpu_deps.py read; the code that runs is this checkout's, first on sys.path (conf/ lies beside it).
  # Built from a copy: setuptools leaves build/ in the tree it builds.
  mkdir -p "$scratch/src" && cp -r pyproject.toml README.md newllm hydra_plugins "$scratch/src" &&
  "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$target" \
    "$scratch/src" &&
  echo "installed $(ls "$wheels"/*.whl | wc -l) wheels and newllm into $target"
}

newllm_run() {  # newllm_run NAME OVERRIDES...: one run into the scratch folder
  local name=$1
  shift
  # shellcheck disable=SC2086  # $sizes: overrides without spaces, one word each
  "$python" -m newllm.run device="$device" progress=false hydra.run.dir="$scratch/runs/$name" \
    paths.output_root="$scratch/outputs" $sizes "$@"
}

# What the runs and benchmarks are sized to: the real ones on a GPU, --tiny for a CPU rehearsal.
study_sizes=(hydra.sweeper.n_trials=6) b1=(--quick --reps 2 --iterations 5 --naive-budget 3) b2=(--quick --reps 2)
bm=(--quick --cap 10) sizes=""
if [[ $tiny -eq 1 ]]; then
  sizes="model.context_dim=32 model.embed_dim=24 tokenizer.vocab_size=512 data.num_conversations=300"
  study_sizes=(hydra.sweeper.n_trials=3 tokenizer.vocab_size=512 data.num_conversations=300)
  b1=(--dims 64 --layers 2 --tokens 1000 --reps 1 --iterations 3 --naive-budget 2)
  b2=(--dims 32 --steps 2 --reps 1) bm=(--tokens 1000 --dim 64 --cap 5)
fi
export -f install newllm_run
export python target wheels device scratch sizes
echo "gpu_check.sh: device=$device smoke=$smoke tiny=$tiny budget=${budget}s wheels=$wheels target=$target out=$out commit=$commit"
step env 60 "$python" benchmarks/gpu_figures.py env
note "$(tail -n 1 "$scratch/step.log")"
step install 120 install
note "$(ls "$wheels"/*.whl | wc -l) wheels + newllm"
step deps 60 "$python" benchmarks/gpu_deps.py check
note "$(tail -n 1 "$scratch/step.log")"

# -o addopts=-ra: pyproject.toml's addopts run the tests on pytest-xdist workers (-n auto), a dev extra that
# neither the image nor the wheel folder holds; the device tests run in one process here.
if [[ $smoke -eq 1 ]]; then
  tests=(tests/test_host_syncs.py tests/test_perf_paths.py tests/test_resume.py tests/test_hoisted.py)
  step tests 150 "$python" -m pytest -q -p no:cacheprovider -o addopts=-ra -m device --device "$device" "${tests[@]}"
  figure pytest "$scratch/step.log"
  step quick_run 90 newllm_run quick training=quick
  figure run "$scratch/runs/quick"
  step quick_bf16 60 newllm_run bf16 training=quick training.precision=bf16
  figure run "$scratch/runs/bf16"
  step bench_phase1 90 "$python" -m benchmarks.bench_phase1 --device "$device" --dims 64 --layers 2 \
    --tokens 1000 --iterations 3 --reps 1 --naive-budget 2 --whole "" --out "$out/phase1_speed.csv"
  figure csv "$out/phase1_speed.csv" phase1
else
  # test_notebooks imports nbclient at collection: a dev extra neither the image nor the wheels hold (its tests
  # are slow ones, none takes the device); the rehearsal found the collection error
  step tests 150 "$python" -m pytest -q -p no:cacheprovider -o addopts=-ra -m device --device "$device" \
    --ignore=tests/test_notebooks.py tests/
  figure pytest "$scratch/step.log"
  # The CLI killed in both phases and resumed (device=auto: CUDA where there is one) to identical metrics.
  step resume_cli 90 "$python" -m pytest -q -p no:cacheprovider -o addopts=-ra \
    "tests/test_resume.py::test_killed_in_both_phases_resumes_to_identical_metrics"
  figure pytest "$scratch/step.log"
  step default_run 150 newllm_run default
  figure run "$scratch/runs/default"
  cp "$scratch/runs/default/metrics.json" "$out/default_metrics.json" 2>/dev/null
  step quick_bf16 60 newllm_run bf16 training=quick training.precision=bf16
  figure run "$scratch/runs/bf16"
  step quick_compile 120 newllm_run compile training=quick training.compile=true
  figure run "$scratch/runs/compile"
  step bench_phase1 90 "$python" -m benchmarks.bench_phase1 --device "$device" "${b1[@]}" --whole "" \
    --out "$out/phase1_speed.csv"
  figure csv "$out/phase1_speed.csv" phase1
  step bench_phase2 60 "$python" -m benchmarks.bench_phase2 --device "$device" "${b2[@]}" --out "$out/phase2_speed.csv"
  figure csv "$out/phase2_speed.csv" phase2
  step bench_memory 60 "$python" -m benchmarks.bench_memory --device "$device" "${bm[@]}" --out "$out/memory.csv"
  figure csv "$out/memory.csv" memory
  step optuna_ppl_quick 120 "$python" -m newllm.run -m +sweep=optuna_ppl_quick device="$device" progress=false \
    paths.output_root="$scratch/outputs" "${study_sizes[@]}"
  figure study "sqlite:///$scratch/outputs/optuna.db"
fi

{
  echo
  echo "newllm GPU check: device=$device smoke=$smoke tiny=$tiny commit=$commit $(date -u '+%Y-%m-%d %H:%M UTC') host=$(hostname)"
  printf '%-16s | %-14s | %5s | %s\n' step status s "key figure"
  printf '%-16s-+-%-14s-+-%5s-+-%s\n' "----------------" "--------------" "-----" "----------"
  for row in "${rows[@]}"; do
    IFS='|' read -r name status secs fig <<<"$row"
    printf '%-16s | %-14s | %5s | %s\n' "$name" "$status" "$secs" "$fig"
  done
  echo "$failed step(s) failed or skipped; total ${SECONDS} s of a ${budget} s budget; log: $log"
} | tee "$summary"
rm -rf "$scratch"
[[ $failed -eq 0 ]]
