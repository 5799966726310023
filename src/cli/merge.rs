//! `svft merge`: dense adapted weights `U C V^T` in the model's dtype.

use std::collections::HashMap;

use serde_json::json;

use svft::adapter::{check_decomposes, Adapter, FactorFile};
use svft::alloc::{checked_len, try_zeroed};
use svft::checkpoint::{
    check_not_an_input, dtype_name, f32_to_bytes, round_through, write_safetensors, Checkpoint, OwnedTensor,
};
use svft::cpu::gemm::{gemm, Operand as Op};
use svft::{Error, Result};

use super::{progress_bar, MergeArgs};

pub fn run(a: MergeArgs) -> Result<()> {
    let factors = FactorFile::open(&a.factors)?;
    let adapter = Adapter::load(&a.adapter)?;
    adapter.check_base(&factors)?;
    let model = a.model.as_ref().map(Checkpoint::open).transpose()?;
    let mut inputs = vec![("factor file", a.factors.clone()), ("adapter", a.adapter.clone())];
    if let Some(ck) = &model {
        inputs.extend(ck.files().into_iter().map(|f| ("model file", f)));
    }
    check_not_an_input(&a.output, &inputs)?;
    let pb = progress_bar(adapter.modules.len() as u64, "merge");
    let mut tensors: Vec<OwnedTensor> = Vec::new();
    let mut rows = Vec::new();
    for m in &adapter.modules {
        pb.set_message(m.module.clone());
        let f = factors.load(&m.module)?;
        let info = factors.get(&m.module).expect("check_base found it");
        let numel = checked_len(&format!("merged `{}`", m.weight), &[m.d_out, m.d_in])?;
        // W0: the original weight when the model is given, else U diag(s) V^T. The merged
        // weight keeps the model's dtype (the adapter's, which check_base matched to the
        // factor file's, when there is no model).
        let mut dtype = m.dtype;
        let w0 = match &model {
            Some(ck) => {
                let e = ck.get(&m.weight).ok_or_else(|| Error::File {
                    path: ck.path().display().to_string(),
                    reason: format!("wrong model: no weight `{}`, which the adapter adapts", m.weight),
                })?;
                if e.shape != [m.d_out, m.d_in] {
                    return Err(Error::File {
                        path: ck.path().display().to_string(),
                        reason: format!(
                            "wrong model: `{}` is {:?}, the adapter expects [{}, {}]",
                            m.weight, e.shape, m.d_out, m.d_in
                        ),
                    });
                }
                dtype = e.dtype;
                let w0 = ck.read_f32(&m.weight)?;
                check_decomposes(info, &f, &w0, e.dtype, ck.path())?;
                w0
            }
            None => {
                let us: Vec<f32> =
                    f.u.chunks_exact(f.r).flat_map(|row| row.iter().zip(&f.s).map(|(u, s)| u * s)).collect();
                let mut w0 = try_zeroed::<f32>(&format!("`{}`", m.weight), numel)?;
                gemm(&mut w0, Op::n(&us, f.d_out, f.r), Op::t(&f.v, f.d_in, f.r), false);
                w0
            }
        };
        let mut layer = m.to_layer(f)?;
        let mut w = try_zeroed::<f32>(&format!("merged `{}`", m.weight), numel)?;
        layer.merge_into(&mut w)?;
        // A merged weight the output dtype cannot hold is refused, not written as inf.
        // Rounded a block at a time (no second copy of the whole weight).
        let overflow = w.chunks(4096).enumerate().find_map(|(i, block)| {
            let mut block = block.to_vec();
            round_through(dtype, &mut block);
            block.iter().position(|x| !x.is_finite()).map(|p| i * 4096 + p)
        });
        if let Some(p) = overflow {
            return Err(Error::InvalidArgument(format!(
                "module `{}`: the merged weight overflows {} at [{}, {}] (f32 value {:e}): the adapter's \
                 coefficients (largest |M| {:e}, gamma {}) are out of range for this weight",
                m.module,
                dtype_name(dtype),
                p / m.d_in,
                p % m.d_in,
                w[p],
                m.coefficients.iter().fold(0.0f32, |a, x| a.max(x.abs())),
                m.gamma
            )));
        }
        let max_abs = w.iter().zip(&w0).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        rows.push(json!({
            "module": m.module, "weight": m.weight, "d_out": m.d_out, "d_in": m.d_in, "dtype": dtype_name(dtype),
            "max_abs_diff": max_abs,
        }));
        tensors.push((m.weight.clone(), dtype, vec![m.d_out, m.d_in], f32_to_bytes(dtype, &w)?));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let mut copied = 0;
    if let Some(ck) = &model {
        for e in ck.entries() {
            if !tensors.iter().any(|t| t.0 == e.name) {
                tensors.push((e.name.clone(), e.dtype, e.shape.clone(), ck.read_bytes(&e.name)?));
                copied += 1;
            }
        }
    }
    let mut metadata: HashMap<String, String> = model.as_ref().map(|ck| ck.metadata().clone()).unwrap_or_default();
    metadata.entry("format".into()).or_insert_with(|| "pt".into());
    metadata.insert("svft_merged_adapter".into(), a.adapter.display().to_string());
    write_safetensors(&a.output, &tensors, metadata)?;
    let against = if model.is_some() { "the model's original weights" } else { "U diag(s) V^T" };
    if a.json {
        let v = json!({
            "output": a.output.display().to_string(), "merged": rows.len(), "copied": copied,
            "against": against, "modules": rows,
        });
        println!("{v}");
        return Ok(());
    }
    println!("svft merge: {} adapted weights, |W - W0| against {against}", rows.len());
    let width = rows.iter().map(|r| r["weight"].as_str().unwrap_or("").len()).max().unwrap_or(6).max(6);
    println!("{:<width$}  {:>12}  {:>5}  {:>12}", "weight", "shape", "dtype", "max |W-W0|");
    for r in &rows {
        println!(
            "{:<width$}  {:>12}  {:>5}  {:>12.3e}",
            r["weight"].as_str().unwrap_or(""),
            format!("{}x{}", r["d_out"], r["d_in"]),
            r["dtype"].as_str().unwrap_or(""),
            r["max_abs_diff"].as_f64().unwrap_or(0.0)
        );
    }
    if copied > 0 {
        println!("copied {copied} other tensors of the model unchanged");
    }
    println!("wrote {}", a.output.display());
    Ok(())
}
