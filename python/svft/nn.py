"""`SVFTLinear`: a torch.nn.Module over libsvft, for CPU tensors and CUDA tensors.

Its op calls the C ABI directly on the tensors' memory (host pointers on CPU; device pointers
and the current CUDA stream on CUDA), so no copy of activations is made, and the activations
backward needs are a tensor autograd keeps, not state inside the library. Two routes share the
code making the calls: eager mode runs a plain `torch.autograd.Function` (`_Eager`, cheaper per
call); torch.compile / torch.export (and fake or meta tensors) trace two `torch.library` custom
ops with autograd and fake kernels (see below).
Coefficients M and the gate gamma are nn.Parameters (f32); U, s, V live inside the library.
On CUDA the layer lives on the weight's device and computes in the weight's dtype (f32, bf16
or f16; M and its gradient stay f32); each forward orders itself after the work already on
`torch.cuda.current_stream()` and before the work queued there later, without blocking the
host. M and gamma are handed to the library before each forward from their own memory
(`svft_layer_load_parameters`: a device-to-device copy on CUDA, the gate value computed there):
no host synchronisation anywhere in a training step.
"""

import os
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from ._lib import DTYPES, call
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


# ---- the op -------------------------------------------------------------------------------
# Two custom ops (torch.library), so autograd, torch.compile (no graph break: the fake kernels
# give the shapes) and activation checkpointing all see one opaque op per layer call:
#   svft::forward_saving(x, m, gamma, handle, d_out, rank) -> (y, t)
#   svft::backward_saved(t, gy, m, gamma, handle, d_in, nnz) -> (dx, dm, dgamma)
# The tensor backward needs, T = X V (n x rank, x's dtype), is an output of the forward op that
# autograd keeps (save_for_backward), not state inside the library: a layer may run any number
# of forwards before their backwards (used twice in one graph, checkpointing, micro-batches).
# M and gamma are handed to the library from their own memory before each call (a copy on the
# current stream on CUDA), so backward uses exactly the values its forward saw.


def _load(handle, m, gamma, stream):
    """Hands M and gamma to the library from their own memory (`svft_layer_load_parameters`).
    A pointer is all it takes: no detach (data_ptr reads any tensor), no copy unless M is not
    contiguous (a one-element gamma always is: its data_ptr is its value's address)."""
    if m.dtype != torch.float32 or (gamma is not None and gamma.dtype != torch.float32):
        raise TypeError("the coefficients m and gamma must be float32")
    if not m.is_contiguous():
        m = m.contiguous()
    if gamma is None:
        g = None
    elif gamma.numel() == 1:
        g = gamma.data_ptr()
    else:
        raise RuntimeError(f"the gate gamma must hold one value, not shape {tuple(gamma.shape)}")
    call("svft_layer_load_parameters", handle, m.data_ptr(), m.numel(), g, stream)


# The two library calls of a step, shared by both ways of reaching them: the custom ops below
# (what torch.compile traces) and `_Eager`, a plain autograd.Function (what eager mode runs: the
# custom ops' dispatch more than doubles what Python and torch add to a step's library time).


def _forward_call(x, m, gamma, handle, d_out, rank):
    """Loads M and gamma, then `svft_layer_forward_saving`: returns (y, t) for x (n, d_in)."""
    if not x.is_contiguous():
        x = x.contiguous()
    n, stream = x.shape[0], _stream(x)
    _load(handle, m, gamma, stream)
    y = x.new_empty((n, d_out))
    t = x.new_empty((n, rank))
    call(
        "svft_layer_forward_saving", handle, _code(x), x.data_ptr(), x.numel(), n, y.data_ptr(), y.numel(),
        t.data_ptr(), t.numel(), stream,
    )
    return y, t


def _backward_call(t, gy, m, gamma, handle, d_in, nnz):
    """Loads M and gamma, then `svft_layer_backward_saved`: returns (dx, dm, dgamma) for dL/dy
    `gy` of the forward whose saved `t` this is. The library writes every element of all
    three (dgamma is 0 without the gate), so they are allocated uninitialised."""
    if gy.dtype != t.dtype:
        gy = gy.to(t.dtype)
    if not gy.is_contiguous():
        gy = gy.contiguous()
    if not t.is_contiguous():
        t = t.contiguous()
    n, stream = t.shape[0], _stream(t)
    _load(handle, m, gamma, stream)
    dx = t.new_empty((n, d_in))
    dm = t.new_empty(nnz, dtype=torch.float32)
    dgamma = t.new_empty((), dtype=torch.float32)
    call(
        "svft_layer_backward_saved", handle, _code(t), t.data_ptr(), t.numel(), gy.data_ptr(), gy.numel(), n,
        dx.data_ptr(), dx.numel(), dm.data_ptr(), nnz, dgamma.data_ptr(), stream,
    )
    return dx, dm, dgamma


