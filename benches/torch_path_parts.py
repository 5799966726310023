"""Issue 16: the Python path's cost against its floor, one process, interleaved rounds.
1024 x 1024, banded:2, f32, CPU, n = 64 and n = 512; per round, one step of each of
  (a) the old custom-op path exactly as commit 058e277 ran it: svft_linear's x.reshape,
      svft::forward_saving with its registered autograd (backward: svft::backward_saved), and
      058e277's helpers inside the ops (copied below and swapped into svft.nn / svft._lib for
      the step: call() through lib()'s lock, _load's detach/contiguous/reshape, torch.zeros
      dgamma, unconditional gy.to().contiguous()), then y.backward(gy);
  (b) the eager route: SVFTLinear(x) (svft_linear -> _Eager), then y.backward(gy);
  (c) the raw C ABI calls through ctypes on preallocated torch buffers (load, forward_saving,
      load, backward_saved): the floor of any Python path;
  (d) the NumPy svft.Layer path (layer.forward, layer.backward: the library's own state).
(a) and (b) start each step with the gradients set to None (what optimizer.zero_grad() does),
so autograd hands the fresh dx, dm, dgamma over instead of adding them into old ones; (b+)
is (b) with the gradients accumulating (x.grad, m.grad, gamma.grad += ...), as the last
session's pyparts.py measured. Medians over the rounds after 3 warm-up rounds.
Besides medians, the per-round paired difference and ratio to (c) (the machine is shared with
a Rust build: load swings over seconds cancel within a round). Usage: benches/torch_path_parts.py [rounds] [n ...]"""
import os
import resource
import statistics
import sys
import time

import svft  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP
import torch

import svft.nn as nnm
from svft._lib import call

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
ns = [int(a) for a in sys.argv[2:]] or [64, 512]
torch.manual_seed(0)
module = nnm.SVFTLinear.from_linear(torch.nn.Linear(1024, 1024), pattern="banded:2", init="official")
layer = module._layer
print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
      f"library {svft.library_path()} (svft {svft.version()}), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; 1024x1024 banded:2 f32 CPU, nnz {layer.nnz}, rank {layer.rank}")


# ---- commit 058e277's helpers (the custom ops' bodies called these) ----
import svft._lib as libm


_STUB = None  # set by stubbed(): the object old_call takes its functions from


def _old_lib():  # lib() as 058e277 ran it on every call (its lock), or the stub
    with libm._lock:
        return _STUB if _STUB is not None else libm._lib


def old_call(name, *args):
    code = getattr(_old_lib(), name)(*args)
    if code != 0:
        message = libm.last_error()
        raise libm.SvftError(code, libm.status_name(code), message)


def old_load(handle, m, gamma, stream):
    if m.dtype != torch.float32 or (gamma is not None and gamma.dtype != torch.float32):
        raise TypeError("the coefficients m and gamma must be float32")
    m = m.detach().contiguous()
    g = None if gamma is None else gamma.detach().reshape(1).contiguous()
    nnm.call("svft_layer_load_parameters", handle, m.data_ptr(), m.numel(), None if g is None else g.data_ptr(),
             stream)


def old_forward_call(x, m, gamma, handle, d_out, rank):
    x = x.contiguous()
    n, stream = x.shape[0], nnm._stream(x)
    nnm._load(handle, m, gamma, stream)
    y = x.new_empty((n, d_out))
    t = x.new_empty((n, rank))
    nnm.call("svft_layer_forward_saving", handle, nnm._code(x), x.data_ptr(), x.numel(), n, y.data_ptr(), y.numel(),
             t.data_ptr(), t.numel(), stream)
    return y, t


def old_backward_call(t, gy, m, gamma, handle, d_in, nnz):
    gy, t = gy.to(t.dtype).contiguous(), t.contiguous()
    n, stream = t.shape[0], nnm._stream(t)
    nnm._load(handle, m, gamma, stream)
    dx = t.new_empty((n, d_in))
    dm = torch.empty(nnz, dtype=torch.float32, device=t.device)
    dgamma = torch.zeros((), dtype=torch.float32, device=t.device)
    nnm.call("svft_layer_backward_saved", handle, nnm._code(t), t.data_ptr(), t.numel(), gy.data_ptr(), gy.numel(), n,
             dx.data_ptr(), dx.numel(), dm.data_ptr(), nnz, dgamma.data_ptr(), stream)
    return dx, dm, dgamma


OLD = dict(call=old_call, _load=old_load, _forward_call=old_forward_call, _backward_call=old_backward_call)
NEW = {k: getattr(nnm, k) for k in OLD}


def swap(d):
    for k, v in d.items():
        setattr(nnm, k, v)


