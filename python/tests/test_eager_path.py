"""The op's two routes to the library (svft/nn.py): eager mode runs `_Eager`, a plain
autograd.Function (cheap per call), torch.compile traces the custom ops `svft::forward_saving`
/ `svft::backward_saved` (fake kernels, no graph break). Both make the same calls through the
same helpers (`_forward_call`, `_backward_call`), so they must give the same y, dx, dm and
dgamma; these tests check that, the eager route's gradients against the f64 reference and
gradcheck, and which route runs when."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import svft.nn
from _support import reference, rel_err
from svft.nn import SVFTLinear, svft_linear
from test_torch import _devices, _setup

SHAPES = [(37, 53, 7), (53, 37, 1), (16, 9, 40)]  # (d_out, d_in, n): odd, n = 1, n > d_in


def _module(device, d_out, d_in, gate, pattern="banded:2", seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out).to(device)  # with bias: the library adds it
    ours = SVFTLinear.from_linear(linear, pattern=pattern, init="official", gate=gate, seed=seed)
    with torch.no_grad():
        ours.m.add_(0.1 * torch.randn_like(ours.m))
        if gate:
            ours.gamma.fill_(0.3)
    return linear, ours


def _leaves(ours, x):
    x = x.detach().clone().requires_grad_()
    m = ours.m.detach().clone().requires_grad_()
    gamma = None if ours.gamma is None else ours.gamma.detach().clone().requires_grad_()
    return x, m, gamma


def _op_node(y):
    """The name of the autograd node of the op that made y (under the reshape's view, if any)."""
    node = y.grad_fn
    if type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__


def _eager_step(ours, x, gy):
    """y and (dx, dm, dgamma) through svft_linear in eager mode (the _Eager route)."""
    x, m, gamma = _leaves(ours, x)
    y = svft_linear(x, m, gamma, ours._layer)
    assert _op_node(y) == "_EagerBackward"
    y.backward(gy)
    return y.detach(), x.grad, m.grad, None if gamma is None else gamma.grad


def _custom_op_step(ours, x, gy):
    """The same through the custom ops called directly (the route torch.compile traces)."""
    x, m, gamma = _leaves(ours, x)
    layer = ours._layer
    y, _ = svft.nn.forward_saving(x.reshape(-1, layer.d_in), m, gamma, layer.handle, layer.d_out, layer.rank)
    y = y.reshape(*x.shape[:-1], layer.d_out)
    assert _op_node(y) == "GeneratedBackwardFor_svft_forward_saving_defaultBackward"
    y.backward(gy)
    return y.detach(), x.grad, m.grad, None if gamma is None else gamma.grad


def _rel(a, b):
    return ((a - b).double().norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("d_out,d_in,n", SHAPES)
def test_eager_and_custom_op_routes_agree(d_out, d_in, n, gate):
    """y, dx, dm and dgamma of both routes agree to 1e-6 (same calls, same inputs: only the
    library's thread reduction order may differ), on inputs that are 2-D, 3-D and not
    contiguous, and on an expanded (stride-0) dL/dy, as y.sum() gives."""
    _setup()
    for device in _devices():
        _, ours = _module(device, d_out, d_in, gate)
        x2 = torch.randn(n, d_in, device=device)
        inputs = [
            (x2, torch.randn(n, d_out, device=device)),
            (x2.reshape(1, n, d_in), torch.randn(1, n, d_out, device=device)),
            (torch.randn(d_in, n, device=device).T, torch.randn(n, d_out, device=device)),  # x not contiguous
            (x2, torch.ones((), device=device).expand(n, d_out)),  # gy not contiguous
        ]
        for x, gy in inputs:
            a = _eager_step(ours, x, gy)
            b = _custom_op_step(ours, x, gy)
            assert a[0].shape == b[0].shape == (*x.shape[:-1], d_out)
            assert a[1].shape == x.shape and a[2].shape == ours.m.shape
            for name, u, v in zip(("y", "dx", "dm"), a, b):
                assert torch.isfinite(u).all(), name
                assert _rel(u, v) < 1e-6, (name, _rel(u, v))
            if gate:
                assert a[3].shape == ours.gamma.shape == ()
                assert a[3].item() != 0.0
                assert abs(a[3].item() - b[3].item()) <= 1e-6 * abs(b[3].item()), (a[3], b[3])
            else:
                assert a[3] is None and b[3] is None


@pytest.mark.parametrize("gate", [True, False])
def test_eager_route_matches_the_f64_reference(gate):
    """The eager route's y, dx, dm and dgamma against the NumPy f64 math of the layer's own
    factors (_support.reference), on an odd shape with bias."""
    _setup()
    d_out, d_in, n = 37, 53, 7
    linear, ours = _module(torch.device("cpu"), d_out, d_in, gate, pattern="random:9:seed=3")
    x = torch.randn(n, d_in)
    gy = torch.randn(n, d_out)
    y, dx, dm, dgamma = _eager_step(ours, x, gy)
    _, forward, backward = reference(ours._layer, m=ours.m.detach().numpy(),
                                     gamma=ours.gamma.item() if gate else 0.0, bias=linear.bias.detach().numpy())
    want_dx, want_dm, want_dgamma = backward(x.numpy(), gy.numpy())
    assert rel_err(y.numpy(), forward(x.numpy())) < 1e-5
    assert rel_err(dx.numpy(), want_dx) < 1e-5
    assert rel_err(dm.numpy(), want_dm) < 1e-5
    if gate:  # a sum with cancellation: test_numpy's scale
        scale = abs(want_dgamma) + 1e-3 * np.abs(want_dm).sum()
        assert abs(dgamma.item() - want_dgamma) <= 1e-4 * scale, (dgamma.item(), want_dgamma)
    else:
        assert dgamma is None


@pytest.mark.parametrize("gate", [True, False])
def test_eager_route_gradcheck(gate):
    """torch.autograd.gradcheck of the eager route (f32, the library's dtype on the CPU, so
    test_torch.test_gradcheck's tolerances), on x of 3 dimensions, M and gamma."""
    _setup()
    _, ours = _module(torch.device("cpu"), 11, 13, gate, pattern="banded:1")
    x = torch.randn(2, 3, 13, requires_grad=True)
    m = ours.m.detach().clone().requires_grad_()
    gamma = ours.gamma.detach().clone().requires_grad_() if gate else None
    calls = []

    def f(x, m, gamma=None):
        y = svft_linear(x, m, gamma, ours._layer)
        calls.append(_op_node(y))
        return y

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "inputs are not double precision": f32 by design
        inputs = (x, m) + ((gamma,) if gate else ())
        assert torch.autograd.gradcheck(f, inputs, eps=1e-3, atol=2e-3, rtol=1e-2)
    assert calls and set(calls) == {"_EagerBackward"}, set(calls)


def test_eager_mode_runs_the_function_not_the_custom_ops(monkeypatch):
    """In eager mode neither custom op is called (they are patched to raise), and the
    gradients still arrive; `_Eager` is what autograd records."""
    _setup()
    _, ours = _module(torch.device("cpu"), 37, 53, True)

    def boom(*args, **kwargs):
        raise AssertionError("a custom op ran in eager mode")

    monkeypatch.setattr(svft.nn, "forward_saving", boom)
    monkeypatch.setattr(svft.nn, "backward_saved", boom)
    x = torch.randn(2, 7, 53, requires_grad=True)
    y = ours(x)
    assert type(y.grad_fn).__name__ == "ViewBackward0"
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_EagerBackward"
    y.square().sum().backward()
    assert x.grad is not None and ours.m.grad is not None and ours.gamma.grad is not None
    assert ours.m.grad.abs().sum() > 0 and ours.gamma.grad != 0
    # and the patched custom ops do raise when reached: they are what the other route calls
    with pytest.raises(AssertionError, match="custom op ran"):
        svft.nn.forward_saving(x.detach()[0], ours.m, ours.gamma, ours._layer.handle, 37, ours._layer.rank)


def test_compile_traces_the_custom_ops_not_the_function(monkeypatch):
    """torch.compile (fullgraph, so a graph break raises) puts svft::forward_saving in the
    forward graph and svft::backward_saved in the backward graph, never `_Eager` (patched to
    raise), and its outputs and gradients equal eager mode's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    _setup()
    torch._dynamo.reset()
    _, ours = _module(torch.device("cpu"), 37, 53, True)
    x = torch.randn(7, 53)
    eager = ours(x)
    eager.square().sum().backward()
    want = [p.grad.clone() for p in (ours.m, ours.gamma)]
    ours.m.grad = ours.gamma.grad = None

    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
            return make_boxed_func(gm.forward)

        return compiler

    class Boom:
        @staticmethod
        def apply(*args):
            raise AssertionError("_Eager ran under torch.compile")

    monkeypatch.setattr(svft.nn, "_Eager", Boom)
    compiled = torch.compile(ours, fullgraph=True, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")))
    got = compiled(x)
    got.square().sum().backward()
    assert graphs["fw"] and graphs["bw"]
    assert any("svft.forward_saving" in t for g in graphs["fw"] for t in g), graphs["fw"]
    assert any("svft.backward_saved" in t for g in graphs["bw"] for t in g), graphs["bw"]
    assert _rel(got.detach(), eager.detach()) < 1e-6
    for a, b in zip((ours.m.grad, ours.gamma.grad), want):
        assert _rel(a, b) < 1e-6
    with pytest.raises(AssertionError, match="_Eager ran"):  # eager mode now reaches the patched Function
        ours(x)
    torch._dynamo.reset()


def test_tracing_without_real_memory_takes_the_custom_ops():
    """Meta tensors and fake tensors (no memory for the library to read) take the custom ops,
    whose fake kernels give the shapes: no pointer of them reaches the library."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, ours = _module(torch.device("cpu"), 37, 53, True)
    layer = ours._layer
    y = svft_linear(torch.empty(4, 53, device="meta"), ours.m.to("meta"), ours.gamma.to("meta"), layer)
    assert y.shape == (4, 37) and y.is_meta
    x, m, gamma = torch.randn(2, 3, 53), ours.m.detach(), ours.gamma.detach()
    with FakeTensorMode() as mode:
        y = svft_linear(mode.from_tensor(x), mode.from_tensor(m), mode.from_tensor(gamma), layer)
    assert y.shape == (2, 3, 37)


def test_eager_route_keeps_saved_values_and_errors():
    """The eager route saves M and gamma as the custom op did: parameters changed in place
    after a forward fail its backward (autograd's version check), and a wrong dtype or a
    gamma of several values is refused with a clear message."""
    _, ours = _module(torch.device("cpu"), 13, 11, True)
    y = ours(torch.randn(3, 11))
    with torch.no_grad():
        ours.m.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with pytest.raises(TypeError, match="must be float32"):
        svft_linear(torch.randn(3, 11), ours.m.detach().double(), ours.gamma, ours._layer)
    with pytest.raises(RuntimeError, match="one value"):
        svft_linear(torch.randn(3, 11), ours.m.detach(), torch.zeros(2), ours._layer)
    with pytest.raises(svft.SvftError, match="SHAPE"):  # the library's own check, message intact
        svft_linear(torch.randn(3, 11), ours.m.detach()[:-1], ours.gamma, ours._layer)


def test_library_writes_every_gradient_element(monkeypatch):
    """dx, dm and dgamma are allocated uninitialised by `_backward_call`: the library must write
    every element. Here every `new_empty` returns NaNs (so does torch.empty for the custom ops'
    fake kernels, not used here), so an element left unwritten shows; without the gate, dgamma
    must come back 0."""
    new_empty = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):
        return new_empty(self, *args, **kwargs).fill_(float("nan"))

    for gate in (True, False):
        _, ours = _module(torch.device("cpu"), 37, 53, gate)
        layer, m, gamma = ours._layer, ours.m.detach(), ours.gamma.detach() if gate else None
        x, gy = torch.randn(7, 53), torch.randn(7, 37)
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "new_empty", poisoned)
            assert torch.isnan(x.new_empty(2)).all()  # the poison is in place
            y, t = svft.nn._forward_call(x, m, gamma, layer.handle, layer.d_out, layer.rank)
            dx, dm, dgamma = svft.nn._backward_call(t, gy, m, gamma, layer.handle, layer.d_in, layer.nnz)
        for name, v in (("y", y), ("t", t), ("dx", dx), ("dm", dm), ("dgamma", dgamma)):
            assert torch.isfinite(v).all(), name
        assert (dgamma != 0) if gate else (dgamma == 0)


def test_create_graph_gives_first_derivatives_and_refuses_a_second():
    """backward(create_graph=True) through the eager route: the first derivatives equal a plain
    backward's; differentiating them again raises (the library has no second derivative), as
    the custom op route does, instead of silently treating them as constants."""
    _, ours = _module(torch.device("cpu"), 9, 7, True)
    x = torch.randn(3, 7, requires_grad=True)
    (want,) = torch.autograd.grad(ours(x).square().sum(), x)
    (got,) = torch.autograd.grad(ours(x).square().sum(), x, create_graph=True)
    assert _rel(got.detach(), want) < 1e-6
    with pytest.raises(RuntimeError, match="differentiate twice"):
        got.sum().backward()