@torch.library.custom_op("svft::forward_saving", mutates_args=())
def forward_saving(
    x: torch.Tensor, m: torch.Tensor, gamma: Optional[torch.Tensor], handle: int, d_out: int, rank: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`y = x W^T (+ bias)` for x of shape (n, d_in), and the saved `t = x V` (n, rank)."""
    return _forward_call(x, m, gamma, handle, d_out, rank)


@forward_saving.register_fake
def _(x, m, gamma, handle, d_out, rank):
    return x.new_empty((x.shape[0], d_out)), x.new_empty((x.shape[0], rank))


@torch.library.custom_op("svft::backward_saved", mutates_args=())
def backward_saved(
    t: torch.Tensor, gy: torch.Tensor, m: torch.Tensor, gamma: Optional[torch.Tensor], handle: int, d_in: int,
    nnz: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dm, dgamma) for dL/dy `gy` of the forward whose saved `t` this is."""
    return _backward_call(t, gy, m, gamma, handle, d_in, nnz)


@backward_saved.register_fake
def _(t, gy, m, gamma, handle, d_in, nnz):
    f32 = dict(dtype=torch.float32, device=t.device)
    return t.new_empty((t.shape[0], d_in)), torch.empty(nnz, **f32), torch.empty((), **f32)


def _setup_context(ctx, inputs, output):
    x, m, gamma, handle, _, _ = inputs
    ctx.save_for_backward(output[1], m, gamma)
    ctx.handle, ctx.d_in, ctx.x_dtype = handle, x.shape[1], x.dtype


def _backward(ctx, grad_y, _grad_t):
    t, m, gamma = ctx.saved_tensors
    dx, dm, dgamma = backward_saved(t, grad_y, m, gamma, ctx.handle, ctx.d_in, m.numel())
    return dx.to(ctx.x_dtype), dm, (None if gamma is None else dgamma.reshape(gamma.shape)), None, None, None


forward_saving.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The op in eager mode: the same two calls as the custom ops (`_forward_call`,
    `_backward_call`) under a plain autograd.Function, which costs far less per call than a
    custom op's dispatch. Saves the same tensors (T, M, gamma), so it is as stateless: a layer
    used twice in one graph, checkpointing and micro-batches in flight work the same way.
    Written with `forward(ctx, ...)` and one output on purpose: a `setup_context` makes every
    `apply` bind its arguments through inspect.signature, and T as a second output makes
    autograd track it (together 0.12-0.14 ms a step, measured on a 2-core EPYC VM)."""

    @staticmethod
    def forward(ctx, x, m, gamma, handle, d_out, rank):
        y, t = _forward_call(x, m, gamma, handle, d_out, rank)
        ctx.save_for_backward(t, m, gamma)
        ctx.handle, ctx.d_in = handle, x.shape[1]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # backward(create_graph=True): first derivatives only
            return _eager_backward_once(ctx, grad_y)
        return _eager_backward(ctx, grad_y)


def _eager_backward(ctx, grad_y):
    t, m, gamma = ctx.saved_tensors
    dx, dm, dgamma = _backward_call(t, grad_y, m, gamma, ctx.handle, ctx.d_in, m.numel())
    if gamma is None:
        dgamma = None
    elif gamma.dim() != 0:
        dgamma = dgamma.reshape(gamma.shape)
    return dx, dm, dgamma, None, None, None


# Under create_graph the gradients are computed without a graph (the library's backward has
# no derivative of its own); a second backward through them raises, as a custom op without
# autograd would. once_differentiable costs ~15 us a call, hence only then.
_eager_backward_once = torch.autograd.function.once_differentiable(_eager_backward)


_SPIN_WARNED = False


def _warn_if_omp_spins(x):
    """One warning when a CPU step runs while torch's OpenMP threads spin-wait (see svft/__init__)."""
    global _SPIN_WARNED
    if _SPIN_WARNED or x.is_cuda or torch.get_num_threads() < 2:
        return
    _SPIN_WARNED = True
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        warnings.warn(
            "svft: torch's OpenMP threads spin-wait on the cores svft's threads use (OMP_WAIT_POLICY is "
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}); CPU steps can run up to 2x slower. Set "
            "OMP_WAIT_POLICY=PASSIVE before starting Python, or import svft before torch.",
            RuntimeWarning,
            stacklevel=3,
        )


