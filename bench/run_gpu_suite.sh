#!/usr/bin/env bash
# The one script a GPU session runs: builds the CUDA extension, runs the GPU tests, compute-sanitizer and the
# benchmarks, and leaves everything in $OUT: suite.log (all output of this call), results.tar.gz (bench/results/
# with every CSV/MD/PNG, sanitizer logs, one log per stage), the test stages' junit-*.xml and a copy of each
# summary .md this call wrote (<device-slug>_<name>.md): at most 8 files, the device tool's limit.
#
# Through the device tool (it runs commands in the repository root; one command may take 10 minutes):
#   run(command="OFFLOAD_KERNELS_COMMIT=<short sha> bash bench/run_gpu_suite.sh build test",
#       carry=[".whl"], timeout_s=600)
#   - .whl/ (git-ignored) holds gguf-0.19.0-py3-none-any.whl: the GPU image has no gguf package, which
#     offload_kernels imports. If it is missing here: python3 -m pip download --no-deps --only-binary=:all:
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl gguf==0.19.0
#   - the copy on the GPU machine may lack .git: put the commit in the command (written out, not $(git ...)),
#     or the results say "unknown".
#   - PYTHONUNBUFFERED=1 is set here, so the output arrives as it happens.
#   Then read the files under the reply's files_at; `tar xzf results.tar.gz -C <dir>` and copy <dir>/results/
#   over bench/results/ of the checkout (the CSVs are appended, so the GPU's copy holds the older rows too).
#
# Stages, named as arguments, run in the order given (several per call when they fit):
#   build               pip install --no-build-isolation --no-deps -e . (nvcc, sm_90 only), offload-kernels info
#                       ~1-2 min
#   test                pytest -m gpu tests (no -x; junit XML), including tests/benchmarks/test_gpu_smoke.py,
#                       each benchmark on tiny settings: their CUDA code checked before the long stages  ~3-6 min
#   test-all            the whole test suite there (device-parametrized tests then take the CUDA path)
#   sanitize            tests/engine/run_compute_sanitizer.sh: memcheck, synccheck, racecheck (each at most
#                       200 s; racecheck, slowest, last: it did not finish in 6 min on the first H100 run)
#   profile             bench/profile_qmatmul.py --cprofile: host launch time vs kernel time per call  ~1-2 min
#   bench-kernels       offload-kernels bench kernels --quick (autotuned)                         ~3-6 min
#   bench-kernels-full  every qtype on the Llama-3-8B shapes, heuristic configs, in the time left
#   bench-formats       the formats added after the issue's six (q2_k, iq4_xs, iq4_nl, q4_1, q5_0, q5_1, mxfp4) on
#                       8192x8192 at M = 1, 2, 4, 16, 256, 4096, heuristic configs                  ~3-5 min
#   bench-transfer      offload-kernels bench transfer                                            ~2 min
#   bench-quantize      offload-kernels bench quantize (CPU and CUDA)                             ~1-2 min
#   bench-offload       offload-kernels bench offload (Llama-3-8B shape, 32 layers)               ~5-8 min
#   bench-offload-moe   the same on a Qwen3-30B-A3B shape (12 of its 48 layers: the fp16 baseline fits), --quick:
#                       MoE blocks (128 experts, 8 per token) resident, and 20% resident streamed whole, with the
#                       experts copied on demand through an expert cache, and with speculative expert prefetch
#                       (the same budget)                                                        ~5-8 min
#   bench-experts       offload-kernels bench experts: one MoE layer (Qwen3-30B-A3B, Mixtral) at 1-1024 tokens,
#                       the grouped expert GEMV and GEMM vs expert by expert vs the fp16 transformers module
#                       (stops at its time budget)                                                ~5 min
#   all                 all of the above but test-all and bench-kernels-full, in that order (SUITE_LIMIT_S=0 on a
#                       machine without the 10-minute limit)
# Every stage but build first builds the extension if it is missing (an idle machine is given back after 30 s,
# and a fresh one starts bare), so each stage runs on its own. Each stage gets at most its own limit and what is
# left of SUITE_LIMIT_S (default 570 s, under the tool's 600); one that cannot get 60 s is skipped, saying so.
# The benchmarks get a time budget below their stage's limit, so they stop early and still write their results.
# Without CUDA, the stages that need it say so and are skipped; the script then exits 0.
#
# A 30-minute device budget, one call per line, in this order (machine start and rebuild cost 1-3 min a call
# unless the next call follows within 30 s):
#   1. build test profile              correctness first, then where a call's time goes ~7-9 min
#   2. bench-offload                   issue 5's end-to-end numbers                    ~6-9 min
#   3. bench-kernels bench-transfer                                                    ~6-8 min
#   4. sanitize bench-quantize         if time is left                                 ~5-7 min
#   5. bench-experts bench-offload-moe if time is left                                 ~8-12 min
#   6. bench-formats                   if time is left                                 ~3-5 min
# The idle machine goes back 30 s after a call: send the next call at once, read the results afterwards.
# (First H100 run, 2026-11-24: calls 1-3 took 4, 6 and 3 min of command time, 1-2 min of start each.)
#
# Environment: PYTHON (default python3), OUT (default .device_out/ in the repo), SUITE_LIMIT_S (0: no limit),
# OFFLOAD_KERNELS_COMMIT, OFFLOAD_KERNELS_CUDA_ARCHS (default 90), RESULTS_DIR (default bench/results: the
# benchmarks' --out, and what results.tar.gz packs), OFFLOAD_ARGS (more options for bench-offload, e.g.
# "--no-autotune" if its log shows the 100% placement's warm-ups spending minutes autotuning, or "--quick").
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
PY="${PYTHON:-python3}"
OUT="${OUT:-$repo/.device_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export OFFLOAD_KERNELS_CUDA_ARCHS="${OFFLOAD_KERNELS_CUDA_ARCHS:-90}"
SUITE_LIMIT_S="${SUITE_LIMIT_S:-570}"
RESULTS="${RESULTS_DIR:-bench/results}"
PACK_S=25                                   # kept back for packing the results
work="$(mktemp -d)"
mkdir -p "$work/logs"
touch "$work/start-stamp"
declare -A LIMIT=([build]=360 [test]=480 [test-all]=560 [sanitize]=480 [profile]=240 [bench-kernels]=420
                  [bench-kernels-full]=560 [bench-formats]=420 [bench-transfer]=300 [bench-quantize]=300
                  [bench-offload]=560 [bench-offload-moe]=480 [bench-experts]=540)
