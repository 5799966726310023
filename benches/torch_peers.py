"""One training step (forward + backward with dX) of an adapted linear layer, timed in ONE
process against the peers a PyTorch user would pick instead:

- `svft`:     svft.nn.SVFTLinear (banded:2, official init, gate on), the library's factored plan;
- `official`: the official SVFT layer's order in plain PyTorch (SVFT.md section 1): every
              forward rebuilds W = U (diag(s) V^T + g M V^T), the M V^T term as a sparse-dense
              product (index_add over Omega, |Omega| d_in FLOPs, as torch_sparse does), then
              y = x W^T; autograd goes through the dense W;
- `lora`:     HF PEFT LoRA r=16 (alpha 16, no dropout) on the same nn.Linear;
- `dense`:    the frozen nn.Linear (dX only): the floor every adapter pays at least.

Steps are interleaved (one of each method per round) and the median of the rounds is reported,
with the factored plan's FLOP count and the dense layer's as floors. Usage:

    python benches/torch_peers.py [--shapes 1024x1024,2048x1024,1024x2048] [--tokens 64,512,2048]
                                  [--seconds 3] [--json out.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

# Before torch loads OpenMP: its threads must not spin on the cores svft's threads use (as
# `import svft` arranges; docs/PERF.md 2d). It applies to every method of the run alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads"


class OfficialOrder(nn.Module):
    """The official layer's math and order (see the module doc), from an SVFTLinear's factors,
    indices and parameters."""

    def __init__(self, svft_module):
        super().__init__()
        layer = svft_module._layer
        u, s, v = (torch.from_numpy(a) for a in layer.factors())
        rows, cols = (torch.from_numpy(a.astype("int64")) for a in layer.indices())
        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("vt", v.T.contiguous())
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.register_buffer("bias", svft_module.bias)
        self.m = nn.Parameter(svft_module.m.detach().clone())
        self.gate = nn.Parameter(svft_module.gamma.detach().clone().reshape(1))

    def forward(self, x):
        g = torch.sigmoid(self.gate)
        cvt = self.s[:, None] * self.vt  # diag(s) V^T
        cvt = cvt.index_add(0, self.rows, (g * self.m)[:, None] * self.vt[self.cols])  # + g M V^T
        w = self.u @ cvt
        y = x @ w.T
        return y if self.bias is None else y + self.bias


def lora(linear, r):
    import peft

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = linear

        def forward(self, x):
            return self.proj(x)

    config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["proj"])
    return peft.get_peft_model(Wrap(), config)


def step_fn(module, x, gy):
    def step():
        xg = x.detach().requires_grad_()
        module(xg).backward(gy)

    return step


def run_case(d_out, d_in, n, seconds, seed=0):
    from svft.nn import SVFTLinear

    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    svft_mod = SVFTLinear.from_linear(base, pattern="banded:2", init="official", gate=True, seed=seed)
    r, nnz = svft_mod._layer.rank, svft_mod._layer.nnz
    frozen = nn.Linear(d_in, d_out)
    frozen.load_state_dict(base.state_dict())
    frozen.requires_grad_(False)
    methods = {
        "svft": svft_mod,
        "official": OfficialOrder(svft_mod),
        "lora": lora(nn.Linear(d_in, d_out).requires_grad_(False), 16),
        "dense": frozen,
    }
    x, gy = torch.randn(n, d_in), torch.randn(n, d_out)
    steps = {k: step_fn(m, x, gy) for k, m in methods.items()}
    for f in steps.values():  # warm-up: workspaces, allocator, thread pools
        f()
        f()
    times = {k: [] for k in steps}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times["svft"]) < 5:
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    # FLOPs of the dense products (SVFT.md section 3), forward + backward with dX.
    flops = {
        "svft": 4 * n * r * (d_in + d_out) + 2 * n * nnz,
        "dense": 4 * n * d_in * d_out,
        "official": 2 * d_out * d_in * r + 2 * d_out * d_in * r + 6 * n * d_in * d_out,
        "lora": 6 * n * d_in * d_out + 6 * n * 16 * (d_in + d_out),
    }
    return {
        "d_out": d_out, "d_in": d_in, "n": n, "r": r, "nnz": nnz, "rounds": len(times["svft"]),
        "ms": med, "flops": flops,
        "gflops": {k: flops[k] / (med[k] * 1e6) for k in med},
    }


def table(rows):
    out = ["| shape, n | svft ms | official ms | PEFT LoRA r=16 ms | dense ms | official / svft | svft / dense "
           "| FLOP ratio svft/dense | svft GFLOP/s | dense GFLOP/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        ms, fl, gf = c["ms"], c["flops"], c["gflops"]
        out.append(
            f"| {c['d_out']}x{c['d_in']}, {c['n']} | {ms['svft']:.2f} | {ms['official']:.2f} | {ms['lora']:.2f} "
            f"| {ms['dense']:.2f} | {ms['official'] / ms['svft']:.2f} | {ms['svft'] / ms['dense']:.2f} "
            f"| {fl['svft'] / fl['dense']:.2f} | {gf['svft']:.0f} | {gf['dense']:.0f} |"
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1024x1024,2048x1024,1024x2048")
    ap.add_argument("--tokens", default="64,512,2048")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing budget per case")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    import peft
    import svft

    print(f"# {cpu_name()}; torch {torch.__version__}, peft {peft.__version__}, svft {svft.version()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}", flush=True)
    rows = []
    for shape in a.shapes.split(","):
        d_out, d_in = (int(v) for v in shape.split("x"))
        for n in (int(t) for t in a.tokens.split(",")):
            rows.append(run_case(d_out, d_in, n, a.seconds))
            c = rows[-1]
            print(f"{d_out}x{d_in} n={n}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in c["ms"].items()), flush=True)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": cpu_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