# Private torch hooks; a torch without them takes the custom ops always (correct, slower).
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def _eager(x):
    """Whether the call may take `_Eager` (the library on x's memory right now): not while
    torch.compile / torch.export trace, functorch transforms run, a dispatch mode (fake
    tensors, make_fx) is active, or x is a tensor subclass or on the meta device. Those take
    the custom ops, which carry fake kernels."""
    return not (
        torch.compiler.is_compiling()
        or type(x) is not torch.Tensor
        or x.is_meta
        or _functorch_active()
        or _dispatch_depth()
    )


def svft_linear(x, m, gamma, layer):
    """The SVFT layer `layer` (an svft.Layer) applied to x of shape (..., d_in) with coefficients
    m and gate gamma (None without the gate), differentiable in x, m and gamma."""
    if not _SPIN_WARNED:
        _warn_if_omp_spins(x)
    d_in, d_out = layer.d_in, layer.d_out
    flat = x.dim() == 2 and x.shape[1] == d_in  # (n, d_in) already: no reshape either way
    x2 = x if flat else x.reshape(-1, d_in)
    if _eager(x2):
        y = _Eager.apply(x2, m, gamma, layer.handle, d_out, layer.rank)
    else:
        y, _ = forward_saving(x2, m, gamma, layer.handle, d_out, layer.rank)
    return y if flat else y.reshape(*x.shape[:-1], d_out)


