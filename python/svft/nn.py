"""`SVFTLinear`: a torch.nn.Module over libsvft, for CPU tensors and CUDA tensors.

Its autograd function calls the C ABI directly on the tensors' memory (host pointers on CPU;
device pointers and the current CUDA stream on CUDA), so no copy of activations is made.
Coefficients M and the gate gamma are nn.Parameters (f32); U, s, V live inside the library.
On CUDA the layer lives on the weight's device and computes in the weight's dtype (f32, bf16
or f16; M and its gradient stay f32); each forward orders itself after the work already on
`torch.cuda.current_stream()` and before the work queued there later, without blocking the
host. M and gamma are handed to the library before each forward from their own memory
(`svft_layer_load_parameters`: a device-to-device copy on CUDA, the gate value computed there):
no host synchronisation anywhere in a training step.
"""

import torch
from torch import nn

from ._lib import DTYPES
from .layer import Layer

_TORCH_DTYPES = {
    torch.float32: DTYPES["float32"],
    torch.bfloat16: DTYPES["bfloat16"],
    torch.float16: DTYPES["float16"],
    torch.float64: DTYPES["float64"],
}


def _code(t):
    try:
        return _TORCH_DTYPES[t.dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {t.dtype}") from None


def _stream(t):
    """The current CUDA stream of t's device (as an address), or None on the CPU."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else None


class _SVFTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, m, gamma, module):
        layer = module._layer
        x2 = x.reshape(-1, layer.d_in).contiguous()
        n = x2.shape[0]
        module._load_parameters(m, gamma)
        y = torch.empty((n, layer.d_out), dtype=x.dtype, device=x.device)
        layer.forward_ptr(_code(x2), x2.data_ptr(), x2.numel(), n, y.data_ptr(), y.numel(), _stream(x2))
        module._forward_count += 1
        ctx.forward_id = module._forward_count
        ctx.module = module
        ctx.x_shape = x.shape
        ctx.save_for_backward(x2, m, gamma)
        return y.reshape(*x.shape[:-1], layer.d_out)

    @staticmethod
    def backward(ctx, grad_y):
        module = ctx.module
        layer = module._layer
        x2, m, gamma = ctx.saved_tensors
        n = x2.shape[0]
        stream = _stream(x2)
        if module._forward_count != ctx.forward_id:
            # Another forward ran since (checkpointing, gradcheck, two calls before one
            # backward): redo this one so the library holds the right saved activations.
            module._load_parameters(m, gamma)
            scratch = torch.empty((n, layer.d_out), dtype=x2.dtype, device=x2.device)
            layer.forward_ptr(_code(x2), x2.data_ptr(), x2.numel(), n, scratch.data_ptr(), scratch.numel(), stream)
            module._forward_count += 1
            ctx.forward_id = module._forward_count
        gy = grad_y.reshape(-1, layer.d_out).to(x2.dtype).contiguous()
        dx = torch.empty_like(x2)
        dm = torch.empty(layer.nnz, dtype=torch.float32, device=x2.device)
        dgamma = torch.zeros((), dtype=torch.float32, device=x2.device)
        layer.backward_ptr(
            _code(x2), gy.data_ptr(), gy.numel(), n, dx.data_ptr(), dx.numel(), dm.data_ptr(), dgamma.data_ptr(), stream
        )
        return dx.reshape(ctx.x_shape), dm, (dgamma if gamma is not None else None), None


class SVFTLinear(nn.Module):
    """An SVFT adapter of a linear layer: `y = x (U (diag(s) + g M) V^T)^T + bias`.

    Trainable: `m` (|Omega| coefficients) and, with the gate, `gamma` (g = sigmoid(gamma)).
    Build it with `SVFTLinear.from_linear`; `merge()` returns a plain `nn.Linear`.
    """

    def __init__(self, layer, bias, device):
        super().__init__()
        self._layer = layer
        self._forward_count = 0
        self.in_features, self.out_features = layer.d_in, layer.d_out
        self.m = nn.Parameter(torch.from_numpy(layer.coefficients).to(device))
        self.gamma = nn.Parameter(torch.tensor(layer.gamma, device=device)) if layer.gate else None
        self.register_buffer("bias", bias)
        self._dtype = torch.float32 if bias is None else bias.dtype

    @classmethod
    def from_linear(cls, linear, pattern="banded:2", init="official", gate=True, rank=None, seed=0, plan="auto"):
        """Mirrors the official layer's construction: thin SVD of `linear.weight` (in its dtype,
        on its device: CPU, or CUDA on the CUDA backend), this pattern, Kaiming-normal M with
        gamma = 0 (init="official", gate on). The bias is kept frozen, as in the official layer."""
        w = linear.weight.detach().contiguous()
        b = None if linear.bias is None else linear.bias.detach().to(w.dtype).contiguous()
        backend = "cuda" if w.is_cuda else "cpu"
        if w.is_cuda:
            torch.cuda.current_stream(w.device).synchronize()  # creation reads the weight synchronously
        layer = Layer.from_weight_ptr(
            backend, w.data_ptr(), _code(w), w.shape[0], w.shape[1], pattern, init, gate,
            None if b is None else b.data_ptr(), 0 if b is None else b.numel(), rank, seed,
        )
        layer.set_plan(plan)
        module = cls(layer, None if b is None else b.clone(), w.device)
        module._dtype = w.dtype
        return module

    def _load_parameters(self, m, gamma):
        """Hands the current M and gamma to the library from their own memory (device memory
        on CUDA, ordered on the current stream: no host round trip)."""
        m = m.detach().to(torch.float32).contiguous()
        g = None if gamma is None else gamma.detach().to(torch.float32).contiguous()
        self._layer.load_parameters_ptr(m.data_ptr(), None if g is None else g.data_ptr(), _stream(m))

    def forward(self, x):
        return _SVFTFunction.apply(x, self.m, self.gamma, self)

    @torch.no_grad()
    def merged_weight(self):
        """U C V^T with the current parameters, (out_features, in_features) float32, on the
        layer's device."""
        self._load_parameters(self.m, self.gamma)
        w = torch.empty((self.out_features, self.in_features), dtype=torch.float32, device=self.m.device)
        self._layer.merge_ptr(DTYPES["float32"], w.data_ptr(), w.numel(), _stream(w))
        return w

    @torch.no_grad()
    def merge(self):
        """A plain nn.Linear with the adapted weight (and the frozen bias)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.m.device, dtype=self._dtype
        )
        linear.weight.copy_(self.merged_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self):
        l = self._layer
        return f"in_features={l.d_in}, out_features={l.d_out}, rank={l.rank}, nnz={l.nnz}, gate={l.gate}"
