#!/usr/bin/env bash
# GPU machine (NVIDIA driver, CUDA 13 libraries or PyTorch's, no Rust): run every GPU test,
# compute-sanitizer memcheck and racecheck over the kernel tests where available, the CUDA demo,
# the bench grid and the criterion benches when bundled.
# Usage, from the repository root: gpu-bundle/gpu-run.sh [OUTDIR]
#
# The device tool returns at most 8 files from $OUT, so OUTDIR receives exactly these, refreshed
# after every step (a run killed at its time limit still returns what finished):
#   summary.txt      device, one line per step (ok / FAILED / TIMEOUT, seconds), the last lines
#                    of each failed step's log
#   bench-table.md   the grid as a table (ratios, plan times, auto/best, fused x, memory)
#   bench.jsonl      the grid's rows
#   memory-table.md  svft::memory per grid case (arithmetic, the same on any machine)
#   adapters-table.md  `svft bench --adapters`: the adapter bank against one adapter, merged
#                    dense weights and LoRA r=16 (docs/PERF.md 2f), bf16
#   logs.tar.gz      every log, the plots (time-vs-n-*.png, demo-cuda-loss.png), criterion's data
# Each step has its own time limit (SVFT_STEP_LIMIT_S scales them: 1 = as below).
# SVFT_GPU_RUN_REHEARSE=1 rehearses the whole script on a machine without a GPU (tests skip, the
# grids run on the CPU backend at the tiny grid): scripts/gpu-check.sh does so after bundling.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-${OUT:-$here/results}}"
work="$(mktemp -d)"
mkdir -p "$out"
status=0
scale="${SVFT_STEP_LIMIT_S:-1}"

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
backend=cuda bf16_grid=llama3-8b f32_grid=llama3-8b-subset half=bf16 adapters="--adapters 1,8,64,512"
if [ "${SVFT_GPU_RUN_REHEARSE:-0}" = 1 ]; then
  backend=cpu bf16_grid=tiny f32_grid=tiny half=f32 # the CPU bench runs in f32 only
  adapters="--adapters 1,4 --adapter-shapes 48x32 --adapter-tokens 16"
  echo "rehearsal: no GPU expected, tests skip, grids on the CPU" | tee "$work/summary.txt"
else
  export SVFT_REQUIRE_GPU=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$work/summary.txt"
fi
date -u +"%Y-%m-%d %H:%M UTC" >> "$work/summary.txt"

# Copies the returned files into $out (the tarball holds everything else).
publish() {
  cp "$work/summary.txt" "$out/summary.txt"
  for f in bench-table.md bench.jsonl memory-table.md adapters-table.md; do
    [ -f "$work/$f" ] && cp "$work/$f" "$out/$f"
  done
  tar -czf "$out/logs.tar.gz" -C "$work" . 2>/dev/null
}

run() { # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  limit=$(python3 -c "print(max(1, int($limit * $scale)))")
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "$name: ok ($((SECONDS - t0)) s)" | tee -a "$work/summary.txt"
  else
    local what=FAILED
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && what=TIMEOUT
    echo "$name: $what rc=$rc ($((SECONDS - t0)) s), see $name.log in logs.tar.gz" | tee -a "$work/summary.txt"
    tail -n 30 "$work/$name.log" | sed 's/^/    /' >> "$work/summary.txt"
    status=1
  fi
  tail -n 5 "$work/$name.log"
  publish
}

# The bench grid, one process per dtype: Llama-3-8B shapes x n in {1, 16, 512, 2048, 8192} x
# {plain, banded:2, banded:16, random:16} in bf16 (60 rows), and the f32 subset (4096x4096 x
# n in {1, 16, 2048} x banded:2). Each row times every fixed plan, the floor and LoRA for at
# least --seconds each (the official order is the merged plan's time): about 0.6 s a row on an
# H100, so about a minute for both (docs/PERF.md section 4).
grid_cmd() { # tag, dtype, grid name: the command line, for `timeout bash -c`
  printf '"%s" bench --backend %s --grid %s --dtype %s --seconds 0.1 --json --plot "%s" > "%s"' \
    "$here/svft" "$backend" "$3" "$2" "$work/time-vs-n-$1.png" "$work/bench-$1.jsonl"
}

# Most important first, so a run cut short still returns the correctness verdict and the grid.
run gpu-tests 240 "$here/test-gpu" --test-threads=1
run grid-bf16 300 bash -c "$(grid_cmd bf16 "$half" "$bf16_grid")"
run gpu-bench-tests 90 "$here/test-gpu_bench" --test-threads=1
run ffi-cuda-tests 90 "$here/test-ffi_cuda" --test-threads=1
run bank-tests 90 bash -c "\"$here/test-bank_gpu\" --test-threads=1 && \"$here/test-ffi_bank_cuda\" --test-threads=1"
# The adapter bank: 2 shapes x 2 token counts x 4 adapter counts, 4 methods each.
run adapters 180 bash -c "\"$here/svft\" bench --backend $backend $adapters --dtype $half --seconds 0.05 > \"$work/adapters-table.md\""
# The synthetic demo (a bare `svft`), trained on the device (--backend cuda: a missing device fails the run).
if [ "$backend" = cuda ]; then
  run demo-cuda 120 "$here/svft" demo --backend cuda --plot "$work/demo-cuda-loss.png"
fi
run grid-f32 120 bash -c "$(grid_cmd f32 f32 "$f32_grid")"
if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  run memcheck 120 "$cs" --tool memcheck --error-exitcode 1 "$here/test-gpu" deterministic --test-threads=1
  run racecheck 120 "$cs" --tool racecheck --error-exitcode 1 "$here/test-gpu" deterministic --test-threads=1
else
  echo "compute-sanitizer not found: memcheck/racecheck skipped" | tee -a "$work/summary.txt"
fi
run cpu-tests 120 "$here/test-layer"
cat "$work"/bench-*.jsonl > "$work/bench.jsonl" 2>/dev/null
# The memory table is arithmetic (svft::memory): the same on any machine.
"$here/svft" bench --grid llama3-8b --memory --dtype bf16 > "$work/memory-table.md" || status=1
python3 - "$work/bench.jsonl" > "$work/bench-table.md" <<'PY'
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
cat "$work/bench-table.md"
publish

# Criterion benches of the headline cases, when scripts/gpu-check.sh bundled them.
if [ -x "$here/bench-cuda" ]; then
  CRITERION_HOME="$work/criterion" run criterion-cuda 120 "$here/bench-cuda" --bench
fi
cat "$work/summary.txt"
publish
rm -rf "$work"
exit $status
