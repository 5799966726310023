#!/usr/bin/env bash
# Mutation check of the virtual GPU (issue 12, "Proof"): plants one host-side bug of each common
# kind in a SCRATCH COPY of the repository and requires that the GPU tests, run against the
# virtual GPU (vgpu/), FAIL on each. The real files are never touched.
#
# What it does:
#   1. copies the repository's files (git ls-files: tracked plus untracked-not-ignored, as they
#      are in the work tree) to target/mutants/src, the kernels' mtimes kept so they compile once;
#   2. builds the copy into its own target dir (target/mutants/target: target/release is never
#      overwritten; registry deps and the kernels compile there once, each plant then rebuilds
#      only the svft crate) and runs the selected tests on the UNMUTATED copy: they must pass,
#      else the check proves nothing;
#   3. for each plant: an exact-text substitution in one file (the script fails loudly if the text
#      is not found exactly once, so it stays in sync with the code), rebuild, run the narrowest
#      tests that must catch it, require a test failure (a build failure is NOT a catch; where
#      the plant targets a virtual-GPU check, the failure must be that check's), restore:
#        a.  ld    wrong leading dimension in gemm()'s cuBLAS call (lda one too large: the
#                  operand's footprint runs past its buffer: CUDA_ERROR_ILLEGAL_ADDRESS);
#        b.  swap  two swapped kernel arguments (n and r of the band apply launch: wrong Y);
#        c1. ws    a workspace one row too small (the backward's A_c, (chunk - 1) x r; cudarc's
#                  slice bounds catch it on the host, before any launch);
#        c2. ws    a kernel told its buffers hold one entry more than they do, which no host
#                  check can see (the SDDMM epilogue launched for nnz + 1 coefficients: it
#                  reads dC and writes dM one past their ends, into the red zones:
#                  CUDA_ERROR_ILLEGAL_ADDRESS);
#        d.  join  the C ABI's layer stream no longer waits for the caller's stream (join.rs, run with
#                  SVFT_VGPU_ADVERSARIAL; wrong results, also without it, as the virtual GPU
#                  runs each stream on its own worker);
#        e.  load  a kernel name missing from Gpu::new's load list (gate_from_gamma).
#      Tests: tests/ffi_cuda.rs cycle_f32 (the C ABI on device pointers: every path of a step on
#      three small cases, against the f64 reference) and tests/gpu.rs
#      device_parameters_match_host_parameters (a gated 150 x 100 layer, nnz > 256).
#   Prints one line per plant, "caught: ..." (with the failure's message) or "NOT caught: ...",
#   and the time of each step and of the whole run. Logs: target/mutants/logs/.
# Exit 1 if the baseline fails or any plant is not caught.
#
# Run: scripts/mutants-vgpu.sh        (scripts/test.sh, i.e. CI, runs it last). Environment: SVFT_VGPU_LIB
#   (the vgpu lib folder; default: built by vgpu/build.sh), CUDA_HOME (default: .toolchain/cuda,
#   installed by scripts/install-cuda-toolchain.sh if missing), SVFT_MUTANTS_TIMEOUT (seconds
#   per test run, default 300; a run that hangs past it counts as caught and says so).
# Time (2 cores, measured): 2.5 to 6 minutes when target/mutants/target is warm (baseline build
#   1 to 2 min, tests 20 s; each plant 25 to 45 s: an incremental rebuild of the svft crate and
#   its two test binaries, then a few seconds of tests, which fail fast). A clean clone (CI) first
#   compiles the dependencies and the kernels there: about 4 minutes more.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$SECONDS

if [[ -z "${CUDA_HOME:-}" ]]; then
  CUDA_HOME="$ROOT/.toolchain/cuda"
  [[ -x "$CUDA_HOME/bin/nvcc" ]] || scripts/install-cuda-toolchain.sh >/dev/null
fi
export CUDA_HOME
export SVFT_REQUIRE_KERNELS=1
if [[ -z "${SVFT_VGPU_LIB:-}" ]]; then
  SVFT_VGPU_LIB="$(vgpu/build.sh | tail -n 1)"
fi
[[ -f "$SVFT_VGPU_LIB/libcuda.so" || -f "$SVFT_VGPU_LIB/libcuda.so.1" ]] \
  || { echo "mutants-vgpu: no libcuda.so in SVFT_VGPU_LIB=$SVFT_VGPU_LIB" >&2; exit 1; }
export SVFT_VGPU_LIB
TIMEOUT="${SVFT_MUTANTS_TIMEOUT:-300}"