STAGES=(build test test-all sanitize profile bench-kernels bench-kernels-full bench-formats bench-transfer bench-quantize
        bench-offload bench-offload-moe bench-experts)
ALL=(build test sanitize profile bench-kernels bench-transfer bench-quantize bench-offload bench-offload-moe bench-experts)
NEEDS_CUDA=" test test-all sanitize profile bench-kernels bench-kernels-full bench-formats bench-transfer bench-offload bench-offload-moe bench-experts "

usage() {
  echo "usage: bash bench/run_gpu_suite.sh STAGE [STAGE ...]   (stages: ${STAGES[*]} all)"
}

header() {
  echo "== offload_kernels GPU suite: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${OFFLOAD_KERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  else
    echo "no nvidia-smi"
  fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" || true
  echo "stages: $* | limit ${SUITE_LIMIT_S}s | OUT=$OUT"
}

seconds_left() {
  if (( SUITE_LIMIT_S == 0 )); then echo 1000000; else echo $(( SUITE_LIMIT_S - SECONDS - PACK_S )); fi
}

have_cuda() {
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

ensure_gguf() {
  if [[ -d /tmp/site && ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c "import gguf" 2>/dev/null && return 0
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  shopt -u nullglob
  if (( ${#wheels[@]} == 0 )); then
    echo "gguf is not installed and .whl/ has no wheels: carry .whl with the gguf wheel (see this script's header)"
    return 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" || return 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import gguf; print('gguf', gguf.__file__)"
}

# The extension imports, and carries the CUDA engine wherever a CUDA device is visible.
built() {
  "$PY" -c "import sys, torch, offload_kernels._C as c; sys.exit(0 if c.BUILT_WITH_CUDA or not torch.cuda.is_available() else 1)" 2>/dev/null
}

# guarded LIMIT CMD...: CMD, interrupted (SIGINT: Python writes what it has) at LIMIT seconds, killed 20 s later.
guarded() {
  local limit=$1
  shift
  timeout --signal=INT --kill-after=20 "$limit" "$@"
}

stage_build() {
  ensure_gguf || return 1
  guarded "$1" "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . || return 1
  "$PY" -m offload_kernels.cli.main info
  built || { echo "the extension was built without CUDA (no nvcc or no libcudart_static.a found)"; return 1; }
}

ensure_built() {
  ensure_gguf || return 1
  built && return 0
  echo "-- the CUDA extension is not built on this machine: building it first"
  local start=$SECONDS
  stage_build "${LIMIT[build]}" || return 1
  echo "-- built in $(( SECONDS - start )) s"
}

pytest_timeout_args() {
  "$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=300"
}

# run_stage NAME LIMIT: the stage's command, its output also in logs/NAME.log
run_stage() {
  local name=$1 limit=$2
  case "$name" in
    build) stage_build "$limit" ;;
    test)
      # The kernel tests compile ~200 Triton specializations: with pytest-xdist they compile in 4 processes.
      # The rest (engine overlap timings among them) run alone on the GPU afterwards, in the time left.
      local start=$SECONDS rc=0
      if "$PY" -c "import xdist" 2>/dev/null; then
        guarded "$limit" "$PY" -m pytest -m gpu tests/kernels -n 4 -q -rfEs -p no:cacheprovider \
          --junitxml="$work/junit-gpu-kernels.xml" $(pytest_timeout_args) || rc=$?
        local left=$(( limit - (SECONDS - start) ))
        (( left >= 60 )) || { echo "-- no time left for the non-kernel GPU tests"; return 1; }
        guarded "$left" "$PY" -m pytest -m gpu tests --ignore=tests/kernels -q -rfEs -p no:cacheprovider \
          --junitxml="$work/junit-gpu.xml" $(pytest_timeout_args) || rc=$?
        return $rc
      fi
      guarded "$limit" "$PY" -m pytest -m gpu tests -q -rfEs -p no:cacheprovider --junitxml="$work/junit-gpu.xml" \
        $(pytest_timeout_args) ;;
    test-all)
      guarded "$limit" "$PY" -m pytest tests -q -rfEs -p no:cacheprovider --junitxml="$work/junit-all.xml" \
        $(pytest_timeout_args) ;;
    sanitize)
      guarded "$limit" env PYTHON="$PY" OFFLOAD_KERNELS_SANITIZER_LOGS="$work/sanitizer" \
        bash tests/engine/run_compute_sanitizer.sh ;;
    profile)
      guarded "$limit" "$PY" bench/profile_qmatmul.py --cprofile ;;
    bench-kernels)
      guarded "$limit" "$PY" -m offload_kernels.cli.main bench kernels --quick --time-budget-s $(( limit > 120 ? limit - 60 : 60 )) --out "$RESULTS" ;;
    bench-kernels-full)
      guarded "$limit" "$PY" -m offload_kernels.cli.main bench kernels --no-autotune --shapes 4096x4096,14336x4096,4096x14336 \
        --time-budget-s $(( limit > 120 ? limit - 60 : 60 )) --out "$RESULTS" ;;
    bench-formats)
      guarded "$limit" "$PY" -m offload_kernels.cli.main bench kernels --no-autotune \
        --qtypes q2_k,iq4_xs,iq4_nl,q4_1,q5_0,q5_1,mxfp4 --shapes 8192x8192 --m 1,2,4,16,256,4096 \
        --time-budget-s $(( limit > 120 ? limit - 60 : 60 )) --out "$RESULTS" ;;
    bench-transfer)
      guarded "$limit" "$PY" -m offload_kernels.cli.main bench transfer --out "$RESULTS" ;;
    bench-quantize)
      guarded "$limit" "$PY" -m offload_kernels.cli.main bench quantize --reps 3 --out "$RESULTS" ;;
    bench-offload)
      guarded "$limit" "$PY" -m offload_kernels.cli.main bench offload --time-budget-s $(( limit > 200 ? limit - 100 : 100 )) \
        --out "$RESULTS" ${OFFLOAD_ARGS:-} ;;
    bench-offload-moe)
      guarded "$limit" "$PY" -m offload_kernels.cli.main bench offload --shape qwen3-30b-a3b --layers 12 --quick \
        --fractions 1,0.2 --experts-on-demand --expert-prefetch --time-budget-s $(( limit > 200 ? limit - 100 : 100 )) --out "$RESULTS" ${OFFLOAD_ARGS:-} ;;
    bench-experts)
      # the default MoE shapes in q4_k, then gpt-oss-20b's experts in the format its files ship (mxfp4)
      guarded $(( limit * 2 / 3 )) "$PY" -m offload_kernels.cli.main bench experts \
        --time-budget-s $(( limit > 300 ? limit * 2 / 3 - 100 : 100 )) --out "$RESULTS"
      guarded $(( limit / 3 )) "$PY" -m offload_kernels.cli.main bench experts --shapes gpt-oss-20b \
        --time-budget-s $(( limit > 300 ? limit / 3 - 60 : 60 )) --out "$RESULTS" ;;
  esac
}

