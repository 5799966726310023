//! `svft merge`: dense adapted weights `U C V^T` in the model's dtype.

use std::collections::HashMap;

use serde_json::json;

use svft::adapter::{Adapter, FactorFile};
use svft::checkpoint::{dtype_name, f32_to_bytes, write_safetensors, Checkpoint, OwnedTensor};
use svft::cpu::gemm::{gemm, Operand as Op};
use svft::{Error, Result};

use super::{progress_bar, MergeArgs};

pub fn run(a: MergeArgs) -> Result<()> {
    let factors = FactorFile::open(&a.factors)?;
    let adapter = Adapter::load(&a.adapter)?;
    adapter.check_base(&factors)?;
    let model = a.model.as_ref().map(Checkpoint::open).transpose()?;
    let pb = progress_bar(adapter.modules.len() as u64, "merge");
    let mut tensors: Vec<OwnedTensor> = Vec::new();
    let mut rows = Vec::new();
    for m in &adapter.modules {
        pb.set_message(m.module.clone());
        let f = factors.load(&m.module)?;
        // W0: the original weight when the model is given, else U diag(s) V^T.
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
                ck.read_f32(&m.weight)?
            }
            None => {
                let us: Vec<f32> =
                    f.u.chunks_exact(f.r).flat_map(|row| row.iter().zip(&f.s).map(|(u, s)| u * s)).collect();
                let mut w0 = vec![0.0f32; f.d_out * f.d_in];
                gemm(&mut w0, Op::n(&us, f.d_out, f.r), Op::t(&f.v, f.d_in, f.r), false);
                w0
            }
        };
        let mut layer = m.to_layer(f)?;
        let w = layer.merge();
        let max_abs = w.iter().zip(&w0).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        rows.push(json!({
            "module": m.module, "weight": m.weight, "d_out": m.d_out, "d_in": m.d_in, "dtype": dtype_name(m.dtype),
            "max_abs_diff": max_abs,
        }));
        tensors.push((m.weight.clone(), m.dtype, vec![m.d_out, m.d_in], f32_to_bytes(m.dtype, &w)?));
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