WORK="$ROOT/target/mutants"
SRC="$WORK/src"
LOGS="$WORK/logs"
export CARGO_TARGET_DIR="$WORK/target"
# Incremental release builds: a one-line plant then recompiles a few codegen units of the svft
# crate (10 to 20 s) instead of all of it (about 50 s), at the price of a slower first build.
export CARGO_PROFILE_RELEASE_INCREMENTAL=true
CARGO=(cargo test --release --features interpret)

echo "== scratch copy: $SRC (target dir $CARGO_TARGET_DIR)"
rm -rf "$SRC" "$LOGS"
mkdir -p "$SRC" "$LOGS"
git ls-files -z --cached --others --exclude-standard \
  | python3 -c 'import os,sys; sys.stdout.write("".join(p + "\0" for p in sys.stdin.read().split("\0") if p and os.path.isfile(p)))' \
  | tar --null -T - -cf - | tar -xf - -C "$SRC"
# The Rust sources get a fresh mtime: cargo's fingerprints compare mtimes, and the last run's
# last build was of a mutant (the restored file is older than that build's outputs). The
# kernels keep theirs, so build.rs does not recompile them.
find "$SRC/src" "$SRC/tests" "$SRC/benches" -type f -exec touch {} + 2>/dev/null || true

FAILED=0
fail() { echo "FAILED: $*"; FAILED=1; }

# build NAME TEST...: compiles the copy's test binaries; the log goes to $LOGS/NAME.build.log.
build() {
  local name="$1" t0=$SECONDS args=()
  shift
  for t in "$@"; do args+=(--test "$t"); done
  if (cd "$SRC" && "${CARGO[@]}" --no-run "${args[@]}") >"$LOGS/$name.build.log" 2>&1; then
    echo "  $name: built in $((SECONDS - t0)) s"
  else
    echo "  $name: BUILD FAILED in $((SECONDS - t0)) s (see $LOGS/$name.build.log):"
    grep -E '^error' -A5 "$LOGS/$name.build.log" | head -20
    return 1
  fi
}

# run_tests NAME [VAR=VALUE...] -- TEST:FN...: runs each test function (exact name) of its test
# binary against the virtual GPU; returns 0 if all passed, 1 if any failed, 2 on a timeout.
# Output goes to $LOGS/NAME.log.
run_tests() {
  local name="$1" t0=$SECONDS envs=() rc=0 one
  shift
  while [[ "$1" != "--" ]]; do envs+=("$1"); shift; done
  shift
  : >"$LOGS/$name.log"
  for spec in "$@"; do
    one=0
    (cd "$SRC" && timeout "$TIMEOUT" env -u SVFT_GPU_TEST_LOG \
        LD_LIBRARY_PATH="$SVFT_VGPU_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" SVFT_REQUIRE_GPU=1 "${envs[@]}" \
        "${CARGO[@]}" --test "${spec%%:*}" -- --exact "${spec#*:}") >>"$LOGS/$name.log" 2>&1 || one=$?
    if [[ $one -eq 124 ]]; then
      echo "  $name: $spec timed out after $TIMEOUT s" | tee -a "$LOGS/$name.log"
      rc=2
    elif [[ $one -ne 0 && $rc -eq 0 ]]; then
      rc=1
    fi
  done
  echo "  $name: tests ran in $((SECONDS - t0)) s"
  return $rc
}

# The first failure message of a test log: the panic line and the line after it.
why() {
  grep -m1 -A1 -E "panicked at|^error|timed out" "$LOGS/$1.log" | tr '\n' ' ' | sed 's/  */ /g' | cut -c1-300
}

# plant FILE OLD NEW: replaces the one occurrence of OLD in the copy's FILE by NEW.
plant() {
  python3 - "$SRC/$1" "$2" "$3" <<'EOF'
import sys
path, old, new = sys.argv[1:4]
text = open(path).read()
count = text.count(old)
if count != 1:
    sys.exit(f"planted fault: the text to replace occurs {count} times (not once) in {path}:\n  {old}")
open(path, "w").write(text.replace(old, new))
EOF
}

# restore FILE: the original content back (with a new mtime, so cargo rebuilds).
restore() {
  cat "$ROOT/$1" >"$SRC/$1"
}

# The tests each plant must fail, as BINARY:FUNCTION.
CYCLE=ffi_cuda:cycle_f32
PARAMS=gpu:device_parameters_match_host_parameters
ADVERSARIAL=(SVFT_VGPU_ADVERSARIAL=7)

