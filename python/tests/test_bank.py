"""The adapter bank from Python (svft.Bank over the svft_bank_* C ABI, and the torch module
SVFTBank): a mixed batch equals every segment run through its own single-adapter Layer (or
SVFTLinear), for every pattern kind, adapters added from layers and from their parts; adding,
replacing and removing adapters; bad tables, ids and adapters are SvftErrors."""

import numpy as np
import pytest

import svft
from svft import BASE, Bank, Layer, SvftError, segments_from_ids
from svft.bank import SEGMENT, segments_from_lengths

TOL = 1e-5

PATTERNS = [("plain", True), ("banded:1", False), ("banded:3", True), ("random:2:seed=5", False),
            ("random:3:seed=9", True), ("topk:2", False)]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _layers(d_out, d_in, bias, seed):
    """A base layer from a random weight, and one layer per pattern over its factors (random M,
    gamma), all CPU."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    base = Layer.from_weight(w, pattern="plain", bias=bias)
    u, s, v = base.factors()
    layers = []  # (spec, layer)
    for k, (spec, gate) in enumerate(PATTERNS):
        try:
            layer = Layer.from_factors(u, s, v, pattern=spec, init="official", gate=gate, bias=bias, seed=k)
        except SvftError:
            continue  # e.g. top-k on a non-square factor
        layer.coefficients = rng.standard_normal(layer.nnz).astype(np.float32)
        layer.gamma = float(rng.standard_normal())
        layers.append((spec, layer))
    return base, layers


def _check(bank, x, table, by_id, base):
    y = bank.forward(x, table)
    assert y.shape == (x.shape[0], bank.d_out)
    for start, end, adapter in table:
        if start == end:
            continue
        own = base if adapter in (None, BASE) else by_id[adapter]
        want = own.forward(x[start:end])
        assert rel(y[start:end], want) < TOL, (start, end, adapter, rel(y[start:end], want))
    return y


@pytest.mark.parametrize("d_out,d_in,with_bias", [(13, 11, True), (9, 17, False), (16, 16, True)])
def test_mixed_batches_equal_each_segment_through_its_own_layer(d_out, d_in, with_bias):
    rng = np.random.default_rng(d_out * 100 + d_in)
    bias = rng.standard_normal(d_out).astype(np.float32) if with_bias else None
    base, layers = _layers(d_out, d_in, bias, d_in)
    assert len(layers) >= 5
    # The base weight alone: the plain layer with M = 0.
    zero = Layer.from_factors(*base.factors(), pattern="plain", init="zero", gate=False, bias=bias)
    with Bank.from_layer(base) as bank:
        assert (bank.d_out, bank.d_in, bank.rank) == (d_out, d_in, base.rank)
        by_id = {}
        for k, (spec, layer) in enumerate(layers):
            adapter_id = 7 * k + 3
            if k % 2:
                rows, cols = layer.indices()
                bank.add(adapter_id, pattern=spec, rows=rows, cols=cols, m=layer.coefficients, gamma=layer.gamma,
                         gate=layer.gate)
            else:
                bank.add(adapter_id, layer)
            by_id[adapter_id] = layer
        assert len(bank) == len(layers) and all(i in bank for i in by_id) and 1 not in bank
        ids = list(by_id)
        for n in (1, 2, 7, 40, 129):
            for trial in range(3):
                table, start = [], 0
                while start < n:
                    length = int(rng.integers(0, 9)) if trial < 2 else int(rng.integers(1, n + 1))
                    end = min(start + length, n)
                    pick = int(rng.integers(0, len(ids) + 1))
                    table.append((start, end, ids[pick] if pick < len(ids) else (None if trial else BASE)))
                    start = end
                x = rng.standard_normal((n, d_in)).astype(np.float32)
                _check(bank, x, table, by_id, zero)
        # Every adapter alone over a whole batch is the single layer.
        x = rng.standard_normal((20, d_in)).astype(np.float32)
        for adapter_id, layer in by_id.items():
            assert rel(bank.forward(x, [(0, 20, adapter_id)]), layer.forward(x)) < TOL


def test_add_replace_remove_leave_the_others_intact():
    d_out, d_in = 12, 10
    base, layers = _layers(d_out, d_in, None, 4)
    layers = [layer for _, layer in layers]
    bank = Bank.from_layer(base)
    for k, layer in enumerate(layers):
        bank.add(k, layer)
    n = 30
    x = np.random.default_rng(1).standard_normal((n, d_in)).astype(np.float32)
    table = segments_from_lengths([5, 3, 0, 9, 6, 7], [0, 1, 2, BASE, 1, 3])
    before = bank.forward(x, table)
    # Replace adapter 1 by another layer: its rows follow the new layer, the others stay.
    u, s, v = base.factors()
    fresh = Layer.from_factors(u, s, v, pattern="random:1:seed=77", init="official", gate=True, seed=5)
    bank.replace(1, fresh)
    after = bank.forward(x, table)
    for start, end, adapter in table:
        if adapter == 1:
            assert rel(after[start:end], fresh.forward(x[start:end])) < TOL
        else:
            np.testing.assert_array_equal(after[start:end], before[start:end])
    # From parts, back to the original: bit for bit the first result.
    rows, cols = layers[1].indices()
    bank.replace(1, pattern="random:8", rows=rows, cols=cols, m=layers[1].coefficients, gamma=layers[1].gamma,
                 gate=layers[1].gate)
    np.testing.assert_array_equal(bank.forward(x, table), before)
    bank.remove(1)
    assert 1 not in bank and len(bank) == len(layers) - 1
    with pytest.raises(SvftError, match="adapter id 1 is not in the bank") as e:
        bank.forward(x, table)
    assert e.value.status == "INVALID_ARGUMENT"
    rerouted = [(a, b, BASE if i == 1 else i) for a, b, i in table]
    y = bank.forward(x, rerouted)
    for (start, end, adapter), (_, _, old) in zip(rerouted, table):
        if old != 1:
            np.testing.assert_array_equal(y[start:end], before[start:end])
    bank.close()
    bank.close()  # idempotent
    with pytest.raises(SvftError) as e:
        bank.forward(x, table)
    assert e.value.status == "NULL_POINTER"


def test_segment_helpers():
    t = segments_from_ids([3, 3, None, BASE, 5, 5, 5, 3])
    assert t.dtype == SEGMENT
    assert [tuple(int(v) for v in row) for row in t] == [(0, 2, 3), (2, 4, -1), (4, 7, 5), (7, 8, 3)]
    assert SEGMENT.itemsize == 24
    with pytest.raises(ValueError):
        segments_from_lengths([1, 2], [0])


def test_bad_tables_ids_and_adapters_are_errors():
    base, layers = _layers(8, 6, None, 2)
    layers = [layer for _, layer in layers]
    bank = Bank.from_layer(base)
    bank.add(0, layers[0])
    n = 6
    x = np.ones((n, 6), np.float32)
    good = [(0, 2, 0), (2, 6, BASE)]
    want = bank.forward(x, good)
    bad = [
        ([(1, 6, 0)], "must start at row 0"),
        ([(0, 2, 0), (3, 6, 0)], "uncovered"),
        ([(0, 3, 0), (2, 6, 0)], "inside the previous"),
        ([(0, 4, 0), (4, 2, 0)], "before it starts"),
        ([(0, 7, 0)], "run past"),
        ([(0, 5, 0)], "covers rows 0..5"),
        ([(0, 6, 9)], "adapter id 9 is not in the bank"),
        ([(0, 6, -2)], "invalid"),
        ([], "empty"),
    ]
    for table, message in bad:
        with pytest.raises(SvftError, match=message) as e:
            bank.forward(x, table)
        assert e.value.status == "INVALID_ARGUMENT", table
    with pytest.raises(ValueError, match="negative"):
        bank.forward(x, [(-1, 6, 0)])
    with pytest.raises(ValueError, match="features"):
        bank.forward(np.ones((n, 5), np.float32), good)
    with pytest.raises(SvftError, match="already in the bank"):
        bank.add(0, layers[1])
    with pytest.raises(SvftError, match="not in the bank"):
        bank.replace(4, layers[1])
    with pytest.raises(SvftError, match="not in the bank"):
        bank.remove(4)
    with pytest.raises(ValueError, match="out of range"):
        bank.add(-1, layers[1])
    other = Layer.from_weight(np.eye(8, 6, dtype=np.float32) * 2, pattern="plain")
    with pytest.raises(SvftError, match="not over this bank's base"):
        bank.add(1, other)
    with pytest.raises(SvftError) as e:
        bank.add(1, pattern="random:2", rows=[0, 1], cols=[1, 0], m=[1.0, np.nan])
    assert e.value.status == "NON_FINITE"
    with pytest.raises(SvftError) as e:
        bank.add(1, pattern="banded:1", rows=[0, 1], cols=[1, 0], m=[1.0, 2.0])
    assert e.value.status == "INVALID_ARGUMENT"
    with pytest.raises(SvftError) as e:
        bank.add(1, pattern="nonsense", rows=[0], cols=[0], m=[1.0])
    assert e.value.status == "PATTERN"
    with pytest.raises(ValueError):
        bank.add(1, pattern="random:2", rows=[0, 1], cols=[1], m=[1.0, 2.0])
    assert len(bank) == 1
    np.testing.assert_array_equal(bank.forward(x, good), want)  # untouched by the failures


def test_torch_module_equals_each_svft_linear():
    torch = pytest.importorskip("torch")  # conftest turns a skip into a failure: torch is required
    from svft.nn import SVFTLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(10, 7)
    modules = [SVFTLinear.from_linear(linear, pattern=p, gate=g, seed=k) for k, (p, g) in enumerate(PATTERNS[:4])]
    with torch.no_grad():
        for k, m in enumerate(modules):
            m.m.copy_(torch.randn_like(m.m))
            if m.gamma is not None:
                m.gamma.fill_(0.3 * k - 0.4)
    bank = svft.SVFTBank.from_svft_linear(modules[0])
    assert isinstance(bank, torch.nn.Module) and svft.bank.SVFTBank is type(bank)
    assert (bank.bank.backend, bank.bank.dtype) == ("cpu", "float32")
    for k, m in enumerate(modules):
        bank.add(10 + k, m)
    assert len(bank) == 4 and 12 in bank
    x = torch.randn(17, 10)
    row_ids = [10, 10, 11, BASE, 12, 12, 12, 13, 13, 10, 11, 11, 11, 11, 13, None, 12]
    y = bank(x, row_adapters=row_ids)
    y2 = bank(x, segments=segments_from_ids(row_ids))
    assert torch.equal(y, y2) and not y.requires_grad
    with torch.no_grad():
        for i, adapter in enumerate(row_ids):
            if adapter in (None, BASE):
                want = linear(x[i:i + 1])  # the base weight: U diag(s) V^T = W (full rank) + bias
            else:
                want = modules[adapter - 10](x[i:i + 1])
            assert rel(y[i:i + 1].numpy(), want.numpy()) < 1e-4, (i, adapter)
    # A later training step does not reach the bank until replace.
    with torch.no_grad():
        modules[1].m.mul_(2)
    assert torch.equal(bank(x, row_adapters=row_ids), y)
    bank.replace(11, modules[1])
    with torch.no_grad():
        z = bank(x, row_adapters=[11] * 17)
        assert rel(z.numpy(), modules[1](x).numpy()) < TOL
    with pytest.raises(ValueError):
        bank(x)
    with pytest.raises(TypeError):
        bank(x.double(), row_adapters=row_ids)
    with pytest.raises(SvftError, match="not in the bank"):
        bank(x, row_adapters=[99] * 17)


def test_cuda_module_on_a_side_stream():
    """SVFTBank over CUDA SVFTLinears (f32 and bf16): a mixed batch run on a side stream equals
    each row through its own module on the default stream; the bank takes the module's dtype;
    a CPU tensor or a NumPy forward on a CUDA bank is an error."""
    torch = pytest.importorskip("torch")
    from _support import Skip
    from svft.nn import SVFTLinear

    if not torch.cuda.is_available():
        raise Skip("needs a CUDA device (torch.cuda.is_available() is False)")
    if not svft.backend_available("cuda"):
        raise Skip(f"needs libsvft's CUDA backend: {svft.backend_unavailable_reason('cuda')}")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        torch.manual_seed(1)
        linear = torch.nn.Linear(40, 24).to("cuda", dtype)
        modules = [SVFTLinear.from_linear(linear, pattern=p, gate=g, seed=k) for k, (p, g) in enumerate(PATTERNS[:4])]
        with torch.no_grad():
            for m in modules:
                m.m.copy_(torch.randn_like(m.m))
        bank = svft.SVFTBank.from_svft_linear(modules[0])
        assert (bank.bank.backend, bank.bank.dtype) == ("cuda", str(dtype).removeprefix("torch."))
        for k, m in enumerate(modules):
            bank.add(k, m)
        row_ids = [0] * 5 + [BASE] * 2 + [1] * 20 + [2, 3, 3] + [None] + [0] * 3
        x = torch.randn(len(row_ids), 40, device="cuda").to(dtype)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            y = bank(x, row_adapters=row_ids)
        torch.cuda.current_stream().wait_stream(side)
        assert y.dtype == dtype and y.is_cuda
        with torch.no_grad():
            for i, adapter in enumerate(row_ids):
                want = linear(x[i:i + 1]) if adapter in (None, BASE) else modules[adapter](x[i:i + 1])
                assert rel(y[i:i + 1].float().cpu().numpy(), want.float().cpu().numpy()) < tol, (dtype, i, adapter)
        with pytest.raises(ValueError, match="lives on cuda"):
            bank(x.cpu(), row_adapters=row_ids)
        with pytest.raises(ValueError, match="lives on cuda"):
            bank.bank.forward(np.zeros((2, 40), np.float32), [(0, 2, 0)])
