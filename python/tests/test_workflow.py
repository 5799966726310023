"""The PEFT-style workflow (svft.peft) on PyTorch models: target selection and freezing,
print_trainable_parameters, forward against an f64 reference, per-module random patterns,
disable_adapter, merge_and_unload, state_dict / torch.save round trips, the official layer's
state dict, and a tiny Hugging Face BERT through `svft decompose` -> training here ->
save_adapter -> `svft merge` (and `svft init-adapter` -> load_adapter). The BERT tests need
`transformers` and the CLI binary (see test_adapter_files): without them they fail."""

import contextlib
import copy
import io
import re
import shutil
import tempfile
from pathlib import Path

import _support
from _support import Skip

try:
    import torch
    from torch import nn
except ImportError as e:  # the NumPy-only CI
    raise Skip(f"PyTorch is not installed ({e})")

import numpy as np

import svft
from svft import files
from svft.nn import SVFTLinear
from svft.peft import SVFTConfig, SVFTModel, get_svft_model, inject, load_adapter
from test_adapter_files import cli
from test_torch import OfficialSVFT

assert _support
TOL = 1e-5  # f32 vs f64, relative Frobenius


def _rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@contextlib.contextmanager
def _tempdir():
    d = Path(tempfile.mkdtemp(prefix="svft-workflow-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up = nn.Linear(d, h)             # d_out != d_in
        self.down = nn.Linear(h, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.down(torch.tanh(self.up(x))))


class Net(nn.Module):
    """Nested linears of odd sizes, a non-target linear and a head."""

    def __init__(self, d=13, h=19, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(7, d)
        self.blocks = nn.ModuleList([Block(d, h), Block(d, h)])
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _perturb(model, scale=0.2, seed=0):
    """Moves every SVFT module's coefficients and gate away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.svft_modules():
            m.m.add_(scale * torch.randn(m.m.shape, generator=g))
            if m.gamma is not None:
                m.gamma.add_(0.5 * torch.randn((), generator=g))


def _dense64(module, adapter=True):
    """f64 U (diag(s) + g M) V^T of an SVFT module, from its factors and index buffers."""
    u, s, v = (t.double() for t in module.factors())
    c = torch.diag(s)
    if adapter:
        g = torch.sigmoid(module.gamma.double()) if module.gamma is not None else 1.0
        c = c.index_put((module.s_row, module.s_col), g * module.m.detach().double(), accumulate=True)
    return u @ c @ v.T


def _official_model64(model, adapter=True):
    """The model in f64 with every SVFT module replaced by the official layer's math
    (test_torch.OfficialSVFT: dense W = U (diag(s) + g M) V^T, autograd through it) on the same
    factors, indices, M and gamma (M = 0 without the adapter)."""
    ref = copy.deepcopy(model.base_model if isinstance(model, SVFTModel) else model)
    for name, m in [(n, m) for n, m in ref.named_modules() if isinstance(m, SVFTLinear)]:
        u, s, v = (t.double() for t in m.factors())
        coeffs = m.m.detach().double() if adapter else torch.zeros_like(m.m, dtype=torch.float64)
        gamma = None if m.gamma is None else m.gamma.detach().double()
        bias = None if m.bias is None else m.bias.double()
        off = OfficialSVFT(u, s, v, m.s_row, m.s_col, coeffs, gamma, bias)
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, off)
    return ref.double()


def _reference64(model, x, adapter=True):
    with torch.no_grad():
        return _official_model64(model, adapter)(x.double())


def test_targets_freezing_and_trainable_parameters():
    net = Net()
    n_before = sum(p.numel() for p in net.parameters())
    head_params = sum(p.numel() for p in net.head.parameters())
    model = get_svft_model(net, SVFTConfig(target_modules=["up", "down"], pattern="banded:1",
                                           modules_to_save=["head"]))
    assert inject is get_svft_model and isinstance(model, SVFTModel) and model.base_model is net
    names = sorted(n for n, _ in model.svft_modules())
    assert names == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"], names
    assert isinstance(net.inp, nn.Linear) and isinstance(net.head, nn.Linear)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    want = {f"blocks.{i}.{l}.{p}" for i in (0, 1) for l in ("up", "down") for p in ("m", "gamma")}
    want |= {"head.weight", "head.bias"}
    assert trainable == want, trainable ^ want
    # Counts: banded:1 at r = 13: 13*3 - 2 = 37 coefficients + 1 gate per module.
    t, total = model.get_nb_trainable_parameters()
    assert t == 4 * (37 + 1) + head_params
    frozen_factors = 2 * ((19 + 13 + 1) * 13 + (13 + 19 + 1) * 13)
    removed = 2 * (13 * 19 + 19 * 13)  # the replaced weights (their biases count, as buffers now)
    assert total == n_before - removed + 4 * 38 + frozen_factors, (total, n_before)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    line = out.getvalue().strip()
    assert line == f"trainable params: {t:,d} || all params: {total:,d} || trainable%: {100 * t / total:.4f}", line
    # A regex is matched in full against the qualified name.
    net2 = Net()
    m2 = get_svft_model(net2, SVFTConfig(target_modules=r"blocks\.1\.(up|down)"))
    assert sorted(n for n, _ in m2.svft_modules()) == ["blocks.1.down", "blocks.1.up"]
    try:
        get_svft_model(Net(), SVFTConfig(target_modules=r"up"))  # fullmatch: "up" names no module
    except ValueError as e:
        assert "not found" in str(e)
    else:
        raise AssertionError("a regex matching no module was accepted")
    # The lazy top-level names.
    assert svft.get_svft_model is get_svft_model and svft.SVFTConfig is SVFTConfig


def test_forward_backward_match_f64_reference():
    net = Net(seed=1)
    model = get_svft_model(net, SVFTConfig(target_modules=["inp", "up", "down"], pattern="random:2", seed=4))
    _perturb(model, seed=1)
    x = torch.randn(3, 6, 7)
    y = model(x)
    assert _rel(y, _reference64(model, x)) < TOL, _rel(y, _reference64(model, x))
    # Gradients of M and gamma through the whole model, against autograd in f64.
    y.square().sum().backward()
    ref = _official_model64(model)
    ref(x.double()).square().sum().backward()
    for name, m in model.svft_modules():
        r = ref.get_submodule(name)
        assert _rel(m.m.grad, r.m.grad) < 1e-4, (name, _rel(m.m.grad, r.m.grad))
        assert _rel(m.gamma.grad, r.gamma.grad) < 1e-3, (name, "dgamma")


def test_random_patterns_differ_per_module_and_are_reproducible():
    cfg = dict(target_modules=["up", "down"], pattern="random:2", init="official", seed=7)
    a = get_svft_model(Net(seed=2), SVFTConfig(**cfg))
    b = get_svft_model(Net(seed=2), SVFTConfig(**cfg))
    mods = dict(a.svft_modules())
    assert not torch.equal(mods["blocks.0.up"].s_row, mods["blocks.1.up"].s_row), "patterns differ per module"
    for (name, ma), (_, mb) in zip(a.svft_modules(), b.svft_modules()):
        assert torch.equal(ma.s_row, mb.s_row) and torch.equal(ma.m, mb.m), name  # same config, same adapter
        spec = files.module_pattern("random:2", 7, name)
        assert ma.pattern == spec and ma.seed == files.module_seed(7, name)
        u, s, v = ma._layer.factors()
        with svft.Layer.from_factors(u, s, v, pattern=spec, init="official", gate=True, seed=ma.seed) as ref:
            rows, cols = ref.indices()
            assert np.array_equal(rows, ma.s_row.numpy()) and np.array_equal(cols, ma.s_col.numpy())
            assert ref.coefficients.tobytes() == ma.m.detach().numpy().tobytes()
    # An explicit random seed is the base: other seed, other patterns.
    c = get_svft_model(Net(seed=2), SVFTConfig(**{**cfg, "pattern": "random:2:seed=8"}))
    assert not torch.equal(dict(c.svft_modules())["blocks.0.up"].s_row, mods["blocks.0.up"].s_row)


def test_disable_adapter_and_merge_and_unload():
    net = Net(seed=3)
    model = get_svft_model(net, SVFTConfig(target_modules=["up", "down", "head"], pattern="banded:2"))
    _perturb(model, seed=3)
    x = torch.randn(4, 7)
    with torch.no_grad():
        y = model(x)
        with model.disable_adapter():
            y_base = model(x)
        assert _rel(y_base, _reference64(model, x, adapter=False)) < TOL
        assert _rel(y, y_base) > 1e-3, "the adapter changes the output"
        assert torch.equal(model(x), y), "disable_adapter restores the adapter"
    weights = {n: _dense64(m) for n, m in model.svft_modules()}
    biases = {n: None if m.bias is None else m.bias.clone() for n, m in model.svft_modules()}
    merged = model.merge_and_unload()
    assert merged is net and not any(isinstance(m, SVFTLinear) for m in net.modules())
    for name, w in weights.items():
        lin = net.get_submodule(name)
        assert type(lin) is nn.Linear and lin.weight.dtype == torch.float32
        assert _rel(lin.weight, w) < TOL, name
        assert (lin.bias is None) == (biases[name] is None)
        if lin.bias is not None:
            assert torch.equal(lin.bias.detach(), biases[name])
    with torch.no_grad():
        assert _rel(net(x), y) < TOL
    # The original dtype comes back: a bf16 linear merges into a bf16 linear.
    torch.manual_seed(0)
    half = nn.Sequential(nn.Linear(9, 6).to(torch.bfloat16))
    hm = get_svft_model(half, SVFTConfig(target_modules=["0"], pattern="plain"))
    _perturb(hm, seed=4)
    w = _dense64(dict(hm.svft_modules())["0"])
    out = hm.merge_and_unload()[0]
    assert out.weight.dtype == torch.bfloat16 and out.bias.dtype == torch.bfloat16
    assert _rel(out.weight, w) < 1e-2


def test_state_dict_round_trip_rebuilds_the_layers():
    a = get_svft_model(Net(seed=5), SVFTConfig(target_modules=["up", "down"], pattern="random:2", seed=1))
    _perturb(a, seed=5)
    sd = a.state_dict()
    key = "base_model.blocks.0.up."
    for k, shape, dtype in (("svft_u", (19, 13), torch.float32), ("svft_s", (13,), torch.float32),
                            ("svft_v", (13, 13), torch.float32), ("s_row", None, torch.int64),
                            ("s_col", None, torch.int64), ("m", None, torch.float32), ("gamma", (), torch.float32)):
        assert key + k in sd and sd[key + k].dtype == dtype, k
        if shape is not None:
            assert tuple(sd[key + k].shape) == shape, k
    assert dict(a.base_model.named_buffers())["blocks.0.up.s_row"] is not None  # a buffer
    # Another model (other weights) with another pattern and gate: load_state_dict makes it A.
    b = get_svft_model(Net(seed=6), SVFTConfig(target_modules=["up", "down"], pattern="banded:1", gate=False))
    result = b.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(5, 7)
    with torch.no_grad():
        assert torch.equal(b(x), a(x))
    for (n, ma), (_, mb) in zip(a.svft_modules(), b.svft_modules()):
        assert torch.equal(ma.s_row, mb.s_row) and torch.equal(ma.m, mb.m) and mb.gamma is not None, n
        assert mb.m.requires_grad
        for fa, fb in zip(ma.factors(), mb.factors()):
            assert torch.equal(fa, fb), n
    # It trains after loading: gradients reach m and gamma.
    b(x).sum().backward()
    assert all(m.m.grad is not None and m.gamma.grad is not None for _, m in b.svft_modules())
    # A state dict without the factors is incomplete.
    partial = {k: v for k, v in sd.items() if not k.endswith("svft_u")}
    try:
        b.load_state_dict(partial)
    except RuntimeError as e:
        assert "svft_u" in str(e)
    else:
        raise AssertionError("a state dict without U loaded strictly")


def test_torch_save_and_deepcopy_of_a_wrapped_model():
    a = get_svft_model(Net(seed=7), SVFTConfig(target_modules=["inp", "up", "down"], pattern="random:1", seed=2))
    _perturb(a, seed=7)
    x = torch.randn(2, 3, 7)
    with torch.no_grad():
        y = a(x)
    with _tempdir() as d:
        torch.save(a, d / "model.pt")
        b = torch.load(d / "model.pt", weights_only=False)
    c = copy.deepcopy(a)
    for other in (b, c):
        assert isinstance(other, SVFTModel)
        with torch.no_grad():
            assert torch.equal(other(x), y)
        handles = {m._layer.handle for _, m in other.svft_modules()}
        assert not handles & {m._layer.handle for _, m in a.svft_modules()}, "own library layers"
        other(x).sum().backward()
        assert all(m.m.grad is not None for _, m in other.svft_modules())
    del c  # freeing the copy leaves the original working
    with torch.no_grad():
        assert torch.equal(a(x), y)


def test_save_and_load_adapter_without_the_cli():
    """A PyTorch-only user: SVD here, save_adapter, load_adapter into a fresh copy of the model
    (same weights, so the same factors and base checksums); another model's weights are refused."""
    cfg = SVFTConfig(target_modules=r"blocks\.\d\.(up|down)", pattern="random:2", seed=9, modules_to_save=["head"])
    a = get_svft_model(Net(seed=8), cfg)
    assert cfg.file_names == {}, "get_svft_model leaves the caller's config alone"
    _perturb(a, seed=8)
    with torch.no_grad():
        a.base_model.head.weight.mul_(-2)  # a trained modules_to_save module
    x = torch.randn(3, 7)
    with _tempdir() as d:
        a.save_adapter(d / "a.safetensors")
        b = load_adapter(Net(seed=8), d / "a.safetensors")
        assert isinstance(b, SVFTModel) and sorted(n for n, _ in b.svft_modules()) == sorted(
            n for n, _ in a.svft_modules())
        with torch.no_grad():
            assert torch.equal(b(x), a(x))
        assert b.base_model.head.weight.requires_grad and not b.base_model.inp.weight.requires_grad
        assert all(m.m.requires_grad for _, m in b.svft_modules())
        other = Net(seed=99)
        try:
            load_adapter(other, d / "a.safetensors")
        except ValueError as e:
            assert "wrong base" in str(e) and "`blocks.0." in str(e), e
        else:
            raise AssertionError("an adapter loaded onto another model")
        assert not any(isinstance(m, SVFTLinear) for m in other.modules()), "a refused load changes nothing"


def _official_sd(d_out, d_in, pattern, seed):
    """An official-layer state dict with a torch.randint random pattern (duplicates likely)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = s.numel()
    if pattern == "random":
        k = r * 5 - 6  # d = 2
        rows, cols = torch.randint(0, r, (k,), generator=g), torch.randint(0, r, (k,), generator=g)
    else:
        idx = [(i, j) for i in range(r) for j in range(max(0, i - 1), min(r, i + 2))]
        rows, cols = (torch.tensor(t) for t in zip(*idx))
    return {
        "bias": torch.randn(d_out, generator=g), "svft_layer.u": u, "svft_layer.s_pre": s,
        "svft_layer.s": 0.3 * torch.randn(rows.numel(), generator=g), "svft_layer.gate": torch.tensor([0.7]),
        "svft_layer.v": vh, "svft_layer.s_pre_row": torch.arange(r), "svft_layer.s_pre_col": torch.arange(r),
        "svft_layer.s_row": rows, "svft_layer.s_col": cols,
    }


def _official64(sd):
    sd = {k.removeprefix("svft_layer."): v for k, v in sd.items()}
    return OfficialSVFT(sd["u"].double(), sd["s_pre"].double(), sd["v"].T.double(), sd["s_row"], sd["s_col"],
                        sd["s"].double(), sd["gate"].double().reshape(()), sd["bias"].double())


def test_official_state_dict_import_export():
    for d_out, d_in, pattern, seed in ((17, 11, "random", 0), (12, 15, "banded", 1)):
        sd = _official_sd(d_out, d_in, pattern, seed)
        ref = _official64(sd)
        ours = SVFTLinear.from_official_state_dict(sd)
        # The index set is taken as given: as many coefficients as the official layer's, its
        # pairs in its order (a band on the band kernels, a random set labelled random).
        assert ours._layer.nnz == ours.m.numel() == sd["svft_layer.s"].numel()
        rows, cols = ours._layer.indices()
        assert (rows == sd["svft_layer.s_row"].numpy()).all() and (cols == sd["svft_layer.s_col"].numpy()).all()
        assert ours.pattern == ("banded:1" if pattern == "banded" else ours.pattern), ours.pattern
        assert pattern == "banded" or ours.pattern.startswith("random:")
        x = torch.randn(4, 3, d_in)
        x64 = x.double().requires_grad_()
        y, y64 = ours(x), ref(x64)
        assert _rel(y, y64) < TOL, (pattern, _rel(y, y64))
        gy = torch.randn_like(y)
        y.backward(gy)
        y64.backward(gy.double())
        assert _rel(ours.m.grad, ref.m.grad) < 1e-4, (pattern, "dm", _rel(ours.m.grad, ref.m.grad))
        assert _rel(ours.gamma.grad, ref.gamma.grad) < 1e-3, (pattern, "dgamma")
        # Export: the same tensors back (indices and coefficients bitwise, factors in f32).
        out = ours.to_official_state_dict()
        assert set(out) == set(sd)
        for k in ("svft_layer.s_row", "svft_layer.s_col", "svft_layer.s", "svft_layer.gate", "bias",
                  "svft_layer.s_pre_row", "svft_layer.s_pre_col"):
            assert torch.equal(out[k], sd[k].to(out[k].dtype)), k
        for k in ("svft_layer.u", "svft_layer.s_pre", "svft_layer.v"):
            assert out[k].shape == sd[k].shape and _rel(out[k], sd[k]) < 1e-6, k
        # And back in: the same module, bit for bit.
        again = SVFTLinear.from_official_state_dict(out)
        with torch.no_grad():
            assert torch.equal(again(x), ours(x))
    # Without the gate: exported as gate 0 with s = 2 M, the same weight.
    torch.manual_seed(3)
    lin = nn.Linear(10, 8)
    plain = SVFTLinear.from_linear(lin, pattern="banded:1", init="official", gate=False)
    out = plain.to_official_state_dict()
    assert float(out["svft_layer.gate"]) == 0.0
    x = torch.randn(6, 10)
    with torch.no_grad():
        assert _rel(plain(x), _official64(out)(x.double())) < TOL


def _tiny_bert(seed):
    import transformers  # python/requirements-test.txt; a missing one fails the test
    config = transformers.BertConfig(vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                     intermediate_size=37, max_position_embeddings=32, type_vocab_size=2)
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval(), config


def test_bert_decompose_train_save_merge_with_the_cli():
    model, config = _tiny_bert(0)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with _tempdir() as d:
        model.save_pretrained(d / "ckpt")  # the user's checkpoint (safetensors)
        fresh = copy.deepcopy(model)
        cli("decompose", d / "ckpt", "-o", d / "f.safetensors", "--backend", "cpu")
        ff = files.FactorFile(d / "f.safetensors")
        cfg = SVFTConfig(pattern="random:2", seed=3, factors=str(d / "f.safetensors"), modules_to_save=["pooler"])
        wrapped = get_svft_model(model, cfg)  # target_modules: the factor file's modules
        names = sorted(n for n, _ in wrapped.svft_modules())
        assert names == sorted(ff.modules) and len(names) == 12, names  # q, k, v, o, up, down x 2
        assert any(re.search(r"intermediate\.dense$", n) for n in names)
        with torch.no_grad():
            y0 = wrapped(ids).last_hidden_state
        opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            wrapped(ids).last_hidden_state.square().mean().backward()
            opt.step()
        with torch.no_grad():
            y1 = wrapped(ids).last_hidden_state
        assert _rel(y1, y0) > 1e-4, "training moved the adapter"
        wrapped.save_adapter(d / "a.safetensors")
        info = files.read_adapter(d / "a.safetensors")
        for n, m in wrapped.svft_modules():
            assert info[n]["base_checksum"] == ff.modules[n]["checksum"]
            assert info[n]["coefficients"].tobytes() == m.m.detach().numpy().tobytes()
        # A fresh model from the same checkpoint loads the adapter (and the saved pooler) and
        # computes the same outputs.
        loaded = load_adapter(fresh, d / "a.safetensors", factors=d / "f.safetensors")
        with torch.no_grad():
            assert torch.equal(loaded(ids).last_hidden_state, y1)
            assert torch.equal(loaded.base_model.pooler.dense.weight, model.pooler.dense.weight)
        # The CLI merges it to the weights merge_and_unload() gives.
        cli("merge", "--factors", d / "f.safetensors", "--adapter", d / "a.safetensors", "-o", d / "m.safetensors",
            "--model", d / "ckpt")
        merged, _ = files.read_safetensors(d / "m.safetensors")
        plain = wrapped.merge_and_unload()
        for n in names:
            dt, w = merged[f"{n}.weight"]
            lin = plain.get_submodule(n)
            assert type(lin) is nn.Linear
            assert _rel(torch.from_numpy(w), lin.weight.detach()) < TOL, n
        with torch.no_grad():
            assert _rel(plain(ids).last_hidden_state, y1) < 1e-4


def test_bert_init_adapter_loads_bitwise_and_matches_get_svft_model():
    model, config = _tiny_bert(1)
    with _tempdir() as d:
        model.save_pretrained(d / "ckpt")
        cli("decompose", d / "ckpt", "-o", d / "f.safetensors", "--backend", "cpu")
        cli("init-adapter", "--factors", d / "f.safetensors", "-o", d / "a.safetensors", "--pattern", "random:3",
            "--init", "official", "--seed", "11", "--modules", "attention")
        entries = files.read_adapter(d / "a.safetensors")
        assert len(entries) == 8  # q, k, v, attention.output.dense x 2
        loaded = load_adapter(copy.deepcopy(model), d / "a.safetensors", factors=d / "f.safetensors")
        built = get_svft_model(copy.deepcopy(model), SVFTConfig(target_modules=r".*attention.*", pattern="random:3",
                                                                 init="official", seed=11,
                                                                 factors=str(d / "f.safetensors")))
        lm, bm = dict(loaded.svft_modules()), dict(built.svft_modules())
        assert sorted(lm) == sorted(bm) == sorted(entries)
        for name, e in entries.items():
            m = lm[name]
            assert m.m.detach().numpy().tobytes() == e["coefficients"].tobytes(), name
            assert np.array_equal(m.s_row.numpy(), e["rows"]) and np.array_equal(m.s_col.numpy(), e["cols"])
            assert float(m.gamma.detach()) == e["gamma"]
            # The same config here gives the same adapter as the CLI: patterns and init bitwise.
            assert torch.equal(bm[name].m, m.m) and torch.equal(bm[name].s_row, m.s_row), name
        ids = torch.randint(0, config.vocab_size, (1, 7))
        with torch.no_grad():
            assert torch.equal(loaded(ids).last_hidden_state, built(ids).last_hidden_state)
        # An adapter made on other factors is refused, naming the module.
        other, _ = _tiny_bert(2)
        other.save_pretrained(d / "other")
        cli("decompose", d / "other", "-o", d / "g.safetensors", "--backend", "cpu")
        try:
            load_adapter(copy.deepcopy(other), d / "a.safetensors", factors=d / "g.safetensors")
        except ValueError as e:
            assert "wrong base" in str(e) or "do not reproduce" in str(e), e
        else:
            raise AssertionError("an adapter loaded onto another model's factors")