echo "== baseline: the selected tests on the unmutated copy (must pass)"
build baseline ffi_cuda gpu || { echo "mutants-vgpu: FAILED (the unmutated copy does not build)"; exit 1; }
if ! run_tests baseline -- "$CYCLE" "$PARAMS" || ! run_tests baseline_adversarial "${ADVERSARIAL[@]}" -- "$CYCLE"; then
  echo "mutants-vgpu: FAILED: the selected tests fail on the UNMUTATED copy, so the check proves nothing:"
  why baseline; why baseline_adversarial
  exit 1
fi

# mutant ID TITLE FILE OLD NEW EXPECT [VAR=VALUE...] -- TEST...: plant, build, run, require a
# failure whose log matches the regex EXPECT (empty: any test failure; else the failure must be
# the one the plant is meant to provoke, e.g. the virtual GPU's fault, not an incidental one),
# restore.
mutant() {
  local id="$1" title="$2" file="$3" old="$4" new="$5" expect="$6" t0=$SECONDS rc=0
  shift 6
  echo "== $id. $title ($file)"
  if ! plant "$file" "$old" "$new"; then
    fail "$id: could not plant (the code changed? update scripts/mutants-vgpu.sh)"
    restore "$file"
    return
  fi
  if ! build "$id" ffi_cuda gpu; then
    fail "$id: the mutant does not compile, which proves nothing"
    restore "$file"
    return
  fi
  run_tests "$id" "$@" || rc=$?
  restore "$file"
  local took="$((SECONDS - t0)) s"
  if [[ $rc -eq 0 ]]; then
    echo "NOT caught: $id. $title ($took): every selected test passed"
    FAILED=1
  elif [[ $rc -eq 2 ]]; then
    echo "caught: $id. $title ($took): a test hung past $TIMEOUT s"
  elif [[ -n "$expect" ]] && ! grep -qE "$expect" "$LOGS/$id.log"; then
    echo "NOT caught as intended: $id. $title ($took): a test failed, but not with /$expect/: $(why "$id")"
    FAILED=1
  elif [[ -n "$expect" ]]; then
    echo "caught: $id. $title ($took): $(grep -m1 -oE ".{0,160}($expect).{0,160}" "$LOGS/$id.log")"
  else
    echo "caught: $id. $title ($took): $(why "$id")"
  fi
}

ILLEGAL='CUDA_ERROR_ILLEGAL_ADDRESS'

mutant a "ld: gemm()'s lda one too large (cuBLAS reads past the operand)" src/cuda/kernels.rs \
  "        lda: b.cols as i32," \
  "        lda: b.cols as i32 + 1," \
  "$ILLEGAL" -- "$CYCLE"

mutant b "swap: n and r swapped in the band apply launch" src/cuda/kernels.rs \
  "b.arg(x).arg(y).arg(s).arg(m).arg(g).arg(&n_i).arg(&r_i).arg(&d);" \
  "b.arg(x).arg(y).arg(s).arg(m).arg(g).arg(&r_i).arg(&n_i).arg(&d);" \
  "" -- "$CYCLE"

# c1 is caught on the host (cudarc's slice bounds: the step slices c x r rows out of it); c2
# passes every host check (the buffers are right, the count the kernel is given is not): only the
# virtual GPU's red zones see it.
mutant c1 "ws: the backward's A_c workspace one row too small" src/cuda/layer/step.rs \
  "let a = grow(&stream, &mut ws.a, chunk * r)?;" \
  "let a = grow(&stream, &mut ws.a, (chunk - 1) * r)?;" \
  "" -- "$CYCLE"

mutant c2 "ws: the SDDMM epilogue launched for one coefficient more than dC and dM hold" src/cuda/kernels.rs \
  "    let nnz_i = nnz as i32;" \
  "    let nnz_i = nnz as i32 + 1;" \
  "$ILLEGAL" -- "$PARAMS"

mutant d "join: the C ABI's layer stream no longer waits for the caller's stream" src/ffi/cuda/join.rs \
  "        own.wait(&self.entered).map_err(|e| drv(\"ordering the library's stream after the caller's\", e))?;" \
  "" \
  "" "${ADVERSARIAL[@]}" -- "$CYCLE"

mutant e "load: gate_from_gamma missing from Gpu::new's load list" src/cuda/device.rs \
  'const KERNELS_F32: [&str; 3] = ["sddmm_epilogue", "gate_grad_reduce", "gate_from_gamma"];' \
  'const KERNELS_F32: [&str; 2] = ["sddmm_epilogue", "gate_grad_reduce"];' \
  "" -- "$PARAMS"

if [[ $FAILED -ne 0 ]]; then
  echo "mutants-vgpu: FAILED in $((SECONDS - START)) s (logs: $LOGS)"
  exit 1
fi
echo "mutants-vgpu: OK (baseline passes, all 6 planted faults caught) in $((SECONDS - START)) s"
