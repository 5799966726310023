#!/usr/bin/env bash
# GPU machine (NVIDIA driver, CUDA 13 libraries or PyTorch's, no Rust): run every GPU test,
# compute-sanitizer memcheck and racecheck over the kernel tests where available, the bench
# grid (bench.jsonl, bench-table.md, memory-table.md, time-vs-n-*.png) and the criterion
# benches when bundled; write everything into $OUT (or the first argument).
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
run gpu-bench-tests "$here/test-gpu_bench" --test-threads=1
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

# The bench grid, one process per dtype: Llama-3-8B shapes x n in {1, 16, 512, 2048, 8192} x
# {plain, banded:2, banded:16, random:16} in bf16 (60 rows), and the f32 subset (4096x4096 x
# n in {1, 16, 2048} x banded:2). Each row times every fixed plan, the floor and LoRA for at
# least --seconds each (the official order is the merged plan's time): about 0.6 s a row on an
# H100, so about a minute for both (docs/PERF.md section 4).
t0=$SECONDS
"$here/svft" bench --backend cuda --grid llama3-8b --dtype bf16 --seconds 0.1 --json \
  --plot "$out/time-vs-n-bf16.png" > "$out/bench.jsonl" 2> "$out/bench.err" || status=1
"$here/svft" bench --backend cuda --grid llama3-8b-subset --dtype f32 --seconds 0.1 --json \
  --plot "$out/time-vs-n-f32.png" >> "$out/bench.jsonl" 2>> "$out/bench.err" || status=1
echo "bench grid: $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
# The memory table is arithmetic (svft::memory): the same on any machine.
"$here/svft" bench --grid llama3-8b --memory --dtype bf16 > "$out/memory-table.md" || status=1
python3 - "$out/bench.jsonl" > "$out/bench-table.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
if rows:
    print(f"device: {rows[0]['device']}; copy bandwidth {rows[0].get('copy_gb_per_s', float('nan')):.0f} GB/s (1 GiB D2D memcpy, read + write)")
    print()
print("| dtype | d_out x d_in | n | pattern | plan | SVFT ms | floor ms | LoRA ms | official ms | /floor | /LoRA | FLOP /LoRA | vs official | factored ms | merged ms | small-n ms | best | auto/best | fused x | BW frac | SVFT MiB | official MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    pm = r.get("plan_ms", {})
    def ms(k):
        return f"{pm[k]:.4f}" if k in pm else "-"
    bw = r.get("bandwidth_fraction")
    ab, fx = r.get("auto_to_best_fixed"), r.get("fused_speedup")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    mem = r["memory"]
    print(f"| {r['dtype']} | {r['d_out']}x{r['d_in']} | {r['tokens']} | {r['pattern']} | {r['plan']} | {r['svft_fwd_bwd_ms']:.4f} | {r['gemm_floor_ms']:.4f} | {r['lora_fwd_bwd_ms']:.4f} | {r['official_fwd_bwd_ms']:.4f} | {r['ratio_to_floor']:.2f} | {r['ratio_to_lora']:.2f} | {r['flop_ratio_to_lora']:.2f} | {r['speedup_vs_official']:.2f} | {ms('factored')} | {ms('merged')} | {ms('small-n')} | {r.get('best_fixed_plan', '-')} | {fmt(ab)} | {fmt(fx)} | {'-' if bw is None else f'{bw:.2f}'} | {mem['svft']['total_bytes'] / 2**20:.1f} | {mem['official']['total_bytes'] / 2**20:.1f} |")
PY
cat "$out/bench-table.md"

# Criterion benches of the headline cases, when scripts/gpu-check.sh bundled them.
if [ -x "$here/bench-cuda" ]; then
  CRITERION_HOME="$out/criterion" run criterion-cuda "$here/bench-cuda" --bench
fi
cat "$out/summary.txt"
exit $status
