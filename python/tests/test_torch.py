"""PyTorch tests of svft.nn.SVFTLinear (PyTorch is pinned in python/requirements-test.txt: a
missing one fails): gradcheck, equality with a plain-PyTorch implementation of the official
layer's math (forward, backward, merged weight), merge() to nn.Linear, and a timing of both. CPU
tensors always; CUDA tensors when torch sees a GPU (the library's CUDA backend must then run)."""

import time

import torch
from torch import nn

import svft
from _support import Skip
from svft.nn import SVFTLinear, svft_linear


class OfficialSVFT(nn.Module):
    """The official layer's math in plain PyTorch (SVFT.md section 1): every forward rebuilds
    W = U (diag(s) + g M) V^T densely (M scattered from its |Omega| values; duplicates add up),
    then y = x W^T + b; autograd goes through the dense weight."""

    def __init__(self, u, s, v, rows, cols, m, gamma, bias):
        super().__init__()
        for name, t in (("U", u), ("s", s), ("V", v), ("bias", bias)):
            self.register_buffer(name, t)
        self.register_buffer("rows", rows.long())
        self.register_buffer("cols", cols.long())
        self.m = nn.Parameter(m.clone())
        self.gamma = None if gamma is None else nn.Parameter(gamma.clone())

    def weight(self):
        r = self.s.numel()
        g = torch.sigmoid(self.gamma) if self.gamma is not None else 1.0
        M = torch.zeros(r, r, dtype=self.m.dtype, device=self.m.device).index_put(
            (self.rows, self.cols), self.m, accumulate=True
        )
        C = torch.diag(self.s) + g * M
        return (self.U @ C) @ self.V.T  # official order: (C V^T)^T U^T, transposed

    def forward(self, x):
        y = x @ self.weight().T
        return y if self.bias is None else y + self.bias


def _devices():
    yield torch.device("cpu")
    if not torch.cuda.is_available():
        print("CUDA tensors skipped: torch.cuda.is_available() is False")
    elif not svft.backend_available("cuda"):  # a GPU the library cannot use fails, never passes
        raise RuntimeError(f"torch sees a GPU but libsvft's CUDA backend is unavailable: "
                           f"{svft.backend_unavailable_reason('cuda')}")
    else:
        yield torch.device("cuda")


def _pair(device, d_out=24, d_in=17, pattern="banded:2", gate=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out).to(device)
    ours = SVFTLinear.from_linear(linear, pattern=pattern, init="official", gate=gate, seed=seed)
    with torch.no_grad():
        ours.m.add_(0.1 * torch.randn_like(ours.m))
        if gate:
            ours.gamma.fill_(0.3)
    layer = ours._layer
    u, s, v = (torch.from_numpy(a).to(device) for a in layer.factors())
    rows, cols = (torch.from_numpy(a.astype("int64")).to(device) for a in layer.indices())
    official = OfficialSVFT(u, s, v, rows, cols, ours.m.detach(), None if ours.gamma is None else ours.gamma.detach(),
                            linear.bias.detach())
    return linear, ours, official


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _setup():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_gradcheck():
    _setup()
    for device in _devices():
        for gate in (True, False):
            _, ours, _ = _pair(device, 7, 5, "banded:1", gate)
            x = torch.randn(3, 5, device=device, requires_grad=True)
            m = ours.m.detach().clone().requires_grad_()
            gamma = None if not gate else ours.gamma.detach().clone().requires_grad_()
            inputs = (x, m) + ((gamma,) if gate else ())

            def f(x, m, gamma=None):
                return svft_linear(x, m, gamma, ours._layer)

            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "inputs are not double precision": f32 by design
                assert torch.autograd.gradcheck(f, inputs, eps=1e-3, atol=2e-3, rtol=1e-2)


def test_matches_official_math():
    _setup()
    for device in _devices():
        for pattern, gate in (("banded:2", True), ("plain", False), ("random:3:seed=1", True)):
            _, ours, official = _pair(device, pattern=pattern, gate=gate)
            x = torch.randn(2, 9, 17, device=device)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y1, y2 = ours(x1), official(x2)
            assert _rel(y1, y2) < 1e-5, (device, pattern, "y", _rel(y1, y2))
            gy = torch.randn_like(y1)
            y1.backward(gy)
            y2.backward(gy)
            assert _rel(x1.grad, x2.grad) < 1e-5, (device, pattern, "dx")
            assert _rel(ours.m.grad, official.m.grad) < 1e-4, (device, pattern, "dm", _rel(ours.m.grad, official.m.grad))
            if gate:
                assert _rel(ours.gamma.grad, official.gamma.grad) < 1e-3, (device, pattern, "dgamma")
            with torch.no_grad():
                assert _rel(ours.merged_weight(), official.weight()) < 1e-5, (device, pattern, "W")


