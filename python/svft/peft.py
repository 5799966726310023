"""PEFT-style SVFT for any `torch.nn.Module`: replace LoRA with SVFT in a few lines.

    from svft.peft import SVFTConfig, get_svft_model, load_adapter
    config = SVFTConfig(target_modules=["query", "value"], pattern="banded:2")
    model = get_svft_model(model, config)      # nn.Linear -> SVFTLinear in place; the rest frozen
    model.print_trainable_parameters()
    ...train...
    model.save_adapter("adapter.safetensors")  # the CLI's adapter format
    plain = model.merge_and_unload()           # nn.Linear layers again, W = U C V^T

The names follow PEFT's (`peft.LoraConfig`, `get_peft_model`, `PeftModel`): `target_modules`
is a regex matched with `re.fullmatch` against each module's qualified name, or a list of names
each matching a module whose qualified name equals it or ends with `.` + it (PEFT's rule);
only `nn.Linear` modules are replaced. `modules_to_save` (the same list rule) stay trainable.

**Files.** `save_adapter` / `load_adapter` write and read the CLI's safetensors adapter format
(`svft.files`), so an adapter trained here merges with `svft merge`, and one made by
`svft init-adapter` loads here. A module's name in a file is its qualified name in the model
(= a checkpoint's weight name without `.weight` for a checkpoint saved from the model: what
`svft decompose` names it). `load_adapter` maps a file's names onto the model's exactly, or else
by a unique dotted suffix either way (`bert.encoder.x` <-> `encoder.x`). With
`SVFTConfig(factors=F)`, a factor file of `svft decompose`, the modules are built on its factors
(no SVD here), and the adapters record its checksums: the workflow for a Hugging Face checkpoint
is `svft decompose model.safetensors -o F`, training here, `save_adapter`, `svft merge`.

**Seeds.** Module `name` gets M's official init seeded with `module_seed(seed, name)` and a
random pattern `random:D[:seed=S]` drawn with `module_seed(S, name)` (S defaults to `seed`), where
`module_seed(seed, name) = splitmix64(seed ^ fnv1a64(name utf-8))` (u64; `svft.files`), as
`svft init-adapter` does: the same config gives the same adapter either way, and every module
its own random pattern.
"""

import contextlib
import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Union

import numpy as np
import torch
from torch import nn

from . import files
from .nn import SVFTLinear

__all__ = ["SVFTConfig", "SVFTModel", "get_svft_model", "inject", "load_adapter"]

_DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass
class SVFTConfig:
    """What `get_svft_model` adapts and how.

    target_modules: regex (re.fullmatch on qualified names) or list of names (exact or dotted
        suffix); None: the factor file's modules with `factors`, else the weights `svft
        decompose` targets by default (attention and MLP projections; `svft.files.DEFAULT_TARGETS`).
    pattern: "plain", "banded:D", "random:D[:seed=S]", "topk:D[:official]" (random: per module,
        see the module docs). init: "official" (Kaiming-normal M, g = 1/2) or "zero" (the model
        is unchanged at step 0). gate: g = sigmoid(gamma) trainable. rank: truncate the SVD.
    seed: base of every module's seeds. plan: "auto", "factored", "merged", "small-n".
    modules_to_save: modules kept trainable (and saved into the adapter file).
    factors: path of an `svft decompose` factor file to build the modules on.
    """

    target_modules: Optional[Union[str, List[str]]] = None
    pattern: str = "banded:2"
    init: str = "official"
    gate: bool = True
    rank: Optional[int] = None
    seed: int = 0
    plan: str = "auto"
    modules_to_save: Optional[List[str]] = None
    factors: Optional[str] = None
    #: not a user setting: filled by get_svft_model (torch name -> file name)
    file_names: dict = field(default_factory=dict, repr=False)


def _matches_list(name, names):
    return any(name == t or name.endswith("." + t) for t in names)


def _is_target(name, module, config, factor_names):
    if not isinstance(module, nn.Linear) or isinstance(module, SVFTLinear):
        return False
    t = config.target_modules
    if t is None:
        if factor_names is not None:
            return _file_name(name, factor_names) is not None
        return re.search(files.DEFAULT_TARGETS, f"{name}.weight") is not None
    if isinstance(t, str):
        return re.fullmatch(t, name) is not None
    return _matches_list(name, t)


def _file_name(name, file_names):
    """The file's module name for the model's `name`: the same, else the unique one that is a
    dotted suffix of it or has it as a dotted suffix; None when there is none."""
    if name in file_names:
        return name
    hits = [f for f in file_names if f.endswith("." + name) or name.endswith("." + f)]
    if len(hits) > 1:
        raise ValueError(f"module `{name}` matches several modules of the file: {hits}")
    return hits[0] if hits else None


