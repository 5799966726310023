//! `include/svft.h` is generated from `src/ffi/` by cbindgen and checked in; this test fails
//! when regenerating it would change it. To regenerate:
//!
//! ```sh
//! SVFT_BLESS=1 cargo test --release --test header
//! ```

use std::path::Path;

fn generate() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen failed on src/ffi");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("cbindgen wrote UTF-8")
}

#[test]
fn header_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/svft.h");
    let fresh = generate();
    if std::env::var_os("SVFT_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write include/svft.h");
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current != fresh {
        let line = current
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| current.lines().count().min(fresh.lines().count()) + 1, |i| i + 1);
        panic!(
            "include/svft.h is stale (first difference at line {line}): the C ABI in src/ffi/ changed.\n\
             Regenerate it with `SVFT_BLESS=1 cargo test --release --test header` and commit it."
        );
    }
}

#[test]
fn header_declares_every_export() {
    // Every `#[no_mangle]` function in src/ffi/ is in the header (cbindgen skips items it
    // cannot express; this catches that).
    let header = generate();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ffi");
    let mut count = 0;
    let mut files = vec![];
    let mut dirs = vec![dir];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for file in files {
        let src = std::fs::read_to_string(file).unwrap();
        for name in src.split("extern \"C\" fn ").skip(1).map(|s| s.split('(').next().unwrap().trim()) {
            assert!(header.contains(&format!("{name}(")), "{name} missing from the header");
            count += 1;
        }
    }
    assert!(count >= 20, "found only {count} exports");
}
