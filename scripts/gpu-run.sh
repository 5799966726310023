#!/usr/bin/env bash
# GPU machine (NVIDIA driver, CUDA 13 libraries or PyTorch's, no Rust): run every GPU test,
# compute-sanitizer memcheck and racecheck over the kernel tests where available, and the bench
# grid; write a results table and logs into $OUT (or the first argument).
# Usage, from the repository root: gpu-bundle/gpu-run.sh [OUTDIR]
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-${OUT:-$here/results}}"
mkdir -p "$out"
status=0

# cuBLAS / cuSOLVER: the toolkit's, or the ones PyTorch's wheels ship.
libdirs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for lib in glob.glob(os.path.join(base, "nvidia", "*", "lib")) + glob.glob(os.path.join(base, "nvidia", "cu*", "lib")):
        dirs.add(lib)
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${libdirs}:/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
export SVFT_REQUIRE_GPU=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"

run() { # name, command...
  local name=$1; shift
  echo "== $name"
  local t0=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then echo "$name: ok ($((SECONDS - t0)) s)" | tee -a "$out/summary.txt"
  else echo "$name: FAILED ($((SECONDS - t0)) s), see $name.log" | tee -a "$out/summary.txt"; status=1; fi
  tail -n 5 "$out/$name.log"
}

run gpu-tests "$here/test-gpu" --test-threads=1
run ffi-cuda-tests "$here/test-ffi_cuda" --test-threads=1
run cpu-tests "$here/test-layer"
# README's main job, trained on the device (--backend cuda: a missing device fails the run).
run demo-cuda "$here/svft" demo --backend cuda --plot "$out/demo-cuda-loss.png"
if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  run memcheck "$cs" --tool memcheck --error-exitcode 1 "$here/test-gpu" deterministic --test-threads=1
  run racecheck "$cs" --tool racecheck --error-exitcode 1 "$here/test-gpu" deterministic --test-threads=1
else
  echo "compute-sanitizer not found: memcheck/racecheck skipped" | tee -a "$out/summary.txt"
fi

# The bench grid: Llama-3-8B shapes x tokens x patterns, bf16 (f32 for a subset).
{
  for shape in "4096 4096" "14336 4096" "4096 14336"; do
    set -- $shape
    for n in 1 16 512 2048 8192; do
      for p in plain banded:2 banded:16 random:16; do
        "$here/svft" bench --backend cuda --dtype bf16 --d-out "$1" --d-in "$2" --tokens "$n" --pattern "$p" --seconds 0.3 --json || status=1
      done
    done
  done
  for n in 16 2048; do
    "$here/svft" bench --backend cuda --dtype f32 --d-out 4096 --d-in 4096 --tokens "$n" --pattern banded:2 --seconds 0.3 --json || status=1
  done
} > "$out/bench.jsonl" 2> "$out/bench.err"
python3 - "$out/bench.jsonl" > "$out/bench-table.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
print("| dtype | d_out x d_in | n | pattern | plan | SVFT ms | floor ms | LoRA ms | official ms | /floor | /LoRA | vs official |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['dtype']} | {r['d_out']}x{r['d_in']} | {r['tokens']} | {r['pattern']} | {r['plan']} | {r['svft_fwd_bwd_ms']:.3f} | {r['gemm_floor_ms']:.3f} | {r['lora_fwd_bwd_ms']:.3f} | {r['official_fwd_bwd_ms']:.3f} | {r['ratio_to_floor']:.2f} | {r['ratio_to_lora']:.2f} | {r['speedup_vs_official']:.2f} |")
PY
cat "$out/bench-table.md"
cat "$out/summary.txt"
exit $status