main() {
  local stages=() summary=() status=0 cuda=1
  for arg in "$@"; do
    if [[ "$arg" == all ]]; then stages+=("${ALL[@]}")
    elif [[ -n "${LIMIT[$arg]+x}" ]]; then stages+=("$arg")
    else usage; echo "unknown stage: $arg"; return 2
    fi
  done
  (( ${#stages[@]} )) || { usage; return 2; }
  header "${stages[@]}"
  have_cuda || { cuda=0; echo "!! no CUDA device visible: stages that need one are skipped"; }
  ensure_gguf || echo "!! gguf is missing: every stage will fail to import offload_kernels"
  for name in "${stages[@]}"; do
    local left limit start rc
    left=$(seconds_left)
    limit=${LIMIT[$name]}
    (( left < limit )) && limit=$left
    echo
    echo "== stage $name ($(date -u +%H:%M:%S), ${limit}s allowed)"
    if (( cuda == 0 )) && [[ "$NEEDS_CUDA" == *" $name "* ]]; then
      echo "== $name: skipped (needs CUDA)"; summary+=("$name skipped-no-cuda 0"); continue
    fi
    if [[ "$name" != build ]]; then        # a fresh machine: build first, then what is left is the stage's
      ensure_built || { echo "== $name: no usable build"; status=1; summary+=("$name no-build 0"); continue; }
      left=$(seconds_left)
      (( left < limit )) && limit=$left
    fi
    if (( limit < 60 )); then
      echo "== $name: skipped (only ${left}s of this call left; run it in another call)"
      summary+=("$name skipped-no-time 0"); continue
    fi
    start=$SECONDS
    run_stage "$name" "$limit" 2>&1 | tee "$work/logs/$name.log"
    rc=${PIPESTATUS[0]}
    (( rc == 124 )) && echo "== $name: stopped at its ${limit}s limit"
    (( rc != 0 )) && status=1
    summary+=("$name rc=$rc $(( SECONDS - start ))s")
  done
  echo
  echo "== summary"
  printf '   %s\n' "${summary[@]}"
  return $status
}

# Results, logs, junit XML and the summaries this call wrote: at most 8 files in $OUT (the device tool's limit).
pack() {
  local pack="$work/pack" n=0 junit
  mkdir -p "$pack"
  [[ -d "$RESULTS" ]] && cp -r "$RESULTS" "$pack/results"
  cp -r "$work/logs" "$pack/logs"
  [[ -d "$work/sanitizer" ]] && cp -r "$work/sanitizer" "$pack/sanitizer"
  tar czf "$OUT/results.tar.gz" -C "$pack" .
  for junit in "$work"/junit-*.xml; do
    [[ -f "$junit" ]] && cp "$junit" "$OUT/" && n=$(( n + 1 ))
  done
  while IFS= read -r md; do
    (( n++ < 6 )) || break
    cp "$md" "$OUT/$(basename "$(dirname "$md")")_$(basename "$md")"
  done < <(find "$RESULTS" -name '*.md' -newer "$work/start-stamp" 2>/dev/null | sort)
  echo "== in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
}

main "$@" 2>&1 | tee -a "$OUT/suite.log"
status=${PIPESTATUS[0]}
pack
rm -rf "$work"
exit "$status"