def _set_module(model, name, new):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_factors_fit(name, linear, u, s, v, path, tol=1e-3):
    """Shape check, and for untruncated factors, U diag(s) V^T x = W x on 4 random probes x
    (relative error below `tol`; O(d^2), not a dense rebuild)."""
    w = linear.weight.detach().float().cpu()
    if tuple(w.shape) != (u.shape[0], v.shape[0]):
        raise ValueError(f"{path}: module `{name}` is {tuple(w.shape)} in the model but {u.shape[0]}x{v.shape[0]} "
                         "in the factor file")
    if s.size == min(w.shape):
        x = torch.randn(w.shape[1], 4, generator=torch.Generator().manual_seed(0))
        rec = torch.from_numpy(u) @ (torch.from_numpy(s)[:, None] * (torch.from_numpy(v).T @ x))
        want = w @ x
        err = ((rec - want).norm() / want.norm().clamp_min(1e-30)).item()
        if err > tol:
            raise ValueError(f"{path}: the factors of `{name}` do not reproduce the model's weight (relative "
                             f"error {err:.2e}): another model, or another checkpoint of it?")


def _fit_tol(factor_file):
    return 1e-3 if factor_file.metadata.get("storage_dtype", "f32") == "f32" else 3e-2


def _freeze(model, config):
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, SVFTLinear):
            module.m.requires_grad_(True)
            if module.gamma is not None:
                module.gamma.requires_grad_(True)
        elif config.modules_to_save and name and _matches_list(name, config.modules_to_save):
            for p in module.parameters():
                p.requires_grad_(True)


def get_svft_model(model, config):
    """Replaces the `nn.Linear` modules of `model` that `config.target_modules` selects by
    `SVFTLinear` in place, freezes every other parameter (except `modules_to_save`'s), and
    returns an `SVFTModel` wrapping it."""
    config = dataclasses.replace(config, file_names={})  # the caller's config stays as it was
    factor_file = files.FactorFile(config.factors) if config.factors else None
    factor_names = None if factor_file is None else list(factor_file.modules)
    targets = [(n, m) for n, m in model.named_modules() if n and _is_target(n, m, config, factor_names)]
    if not targets:
        raise ValueError(f"target modules {config.target_modules!r} not found among the model's nn.Linear modules")
    for name, linear in targets:
        fname = name if factor_file is None else _file_name(name, factor_names)
        if fname is None:
            raise ValueError(f"{config.factors}: no factors for module `{name}`")
        spec = files.module_pattern(config.pattern, config.seed, fname)
        seed = files.module_seed(config.seed, fname)
        w = linear.weight
        if factor_file is None:
            module = SVFTLinear.from_linear(linear, pattern=spec, init=config.init, gate=config.gate, rank=config.rank,
                                            seed=seed, plan=config.plan)
        else:
            info = factor_file.modules[fname]
            if config.rank is not None and config.rank != info["rank"]:
                raise ValueError(f"{config.factors}: `{fname}` has rank {info['rank']}, the config asks {config.rank}")
            u, s, v = factor_file.load(fname)
            _check_factors_fit(name, linear, u, s, v, config.factors, _fit_tol(factor_file))
            module = SVFTLinear.from_factors(u, s, v, bias=linear.bias, pattern=spec, init=config.init,
                                             gate=config.gate, seed=seed, plan=config.plan, device=w.device,
                                             dtype=w.dtype)
            module._base_checksum = info["checksum"]
            module._weight_name = info["weight"]
        config.file_names[name] = fname
        _set_module(model, name, module)
    _freeze(model, config)
    return SVFTModel(model, config)


inject = get_svft_model


