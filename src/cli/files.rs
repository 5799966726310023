//! `svft init-adapter` and `svft inspect`.

use regex::Regex;
use serde_json::{json, Value};

use svft::adapter::{module_pattern, module_seed, Adapter, AdapterModule, FactorFile, ADAPTER_FORMAT, FACTORS_FORMAT};
use svft::checkpoint::{check_not_an_input, dtype_name, Checkpoint};
use svft::cpu::CpuLayer;
use svft::{Error, Init, LayerConfig, Pattern, Result};

use super::{InitAdapterArgs, InspectArgs};

pub fn init_adapter(a: InitAdapterArgs) -> Result<()> {
    let factors = FactorFile::open(&a.factors)?;
    check_not_an_input(&a.output, &[("factor file", a.factors.clone())])?;
    let select = match &a.modules {
        Some(spec) => Some(
            Regex::new(spec).map_err(|e| Error::InvalidArgument(format!("invalid --modules regex `{spec}`: {e}")))?,
        ),
        None => None,
    };
    let gate = a.gate.unwrap_or(a.init == Init::Official);
    let pattern: Pattern = a.pattern.parse()?;
    // `random:D:seed=S` names S; `random:D` takes --seed as the base of its per-module seeds.
    let explicit_seed = a.pattern.trim().split(':').nth(2).is_some();
    let mut adapter = Adapter::default();
    for info in factors.modules() {
        if select.as_ref().is_some_and(|re| !re.is_match(&info.module)) {
            continue;
        }
        let f = factors.load(&info.module)?;
        // Per-module seeds (svft::adapter::module_seed), shared with the Python package.
        let config = LayerConfig {
            pattern: module_pattern(pattern, explicit_seed, a.seed, &info.module),
            init: a.init,
            gate,
            seed: module_seed(a.seed, &info.module),
            ..Default::default()
        };
        let layer = CpuLayer::new(f, &config, None)
            .map_err(|e| Error::InvalidArgument(format!("module `{}`: {e}", info.module)))?;
        adapter.modules.push(AdapterModule::from_layer(&info.weight, info.dtype, &layer));
    }
    if adapter.modules.is_empty() {
        return Err(Error::InvalidArgument("no module of the factor file matches --modules".into()));
    }
    adapter.save(&a.output)?;
    println!(
        "wrote {}: {} modules, pattern {}, init {}, gate {}, {} trainable parameters",
        a.output.display(),
        adapter.modules.len(),
        pattern,
        a.init,
        if gate { "on" } else { "off" },
        adapter.trainable_params()
    );
    Ok(())
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.file)?;
    // A file that records an SVFT file checksum is described only if the checksum holds (an
    // edited `format` must not pass a damaged adapter off as a plain checkpoint).
    svft::adapter::verify_file_checksum(&a.file, &ckpt)?;
    let format = ckpt.metadata().get("format").cloned().unwrap_or_default();
    let v: Value = if format == ADAPTER_FORMAT {
        let ad = Adapter::load(&a.file)?;
        json!({
            "kind": "svft-adapter",
            "trainable_params": ad.trainable_params(),
            "modules": ad.modules.iter().map(|m| json!({
                "module": m.module, "weight": m.weight, "shape": [m.d_out, m.d_in], "rank": m.rank,
                "pattern": m.pattern.to_string(), "coefficients": m.coefficients.len(), "init": m.init.to_string(),
                "gate": m.gate, "gamma": m.gamma, "base_checksum": m.base_checksum,
            })).collect::<Vec<_>>(),
        })
    } else if format == FACTORS_FORMAT {
        let f = FactorFile::open(&a.file)?;
        json!({
            "kind": "svft-factors",
            "source": f.source(),
            "storage_dtype": f.storage_dtype().map(dtype_name),
            "modules": f.modules().iter().map(|m| json!({
                "module": m.module, "weight": m.weight, "shape": [m.d_out, m.d_in], "rank": m.rank,
                "dtype": dtype_name(m.dtype), "residual": m.residual, "checksum": m.checksum,
            })).collect::<Vec<_>>(),
        })
    } else {
        json!({
            "kind": "checkpoint",
            "shards": ckpt.shard_count(),
            "tensors": ckpt.entries().iter().map(|e| json!({
                "name": e.name, "dtype": dtype_name(e.dtype), "shape": e.shape,
            })).collect::<Vec<_>>(),
        })
    };
    if a.json {
        println!("{v}");
        return Ok(());
    }
    println!("{}: {}", a.file.display(), v["kind"].as_str().unwrap_or(""));
    let list = v.get("modules").or_else(|| v.get("tensors")).and_then(Value::as_array).cloned().unwrap_or_default();
    for item in &list {
        let name = item.get("module").or_else(|| item.get("name")).and_then(Value::as_str).unwrap_or("");
        let mut rest = item.as_object().cloned().unwrap_or_default();
        rest.remove("module");
        rest.remove("name");
        println!("  {name}: {}", Value::Object(rest));
    }
    Ok(())
}