def run(n, stub=False):
    x = torch.randn(n, 1024, requires_grad=True)
    gy = torch.randn(n, 1024)
    xd = x.detach().clone()
    m, g = module.m.detach(), module.gamma.detach()
    xn, gyn = xd.numpy().copy(), gy.numpy().copy()
    y = torch.empty(n, 1024)
    t = torch.empty(n, layer.rank)
    dx = torch.empty(n, 1024)
    dm = torch.empty(layer.nnz)
    dg = torch.empty(())
    h, code = layer.handle, nnm._code(xd)

    def zero():
        x.grad = module.m.grad = module.gamma.grad = None

    def a():  # run with OLD swapped in (by a_pre, outside the timed region)
        nnm._warn_if_omp_spins(x)
        y_, _ = nnm.forward_saving(x.reshape(-1, 1024), module.m, module.gamma, layer.handle, layer.d_out, layer.rank)
        y_.reshape(n, 1024).backward(gy)

    def a_pre():
        zero()
        swap(OLD)

    def b():
        module(x).backward(gy)

    def c():
        call("svft_layer_load_parameters", h, m.data_ptr(), m.numel(), g.data_ptr(), None)
        call("svft_layer_forward_saving", h, code, xd.data_ptr(), xd.numel(), n, y.data_ptr(), y.numel(),
             t.data_ptr(), t.numel(), None)
        call("svft_layer_load_parameters", h, m.data_ptr(), m.numel(), g.data_ptr(), None)
        call("svft_layer_backward_saved", h, code, t.data_ptr(), t.numel(), gy.data_ptr(), gy.numel(), n,
             dx.data_ptr(), dx.numel(), dm.data_ptr(), layer.nnz, dg.data_ptr(), None)

    def d():
        layer.forward(xn)
        layer.backward(gyn)

    parts = {
        "(a) old custom-op path": (a, a_pre),
        "(b) eager route, SVFTLinear": (b, zero),
        "(b+) (b), grads accumulating": (b, None),
        "(c) raw ctypes calls (floor)": (c, None),
        "(d) NumPy svft.Layer": (d, None),
    }
    if stub:  # overhead only: the NumPy path's calls are not stubbed; no adds on uninitialised memory
        del parts["(d) NumPy svft.Layer"], parts["(b+) (b), grads accumulating"]
    else:  # correctness: (a), (b) and (c) compute the same step, and (b) runs _Eager
        a_pre(); a(); swap(NEW); ga = (x.grad.clone(), module.m.grad.clone(), module.gamma.grad.clone())
        zero(); b(); gb = (x.grad.clone(), module.m.grad.clone(), module.gamma.grad.clone())
        c()
        for u, v, w in zip(ga, gb, (dx, dm, dg)):
            assert torch.allclose(u, v, rtol=1e-5, atol=1e-6) and torch.allclose(v, w, rtol=1e-5, atol=1e-6)
        assert type(module(x).grad_fn).__name__ == "_EagerBackward"
    reps = 100 if stub else 1  # stubbed steps take microseconds: time 100 at once
    ts = {k: [] for k in parts}
    faults = {k: 0 for k in parts}
    for i in range(rounds + 3):
        for k, (f, pre) in parts.items():
            if pre is not None:
                pre()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            dt = (time.perf_counter() - t0) / reps
            swap(NEW)
            if i >= 3:
                ts[k].append(dt)
                faults[k] += (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / reps
    floor = statistics.median(ts["(c) raw ctypes calls (floor)"])
    what = ("LIBRARY STUBBED (Python + torch overhead only; each figure the mean of 100 steps)" if stub else
            "median [quartiles], ratio and difference to (c), minor page faults per step")
    print(f"\nn = {n}: {rounds} interleaved rounds: {what}")
    for k, v in ts.items():
        q = statistics.quantiles(v, n=4)
        med = statistics.median(v)
        print(f"  {k:32s} {med * 1e3:8.3f} ms  [{q[0] * 1e3:7.3f}, {q[2] * 1e3:7.3f}]  {med / floor:5.3f}x  "
              f"{(med - floor) * 1e6:+8.0f} us  {faults[k] / rounds:6.1f} faults")
    # paired per-round figures against the floor (same round, so slow load swings cancel)
    c = ts["(c) raw ctypes calls (floor)"]
    for k in ts:
        if k.startswith("(c)"):
            continue
        diffs = [u - w for u, w in zip(ts[k], c)]
        ratios = [u / w for u, w in zip(ts[k], c)]
        print(f"  paired, per round: {k:32s} - (c) median {statistics.median(diffs) * 1e6:+7.0f} us, "
              f"/ (c) median {statistics.median(ratios):.3f}x")


for n in ns:
    run(n)

# The same rounds with the three library functions replaced by a C function that ignores its
# arguments and returns 0 (libc's geteuid: we run as root), reached through ctypes prototypes with
# the library's argtypes, so argument conversion still costs: what each path adds to the library
# time, without the library's time and its noise. Outputs are then uninitialised memory.
import ctypes  # noqa: E402

libc = ctypes.CDLL(None)
if libc.geteuid() == 0:
    addr = ctypes.cast(libc.geteuid, ctypes.c_void_p).value
    stubs = type("Stubs", (), {})()
    for name in ("svft_layer_load_parameters", "svft_layer_forward_saving", "svft_layer_backward_saved"):
        fn = ctypes.CFUNCTYPE(ctypes.c_int32, *libm._SIGNATURES[name])(addr)
        libm._functions[name] = fn
        setattr(stubs, name, fn)
    _STUB = stubs
    for n in ns:
        run(n, stub=True)
