"""The PyTorch op's autograd path holds no per-call state: the activations backward needs
(T = X V) are a tensor autograd keeps, so a layer used twice in one graph, activation
checkpointing, several micro-batches in flight and torch.compile all give the gradients of
the plain-PyTorch official math (test_torch.OfficialSVFT), with no forward recomputed by the
op itself."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import svft.nn
from svft.nn import SVFTLinear
from test_torch import _devices, _pair, _rel, _setup


def _grads(module):
    return [p.grad.clone() for p in (module.m, module.gamma) if p is not None]


def _zero(*modules):
    for mod in modules:
        for p in mod.parameters():
            p.grad = None


def _check(ours, official, what, tol=1e-4):
    for a, b in zip(_grads(ours), _grads(official)):
        assert _rel(a, b) < tol, (what, _rel(a, b))


def test_used_twice_in_one_graph():
    """y = L(L(x)) + L(x'): three forwards of one layer before one backward."""
    _setup()
    for device in _devices():
        _, ours, official = _pair(device, 19, 19, "banded:2", True)
        x, x2 = torch.randn(5, 19, device=device), torch.randn(3, 19, device=device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss_a = (ours(ours(xa)) ** 2).sum() + ours(x2).sum()
        loss_b = (official(official(xb)) ** 2).sum() + official(x2).sum()
        assert _rel(loss_a, loss_b) < 1e-5
        loss_a.backward()
        loss_b.backward()
        assert _rel(xa.grad, xb.grad) < 1e-5
        _check(ours, official, "twice")


def test_checkpointing():
    """torch.utils.checkpoint reruns the forward in backward: the op's T comes from that
    rerun, and the gradients equal the unchekpointed ones."""
    _setup()
    for device in _devices():
        _, ours, official = _pair(device, 23, 17, "random:4:seed=2", True)
        x = torch.randn(2, 7, 17, device=device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = checkpoint(lambda t: torch.tanh(ours(t)), xa, use_reentrant=False)
        yb = torch.tanh(official(xb))
        gy = torch.randn_like(yb)
        ya.backward(gy)
        yb.backward(gy)
        assert _rel(xa.grad, xb.grad) < 1e-5
        _check(ours, official, "checkpoint")


def test_micro_batches_in_flight():
    """Forwards of several micro-batches first, their backwards afterwards in reverse order
    (pipeline schedules): each backward uses its own micro-batch's T."""
    _setup()
    for device in _devices():
        _, ours, official = _pair(device, 16, 29, "banded:1", False)
        xs = [torch.randn(n, 29, device=device) for n in (4, 9, 1)]
        outs_a = [ours(x) for x in xs]
        outs_b = [official(x) for x in xs]
        gys = [torch.randn_like(y) for y in outs_b]
        for y, gy in reversed(list(zip(outs_a, gys))):
            y.backward(gy)
        for y, gy in zip(outs_b, gys):
            y.backward(gy)
        _check(ours, official, "micro-batches")


def test_parameters_changed_between_forward_and_backward_are_not_used():
    """A forward of the layer with other parameters (another model sharing nothing but the
    handle's library state) between a forward and its backward does not leak into it."""
    _setup()
    for device in _devices():
        _, ours, official = _pair(device, 13, 11, "banded:2", True)
        x = torch.randn(6, 11, device=device)
        y = ours(x)
        with torch.no_grad():
            other = ours.m.detach() * 3 + 1
            svft.nn.svft_linear(x, other, ours.gamma.detach() - 2, ours._layer)  # loads other values
        gy = torch.randn_like(y)
        y.backward(gy)
        official(x).backward(gy)
        _check(ours, official, "interleaved")


def test_torch_compile_no_graph_break():
    """torch.compile(fullgraph=True) of a small model with SVFT layers: no graph break at the
    op (fullgraph raises on one), outputs and gradients equal eager."""
    _setup()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 9))
    model = nn.Sequential(
        SVFTLinear.from_linear(base[0], pattern="banded:2", init="official", gate=True, seed=1),
        nn.GELU(),
        SVFTLinear.from_linear(base[2], pattern="plain", init="official", gate=False, seed=2),
    )
    x = torch.randn(5, 12)
    eager = model(x)
    eager.square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    _zero(model)
    compiled = torch.compile(model, fullgraph=True)  # inductor, as a user calls it
    got = compiled(x)
    got.square().sum().backward()
    assert _rel(got, eager) < 1e-5
    for a, b in zip((p.grad for p in model.parameters()), want):
        assert _rel(a, b) < 1e-5


def test_fake_kernels_match_real_shapes():
    """torch.library's opcheck: the fake (meta) kernels' shapes, dtypes and the autograd
    registration agree with the real op."""
    _setup()
    _, ours, _ = _pair(torch.device("cpu"), 10, 7, "banded:1", True)
    layer = ours._layer
    x = torch.randn(4, 7, requires_grad=True)
    args = (x, ours.m.detach().clone().requires_grad_(), ours.gamma.detach().clone().requires_grad_(), layer.handle,
            layer.d_out, layer.rank)
    torch.library.opcheck(svft.nn.forward_saving, args, test_utils=("test_schema", "test_faketensor",
                                                                   "test_autograd_registration"))