class SVFTModel(nn.Module):
    """A model with SVFT modules (PEFT's `PeftModel`): `forward` and unknown attributes go to
    `base_model`, the model that was adapted in place."""

    def __init__(self, model, config):
        super().__init__()
        self.base_model = model
        self.svft_config = config

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def svft_modules(self):
        """(qualified name in the model, SVFTLinear) of every SVFT module."""
        return [(n, m) for n, m in self.base_model.named_modules() if isinstance(m, SVFTLinear)]

    def get_nb_trainable_parameters(self):
        """(trainable, all): parameter counts. `all` counts every parameter of the model plus,
        as frozen parameters, each SVFT module's U, s, V (what it holds in place of the weight:
        (d_out + d_in + 1) r values) and its bias (a buffer)."""
        trainable = sum(p.numel() for p in self.base_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.base_model.parameters())
        for _, m in self.svft_modules():
            layer = m._layer
            total += (layer.d_out + layer.d_in + 1) * layer.rank + (0 if m.bias is None else m.bias.numel())
        return trainable, total

    def print_trainable_parameters(self):
        """Prints PEFT's line: `trainable params: X || all params: Y || trainable%: Z`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block every SVFT module computes its frozen base `U diag(s) V^T x + bias`."""
        modules = [m for _, m in self.svft_modules()]
        before = [m.adapter_enabled for m in modules]
        try:
            for m in modules:
                m.adapter_enabled = False
            yield
        finally:
            for m, state in zip(modules, before):
                m.adapter_enabled = state

    @torch.no_grad()
    def merge_and_unload(self):
        """Replaces every SVFT module by an `nn.Linear` with weight U C V^T (in the original
        weight's dtype) and the frozen bias; returns the base model."""
        for name, m in self.svft_modules():
            _set_module(self.base_model, name, m.merge())
        return self.base_model

    def _file_name(self, name):
        return self.svft_config.file_names.get(name, name)

    def save_adapter(self, path):
        """Writes every SVFT module (and the `modules_to_save`' parameters, which `svft merge`
        ignores) to `path` in the CLI's adapter format."""
        entries = {}
        for name, m in self.svft_modules():
            fname = self._file_name(name)
            entries[fname] = adapter_entry(m, fname)
        extra = {}
        if self.svft_config.modules_to_save:
            for name, module in self.base_model.named_modules():
                if name and _matches_list(name, self.svft_config.modules_to_save):
                    for pname, p in module.named_parameters():
                        extra[f"{name}.{pname}"] = p.detach().float().cpu().numpy()
        write_adapter_with_extra(path, entries, extra)

    def load_adapter(self, path, factors=None):
        """`load_adapter(self, path, factors)`; returns self."""
        return load_adapter(self, path, factors)


def _dtype_name(module):
    try:
        return _DTYPE_NAMES[module._dtype]
    except KeyError:
        raise ValueError(f"the adapter format records f32, bf16 or f16 base weights, not {module._dtype}") from None


def base_checksum(module):
    """The FNV-1a checksum of an SVFT module's factors (cached; a few MB/s in pure Python)."""
    if module._base_checksum is None:
        module._base_checksum = files.factors_checksum(*module._layer.factors())
    return module._base_checksum


def adapter_entry(module, name):
    """One module's adapter-file entry (see svft.files.write_adapter)."""
    pattern = module.pattern or "plain"  # names the index set (build_layer relabels a set no band is)
    gamma = 0.0 if module.gamma is None else float(module.gamma.detach().cpu())
    return {
        "weight": getattr(module, "_weight_name", None) or f"{name}.weight", "pattern": pattern,
        "rank": module._layer.rank, "init": module.init or "zero", "gate": module.gamma is not None,
        "seed": int(module.seed or 0), "d_out": module.out_features, "d_in": module.in_features,
        "dtype": _dtype_name(module), "base_checksum": base_checksum(module),
        "coefficients": module.m.detach().float().cpu().numpy(), "gamma": gamma,
        "rows": module.s_row.cpu().numpy(), "cols": module.s_col.cpu().numpy(),
    }


def write_adapter_with_extra(path, entries, extra):
    """`files.write_adapter`, plus full tensors `extra` ({name: f32 array}) listed in the
    metadata as `modules_to_save` (readers of the format ignore them)."""
    if not extra:
        files.write_adapter(path, entries)
        return
    files.write_adapter(path, entries)
    tensors, meta = files.read_safetensors(path)
    clash = [k for k in extra if k in tensors]
    if clash:
        raise ValueError(f"modules_to_save tensors clash with the adapter's: {clash}")
    tensors.update({k: np.ascontiguousarray(v, np.float32) for k, v in extra.items()})
    meta["modules_to_save"] = ",".join(sorted(extra))
    files.write_safetensors(path, tensors, files.seal_file(meta))


def _check_entry(module, entry, path, fname, check_base=True):
    """Checks that an adapter module fits an SVFTLinear: shape, rank and base checksum."""
    layer = module._layer
    if (layer.d_out, layer.d_in, layer.rank) != (entry["d_out"], entry["d_in"], entry["rank"]):
        raise ValueError(f"{path}: wrong base: `{fname}` was made for a {entry['d_out']}x{entry['d_in']} weight of "
                         f"rank {entry['rank']}, the model's is {layer.d_out}x{layer.d_in} of rank {layer.rank}")
    if check_base and base_checksum(module) != entry["base_checksum"]:
        raise ValueError(
            f"{path}: wrong base: `{fname}` was made on factors with checksum {entry['base_checksum']}, the model's "
            f"module has {base_checksum(module)} (pass the factor file it was made on: load_adapter(..., factors=F))")