def test_merge_returns_linear():
    _setup()
    for device in _devices():
        linear, ours, _ = _pair(device)
        merged = ours.merge()
        assert type(merged) is nn.Linear and merged.weight.shape == linear.weight.shape
        x = torch.randn(5, 17, device=device)
        with torch.no_grad():
            assert _rel(merged(x), ours(x)) < 1e-5


def test_zero_init_equals_linear():
    _setup()
    for device in _devices():
        torch.manual_seed(1)
        linear = nn.Linear(20, 12).to(device)
        ours = SVFTLinear.from_linear(linear, pattern="banded:2", init="zero", gate=False)
        x = torch.randn(4, 20, device=device)
        with torch.no_grad():
            assert _rel(ours(x), linear(x)) < 1e-5


def test_cuda_uses_current_stream():
    if not torch.cuda.is_available():
        raise Skip("needs a CUDA device (torch.cuda.is_available() is False)")
    if not svft.backend_available("cuda"):
        raise Skip(f"needs libsvft's CUDA backend: {svft.backend_unavailable_reason('cuda')}")
    _, ours, official = _pair(torch.device("cuda"))
    side = torch.cuda.Stream()
    x = torch.randn(64, 17, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = ours(x)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        assert _rel(y, official(x)) < 1e-5


def test_cuda_half_precision():
    """bf16 and f16 CUDA tensors: the layer computes in the weight's dtype (f32 accumulation),
    M and its gradient stay f32; compared with the official math in f32 on the same (rounded)
    factors."""
    if not torch.cuda.is_available():
        raise Skip("needs a CUDA device (torch.cuda.is_available() is False)")
    if not svft.backend_available("cuda"):
        raise Skip(f"needs libsvft's CUDA backend: {svft.backend_unavailable_reason('cuda')}")
    _setup()
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(3)
        linear = nn.Linear(40, 24).to("cuda", dtype)
        ours = SVFTLinear.from_linear(linear, pattern="banded:2", init="official", gate=True, seed=3)
        with torch.no_grad():
            ours.gamma.fill_(0.3)
        u, s, v = (torch.from_numpy(a).cuda() for a in ours._layer.factors())
        rows, cols = (torch.from_numpy(a.astype("int64")).cuda() for a in ours._layer.indices())
        official = OfficialSVFT(u, s, v, rows, cols, ours.m.detach(), ours.gamma.detach(), linear.bias.detach().float())
        x = torch.randn(6, 40, device="cuda").to(dtype)
        x1, x2 = x.clone().requires_grad_(), x.float().requires_grad_()
        y1, y2 = ours(x1), official(x2)
        assert y1.dtype == dtype and _rel(y1.float(), y2) < 2e-2, (dtype, "y", _rel(y1.float(), y2))
        gy = torch.randn_like(y2)
        y1.backward(gy.to(dtype))
        y2.backward(gy)
        assert _rel(x1.grad.float(), x2.grad) < 2e-2, (dtype, "dx")
        assert ours.m.grad.dtype == torch.float32 and _rel(ours.m.grad, official.m.grad) < 2e-2, (dtype, "dm")
        with torch.no_grad():
            assert _rel(ours.merged_weight(), official.weight()) < 1e-2, (dtype, "W")


def _time(fn, reps):
    fn()  # warm-up
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps * 1e3


def test_timing():
    """Prints forward+backward time of SVFTLinear vs the plain-PyTorch official layer."""
    _setup()
    for device in _devices():
        d, n, reps = (1024, 1024, 3) if device.type == "cpu" else (4096, 8192, 10)
        _, ours, official = _pair(device, d, d, "banded:2", True)
        x = torch.randn(n, d, device=device)
        gy = torch.randn(n, d, device=device)

        def step(module):
            return lambda: module(x.requires_grad_()).backward(gy)

        t_ours, t_official = _time(step(ours), reps), _time(step(official), reps)
        print(f"timing {device.type} d={d} n={n} banded:2 fwd+bwd: svft {t_ours:.2f} ms, "
              f"official (plain PyTorch) {t_official:.2f} ms, ratio {t_official / t_ours:.2f}x")
