#!/usr/bin/env bash
# Run the kernels in interpret mode (kernels/interpret) under the C++ drivers in tests/kernels, built
# three ways with g++, and prove the sanitizers would catch the two bugs that matter most:
#   1. plain -O2                        full test matrix
#   2. -fsanitize=thread                --quick matrix; zero ThreadSanitizer reports
#   3. -fsanitize=address,undefined     --quick matrix; zero reports (buffers are exact-size)
#   4. planted faults in COPIES of kernels/ (sed into a temp dir; the real files are untouched):
#      - core_apply.cu without the __syncthreads() between staging a tile and reading it
#        (line tagged [sync:apply-staged]): TSan must report a data race;
#      - coo_apply's column bound `i < r` made `i <= r` (line tagged [bound:csr-cols]): ASan must
#        report a heap-buffer-overflow.
# Fails (exit 1) on any test failure, any sanitizer finding in 1-3, or a planted fault that is
# NOT caught. Needs g++ and the CUDA headers (cuda_bf16.h, cuda_fp16.h): from $CUDA_HOME/include
# or <repo>/.toolchain/cuda/include (installed by scripts/install-cuda-toolchain.sh if missing).
# Takes about 1.5 minutes on 2 cores (mostly compiling).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CXX="${CXX:-g++}"

find_cuda_include() {
  local d
  for d in "${SVFT_CUDA_INCLUDE:-}" "${CUDA_HOME:+$CUDA_HOME/include}" "${CUDA_PATH:+$CUDA_PATH/include}" \
           "$ROOT/.toolchain/cuda/include" /usr/local/cuda/include; do
    if [[ -n "$d" && -f "$d/cuda_bf16.h" && -f "$d/cuda_fp16.h" ]]; then echo "$d"; return 0; fi
  done
  return 1
}
CUDA_INC="$(find_cuda_include || true)"
if [[ -z "$CUDA_INC" ]]; then
  echo "CUDA headers not found; installing the pip toolchain" >&2
  "$ROOT/scripts/install-cuda-toolchain.sh" >/dev/null
  CUDA_INC="$(find_cuda_include)"
fi
echo "CUDA headers: $CUDA_INC"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
FAILED=0
fail() { echo "FAILED: $*"; FAILED=1; }

COMMON=(-std=c++17 -pthread -Wall -Wextra -Wno-unknown-pragmas -isystem "$CUDA_INC")

# build NAME KERNELS_DIR FLAGS...: the interpret library of KERNELS_DIR plus the test driver.
build() {
  local name="$1" kdir="$2"
  shift 2
  "$CXX" "${COMMON[@]}" "$@" -I "$kdir" -I "$kdir/interpret" \
    "$kdir/interpret/interpret.cpp" tests/kernels/test_kernels.cpp -o "$TMP/$name"
}

# run NAME ARGS...: run a driver, log to $TMP/NAME.log, return its exit status.
run() {
  local name="$1"
  shift
  local start=$SECONDS rc=0
  "$TMP/$name" "$@" >"$TMP/$name.log" 2>&1 || rc=$?
  echo "  $name: exit $rc, $((SECONDS - start)) s: $(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$TMP/$name.log" || echo 'no summary')"
  return $rc
}

SAN_TSAN=(-O1 -g -fsanitize=thread)
SAN_ASAN=(-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined)
export TSAN_OPTIONS="halt_on_error=0 exitcode=66 second_deadlock_stack=1"
export ASAN_OPTIONS="detect_leaks=1 abort_on_error=0 exitcode=67"
export UBSAN_OPTIONS="print_stacktrace=1"

echo "== 1. plain -O2 (full matrix)"
build plain kernels -O2 -Werror
if ! run plain; then fail "plain build: tests failed"; grep FAIL "$TMP/plain.log" | head -20; fi

echo "== 2. ThreadSanitizer (--quick)"
build tsan kernels "${SAN_TSAN[@]}"
if ! run tsan --quick || grep -q "ThreadSanitizer" "$TMP/tsan.log"; then
  fail "ThreadSanitizer findings"; head -60 "$TMP/tsan.log"
fi

echo "== 3. AddressSanitizer + UBSan (--quick)"
build asan kernels "${SAN_ASAN[@]}"
if ! run asan --quick || grep -qE "AddressSanitizer|LeakSanitizer|runtime error" "$TMP/asan.log"; then
  fail "AddressSanitizer/UBSan findings"; head -60 "$TMP/asan.log"
fi

# plant NAME SED_EXPR TAG: copy kernels/ to $TMP/NAME and apply the sed expression, checking that
# it changed the tagged line.
plant() {
  local name="$1" expr="$2" tag="$3"
  mkdir -p "$TMP/$name"
  cp -r kernels "$TMP/$name/kernels"
  sed -i "$expr" "$TMP/$name/kernels/core_apply.cu"
  if cmp -s kernels/core_apply.cu "$TMP/$name/kernels/core_apply.cu"; then
    fail "planted fault $name: sed changed nothing (tag $tag moved?)"
    return 1
  fi
}

echo "== 4a. planted fault: __syncthreads() removed; TSan must report a data race"
# The barrier between staging the tile and reading it ([sync:apply-staged]): each element is
# written by one thread and then read by others, so TSan sees the write in its shadow at the first
# unsynchronised read, whatever the schedule. (The plant used to remove [sync:apply-reuse], the
# barrier before the tile is restaged; that race is real too, but TSan keeps 4 shadow cells per
# word and the readers evict each other, so catching it depended on the schedule: on a 2-core AMD
# EPYC machine the --quick run computed wrong results without a report in three runs of three.)
if plant nosync '/\[sync:apply-staged\]/d' 'sync:apply-staged'; then
  build tsan_planted "$TMP/nosync/kernels" "${SAN_TSAN[@]}"
  TSAN_OPTIONS="halt_on_error=1 exitcode=66" run tsan_planted --quick || true
  if grep -q "WARNING: ThreadSanitizer: data race" "$TMP/tsan_planted.log"; then
    echo "  caught: $(grep -m1 -A3 'WARNING: ThreadSanitizer: data race' "$TMP/tsan_planted.log" | tail -1 | sed 's/^ *//')"
  else
    fail "TSan did not report the missing __syncthreads()"
  fi
fi

echo "== 4b. planted fault: off-by-one bound; ASan must report an overflow"
if plant offbyone '/\[bound:csr-cols\]/s/i < r;/i <= r;/' 'bound:csr-cols'; then
  build asan_planted "$TMP/offbyone/kernels" "${SAN_ASAN[@]}"
  run asan_planted --quick || true
  if grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" "$TMP/asan_planted.log"; then
    echo "  caught: $(grep -m1 -E '^    #[0-9]+ .* in (coo_apply|csr_apply)' "$TMP/asan_planted.log" | sed 's/^ *//' || true)"
  else
    fail "ASan did not report the off-by-one bound"
  fi
fi

if [[ $FAILED -ne 0 ]]; then
  echo "sanitize-kernels: FAILED"
  exit 1
fi
echo "sanitize-kernels: OK (plain, tsan, asan clean; both planted faults caught) in ${SECONDS} s"