def _apply_entry(module, entry):
    """Loads one adapter module's pattern, coefficients and gate into an SVFTLinear."""
    rows, cols = torch.from_numpy(entry["rows"]), torch.from_numpy(entry["cols"])
    same = (module.s_row.numel() == rows.numel() and torch.equal(module.s_row.cpu(), rows)
            and torch.equal(module.s_col.cpu(), cols) and (module.gamma is not None) == bool(entry["gate"]))
    module.pattern, module.init, module.seed = entry["pattern"], entry["init"], int(entry["seed"])
    if not same:
        checksum = module._base_checksum
        module._rebuild(*module._layer.factors(), rows, cols, module.bias, gate=bool(entry["gate"]))
        module._base_checksum = checksum
    with torch.no_grad():
        module.m.copy_(torch.from_numpy(entry["coefficients"]))
        if module.gamma is not None:
            module.gamma.fill_(entry["gamma"])


def load_adapter(model, path, factors=None, check_base=True):
    """Loads an adapter file (ours or `svft init-adapter`'s) into `model`: an `SVFTModel`, or a
    plain model whose `nn.Linear` modules named by the file are then replaced by SVFT modules
    built on `factors` (a factor file; else a thin SVD of their weights here, which matches the
    adapter's base checksum only where the factors come out bit-identical, e.g. an adapter saved
    from this model's own SVD). Every module is checked (shape, rank, base checksum unless
    `check_base` is False) before the model is changed. Returns the `SVFTModel`."""
    entries = files.read_adapter(path)
    wrapper = model if isinstance(model, SVFTModel) else None
    base = model.base_model if wrapper is not None else model
    config = wrapper.svft_config if wrapper is not None else SVFTConfig(target_modules=[], init="zero")
    factor_file = files.FactorFile(factors) if factors else None
    linear_names = [n for n, m in base.named_modules() if isinstance(m, (nn.Linear, SVFTLinear))]
    plan = []
    for fname, entry in entries.items():
        name = _file_name(fname, linear_names)
        if name is None:
            raise ValueError(f"{path}: the model has no linear module `{fname}`")
        module = base.get_submodule(name)
        if not isinstance(module, SVFTLinear):
            common = dict(pattern=entry["pattern"], init=entry["init"], gate=bool(entry["gate"]),
                          seed=int(entry["seed"]), plan=config.plan)
            if factor_file is not None:
                if fname not in factor_file.modules:
                    raise ValueError(f"{factors}: no factors for module `{fname}`")
                u, s, v = factor_file.load(fname)
                _check_factors_fit(name, module, u, s, v, factors, _fit_tol(factor_file))
                new = SVFTLinear.from_factors(u, s, v, bias=module.bias, device=module.weight.device,
                                              dtype=module.weight.dtype, **common)
                new._base_checksum = factor_file.modules[fname]["checksum"]
            else:
                rank = entry["rank"] if entry["rank"] < min(module.in_features, module.out_features) else None
                new = SVFTLinear.from_linear(module, rank=rank, **common)
            new._weight_name = entry["weight"]
            module = new
        _check_entry(module, entry, path, fname, check_base)
        plan.append((name, fname, module, entry))
    for name, fname, module, entry in plan:  # every module checked: now change the model
        if base.get_submodule(name) is not module:
            _set_module(base, name, module)
        _apply_entry(module, entry)
        config.file_names[name] = fname
    tensors, meta = files.read_safetensors(path)
    saved = [k for k in meta.get("modules_to_save", "").split(",") if k]
    if saved:
        state = {k: torch.from_numpy(tensors[k][1]) for k in saved}
        params = dict(base.named_parameters())
        with torch.no_grad():
            for k, t in state.items():
                if k not in params:
                    warnings.warn(f"{path}: the model has no parameter `{k}` (modules_to_save)")
                    continue
                params[k].copy_(t.to(params[k].dtype))
        config.modules_to_save = sorted({k.rpartition(".")[0] for k in saved} | set(config.modules_to_save or []))
    if wrapper is None:
        config.target_modules = sorted(config.file_names)
        _freeze(base, config)
        wrapper = SVFTModel(base, config)
    return wrapper