class SVFTLinear(nn.Module):
    """An SVFT adapter of a linear layer: `y = x (U (diag(s) + g M) V^T)^T + bias`.

    Trainable: `m` (|Omega| coefficients) and, with the gate, `gamma` (g = sigmoid(gamma)).
    Build it with `SVFTLinear.from_linear` (thin SVD of the weight), `from_factors` (saved
    factors, e.g. of `svft decompose`) or `from_official_state_dict`; `merge()` returns a plain
    `nn.Linear`. Buffers: `bias` (frozen), `s_row`, `s_col` (int64: coefficient k sits at
    (s_row[k], s_col[k]) of the r x r core, as in the official layer). With `adapter_enabled`
    False (see `svft.peft.SVFTModel.disable_adapter`) it computes the frozen base
    `U diag(s) V^T x + bias`.

    State dict and pickling. U, s, V live in the library only (one copy: registering them as
    buffers too would double the layer's memory, and keep a second copy to keep consistent).
    `state_dict()` adds them as `svft_u` (d_out x r), `svft_s` (r), `svft_v` (d_in x r), f32 on
    the module's device, read from the library when the state dict is made
    (`_save_to_state_dict`), and the pattern spec as `svft_pattern` (its UTF-8 bytes, uint8: a
    tensor, so safetensors can hold the state dict); `load_state_dict()` rebuilds the library
    layer from them and from `s_row`/`s_col` (`_load_from_state_dict`), so a state dict
    restores the module completely, into a module of another model or pattern too. Pickling (`torch.save(module)`,
    `copy.deepcopy`) does the same through `__getstate__`/`__setstate__`: the library handle is
    never pickled. The index buffers go with the state and the layer is rebuilt on exactly those
    pairs (`svft._build`: `svft_layer_from_factors_indexed`).
    """

    def __init__(self, layer, bias, device, pattern=None, init="zero", seed=0):
        super().__init__()
        self._layer = layer
        self.in_features, self.out_features = layer.d_in, layer.d_out
        self.m = nn.Parameter(torch.from_numpy(layer.coefficients).to(device))
        self.gamma = nn.Parameter(torch.tensor(layer.gamma, device=device)) if layer.gate else None
        self.register_buffer("bias", bias)
        self._dtype = torch.float32 if bias is None else bias.dtype
        rows, cols = (torch.from_numpy(a.astype("int64")).to(device) for a in layer.indices())
        self.register_buffer("s_row", rows)
        self.register_buffer("s_col", cols)
        self.pattern, self.init, self.seed = pattern, init, seed
        self.adapter_enabled = True
        self._base_checksum = None

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
        module = cls(layer, None if b is None else b.clone(), w.device, pattern, init, seed)
        module._dtype = w.dtype
        return module

    @classmethod
    def from_factors(cls, u, s, v, bias=None, pattern="banded:2", init="official", gate=True, seed=0, plan="auto",
                     rows=None, cols=None, device="cpu", dtype=torch.float32):
        """A layer over saved factors u (d_out x r), s (r), v (d_in x r) (tensors or arrays),
        with this pattern spec, or with an explicit index set `rows`, `cols` (coefficient k at
        (rows[k], cols[k]); M is then set by the caller). `dtype` is the base weight's (what
        `merge` returns); on CUDA the layer computes in it."""
        from ._build import build_layer

        device = torch.device(device)
        b = None if bias is None else torch.as_tensor(bias).detach().to(device=device, dtype=dtype).clone()
        layer, pattern = build_layer(u, s, v, b, pattern, init, gate, seed, device, dtype, rows, cols)
        layer.set_plan(plan)
        module = cls(layer, b, device, pattern, init, seed)
        module._dtype = dtype
        return module

    def _install(self, layer):
        """Makes `layer` this module's, with its index set. M is resized (zeros) if needed."""
        device = self.m.device
        old, self._layer = self._layer, layer
        if old is not None and old is not layer:
            old.close()
        rows, cols = (torch.from_numpy(a.astype("int64")) for a in layer.indices())
        self.s_row, self.s_col = rows.to(device), cols.to(device)
        if self.m.numel() != self.s_row.numel():
            self.m = nn.Parameter(torch.zeros(self.s_row.numel(), device=device), self.m.requires_grad)
        self._base_checksum = None

    def _rebuild(self, u, s, v, rows, cols, bias, gate):
        """Rebuilds the library layer over factors u, s, v with index set (rows, cols) (None:
        the module's pattern spec), bias and gate (a state dict's or a pickle's)."""
        from ._build import build_layer

        device = self.m.device
        if bias is not None:
            bias = torch.as_tensor(bias).detach().to(device=device, dtype=self._dtype)
        layer, self.pattern = build_layer(u, s, v, bias, self.pattern or "plain", self.init or "zero", gate,
                                          self.seed or 0, device, self._dtype, rows, cols)
        self._install(layer)
        self.in_features, self.out_features = layer.d_in, layer.d_out
        if gate and self.gamma is None:
            self.gamma = nn.Parameter(torch.zeros((), device=device), self.m.requires_grad)
        elif not gate and self.gamma is not None:
            self.gamma = None

    def _library_m(self, enabled=None):
        """M as the library takes it: the module's, or zeros while the adapter is disabled."""
        if not (self.adapter_enabled if enabled is None else enabled):
            return torch.zeros(self._layer.nnz, dtype=torch.float32, device=self.m.device)
        return self.m

    def _load_parameters(self, m, gamma):
        """Hands the current M and gamma to the library from their own memory (device memory
        on CUDA, ordered on the current stream: no host round trip)."""
        _load(self._layer.handle, m, gamma, _stream(m))

    def forward(self, x):
        gamma = self.gamma if self.adapter_enabled else None  # disabled: M = 0, C = diag(s)
        return svft_linear(x, self._library_m(), gamma, self._layer)

    @torch.no_grad()
    def merged_weight(self):
        """U C V^T with the current parameters, (out_features, in_features) float32, on the
        layer's device."""
        self._load_parameters(self._library_m(enabled=True), self.gamma)
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
        return (f"in_features={l.d_in}, out_features={l.d_out}, rank={l.rank}, nnz={self.m.numel()}, gate={l.gate}, "
                f"pattern={self.pattern}")

    # ---- state dict and pickling (see the class docs) ------------------------------------
    def factors(self):
        """(U, s, V) of the library as float32 tensors on the module's device."""
        return tuple(torch.from_numpy(a).to(self.m.device) for a in self._layer.factors())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in zip(("svft_u", "svft_s", "svft_v"), self.factors()):
            destination[prefix + name] = t
        spec = (self.pattern or "plain").encode()
        destination[prefix + "svft_pattern"] = torch.tensor(list(spec), dtype=torch.uint8, device=self.m.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [prefix + k for k in ("svft_u", "svft_s", "svft_v")]
        spec = state_dict.get(prefix + "svft_pattern")
        if all(k in state_dict for k in keys):
            rows, cols = state_dict.get(prefix + "s_row"), state_dict.get(prefix + "s_col")
            if spec is not None:  # the spec that made the indices (so they come out identical)
                self.pattern = bytes(spec.cpu().tolist()).decode()
            try:
                self._rebuild(*(state_dict[k] for k in keys), rows, cols, state_dict.get(prefix + "bias", self.bias),
                              gate=(prefix + "gamma") in state_dict)
            except Exception as e:  # reported by load_state_dict with the others
                error_msgs.append(f"rebuilding the SVFT layer of `{prefix[:-1]}`: {e}")
                return
        elif strict:
            missing_keys.extend(k for k in keys if k not in state_dict)
        rest = {k: v for k, v in state_dict.items() if k not in keys and k != prefix + "svft_pattern"}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_layer"] = None
        state["_svft_factors"] = tuple(torch.from_numpy(a) for a in self._layer.factors())
        return state

    def __setstate__(self, state):
        factors = state.pop("_svft_factors", None)
        super().__setstate__(state)
        if factors is not None:
            self._rebuild(*factors, self.s_row, self.s_col, self.bias, gate=self.gamma is not None)

    # ---- the official layer's state dict (SVFT.md section 5) -----------------------------
    @classmethod
    def from_official_state_dict(cls, sd, bias=None, pattern=None, plan="auto", device=None, dtype=None):
        """A module from the official `LinearWithSVFT`'s state dict: `svft_layer.u` (d_out x r),
        `.s_pre` (r), `.s` (|Omega|), `.gate` ([1]), `.v` (r x d_in, i.e. V^T), `.s_row`, `.s_col`
        (the `svft_layer.` prefix optional), and `bias` (else the `bias` argument). The index set
        is kept as given, duplicates included; `pattern` names the spec that made it (used when
        it reproduces the indices; banded sets are recognised without it)."""
        sd = {k[len("svft_layer."):] if k.startswith("svft_layer.") else k: v for k, v in sd.items()}
        missing = [k for k in ("u", "s_pre", "s", "v", "s_row", "s_col") if k not in sd]
        if missing:
            raise KeyError(f"not an official SVFT state dict: no {', '.join(missing)}")
        u, s_pre, v = (sd[k].detach().float() for k in ("u", "s_pre", "v"))
        rows, cols = sd["s_row"].long(), sd["s_col"].long()
        device = u.device if device is None else torch.device(device)
        bias = sd.get("bias", bias)
        if dtype is None:
            dtype = torch.float32 if bias is None or not bias.is_floating_point() else bias.dtype
        if pattern is None:  # the band holding the set; build_layer relabels a set that is not it
            d = int((rows - cols).abs().max())
            pattern = "plain" if d == 0 else f"banded:{d}"
        gate = "gate" in sd
        module = cls.from_factors(u, s_pre, v.T, bias=bias, pattern=pattern, init="official", gate=gate,
                                  plan=plan, rows=rows, cols=cols, device=device, dtype=dtype)
        with torch.no_grad():
            module.m.copy_(sd["s"].reshape(-1))
            if gate:
                module.gamma.copy_(sd["gate"].reshape(()))
        return module

    @torch.no_grad()
    def to_official_state_dict(self):
        """The official layer's state dict (keys `svft_layer.*` and `bias`, as `LinearWithSVFT`'s):
        the same weight. Without the gate, `gate` is 0 and `s` = 2 M (sigmoid(0) = 1/2, exact)."""
        u, s, v = self.factors()
        r = s.numel()
        diag = torch.arange(r, dtype=torch.int64, device=s.device)
        gate = self.gamma.detach().reshape(1).clone() if self.gamma is not None else torch.zeros(1, device=s.device)
        coeffs = self.m.detach().clone() if self.gamma is not None else 2 * self.m.detach()
        out = {
            "svft_layer.u": u, "svft_layer.s_pre": s, "svft_layer.s": coeffs, "svft_layer.s_pre_row": diag,
            "svft_layer.s_pre_col": diag.clone(), "svft_layer.s_row": self.s_row.clone(),
            "svft_layer.s_col": self.s_col.clone(), "svft_layer.gate": gate, "svft_layer.v": v.T.contiguous(),
        }
        if self.bias is not None:
            out["bias"] = self.bias.detach().clone()
        return out
