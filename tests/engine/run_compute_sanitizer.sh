#!/usr/bin/env bash
# Runs the transfer engine's GPU tests under NVIDIA compute-sanitizer: memcheck (out-of-bounds and misaligned
# device accesses, invalid API use such as copies into freed slots), racecheck (shared-memory hazards in
# device code) and synccheck (invalid synchronization in device code). Needs a CUDA device, compute-sanitizer
# on PATH (or CUDA_HOME/bin) and the CUDA build of the extension.
#
# On a GPU machine, from the repository root:
#   pip install --no-build-isolation --no-deps -e .      # the CUDA build (nvcc must be found)
#   tests/engine/run_compute_sanitizer.sh                # all three tools; exit status 0 only if all pass
#   tests/engine/run_compute_sanitizer.sh memcheck       # one tool; extra args go to pytest, e.g. -k overlap
#
# Timing assertions are skipped under the sanitizer (OFFLOAD_KERNELS_UNDER_SANITIZER=1), since it slows
# everything down; the protocol, byte checks and fences are all still exercised. Logs go to
# $OFFLOAD_KERNELS_SANITIZER_LOGS (default: sanitizer-logs/ in the current directory).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
sanitizer="$(command -v compute-sanitizer || true)"
if [[ -z "$sanitizer" ]]; then
  for dir in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [[ -n "$dir" && -x "$dir/bin/compute-sanitizer" ]]; then sanitizer="$dir/bin/compute-sanitizer"; break; fi
  done
fi
if [[ -z "$sanitizer" ]]; then
  echo "run_compute_sanitizer.sh: compute-sanitizer not found (add CUDA's bin to PATH or set CUDA_HOME)" >&2
  exit 2
fi
python="${PYTHON:-python}"
if ! "$python" -c "import sys, torch, offload_kernels._C as c; sys.exit(0 if c.BUILT_WITH_CUDA and torch.cuda.is_available() else 1)"; then
  echo "run_compute_sanitizer.sh: needs a CUDA device and the CUDA build of offload_kernels._C" >&2
  exit 2
fi

# racecheck last: it instruments every shared-memory access of every kernel in the process (torch's
# reductions in the byte checks included), which makes it by far the slowest; the engine's own device code
# (the spin kernel) uses no shared memory. Each tool gets at most OFFLOAD_KERNELS_SANITIZER_TOOL_TIMEOUT_S
# (default 200 s) so a slow one cannot use up the others' time; a tool stopped there is reported as
# "timed out", which is neither clean nor an error found.
tools=(memcheck synccheck racecheck)
tool_timeout="${OFFLOAD_KERNELS_SANITIZER_TOOL_TIMEOUT_S:-200}"
if [[ $# -gt 0 && "$1" =~ ^(memcheck|racecheck|synccheck|initcheck)$ ]]; then
  tools=("$1")
  shift
fi
logs="${OFFLOAD_KERNELS_SANITIZER_LOGS:-$PWD/sanitizer-logs}"
mkdir -p "$logs"
export OFFLOAD_KERNELS_UNDER_SANITIZER=1

status=0
for tool in "${tools[@]}"; do
  log="$logs/$tool.log"
  echo "== compute-sanitizer --tool $tool (log: $log)"
  # No --leak-check: torch's caching allocator keeps its device memory until exit by design. The engine's own
  # memory is checked by the tests (torch.cuda.memory_allocated and live_host_memory back to baseline).
  rc=0
  timeout --signal=INT --kill-after=15 "$tool_timeout" \
    "$sanitizer" --tool "$tool" --error-exitcode 99 --target-processes all --log-file "$log" \
      "$python" -m pytest "$repo/tests/engine/test_engine_gpu.py" -m gpu -q -p no:cacheprovider "$@" || rc=$?
  if (( rc == 0 )); then
    echo "== $tool: clean"
  elif (( rc == 124 || rc == 137 )); then
    echo "== $tool: timed out after ${tool_timeout}s (incomplete: no verdict; see $log)"
    status=1
  else
    echo "== $tool: FAILED, exit $rc (see $log)"
    status=1
  fi
done
exit $status
