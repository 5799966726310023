//! Writing safetensors files: byte-reproducible, never half-written, never onto an input.
//!
//! - **Reproducible**: the header is JSON with its keys in sorted order (tensors and
//!   `__metadata__` alike) and the data follows in a fixed order (widest dtype first, for
//!   alignment, then by name), so the same tensors and metadata give the same bytes and a user
//!   can checksum the files.
//! - **Atomic**: the file is written unnamed (`O_TMPFILE` on Linux), linked under a temporary
//!   name only once complete and synced, then renamed over the target. A write killed at any
//!   point before that leaves nothing behind; where `O_TMPFILE` is unsupported a named
//!   temporary file is used and removed on every error.
//! - **Not onto an input**: [`check_not_an_input`] compares files by identity (device and
//!   inode), so `-o` naming an input through another path, a hard link or a symlink is refused.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One tensor to write: name, dtype, shape and little-endian bytes.
pub type OwnedTensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

/// Writes a safetensors file with the given `__metadata__` (see the module docs).
pub fn write_safetensors(path: &Path, tensors: &[OwnedTensor], metadata: HashMap<String, String>) -> Result<()> {
    let mut order: Vec<&OwnedTensor> = tensors.iter().collect();
    order.sort_by(|a, b| b.1.bitsize().cmp(&a.1.bitsize()).then_with(|| a.0.cmp(&b.0)));
    let mut header: BTreeMap<&str, Value> = BTreeMap::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in &order {
        let bits = shape.iter().try_fold(dtype.bitsize(), |acc, &d| acc.checked_mul(d));
        if bits.map(|b| b.div_ceil(8)) != Some(bytes.len()) {
            return Err(Error::InvalidArgument(format!(
                "tensor `{name}`: {} bytes do not hold a {dtype:?} tensor of shape {shape:?}",
                bytes.len()
            )));
        }
        if name == "__metadata__" || header.contains_key(name.as_str()) {
            return Err(Error::InvalidArgument(format!("tensor name `{name}` is reserved or appears twice")));
        }
        header.insert(name, json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}));
        offset += bytes.len();
    }
    let metadata: BTreeMap<String, String> = metadata.into_iter().collect();
    header.insert("__metadata__", json!(metadata));
    let mut text = serde_json::to_string(&header).map_err(|e| Error::InvalidArgument(format!("header: {e}")))?;
    // The data starts 8-aligned, as the safetensors writers do.
    text.extend(std::iter::repeat_n(' ', (8 - (8 + text.len()) % 8) % 8));

    let out = PendingFile::create(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, &out.file);
    let write = |w: &mut BufWriter<&File>, bytes: &[u8]| w.write_all(bytes).map_err(|e| io_err(path, e));
    write(&mut w, &(text.len() as u64).to_le_bytes())?;
    write(&mut w, text.as_bytes())?;
    for (_, _, _, bytes) in &order {
        write(&mut w, bytes)?;
    }
    w.flush().map_err(|e| io_err(path, e))?;
    drop(w);
    out.persist()
}

/// A file being written: unnamed until [`PendingFile::persist`] puts it in place.
struct PendingFile {
    file: File,
    target: PathBuf,
    /// The temporary name of a named fallback file (removed on drop unless persisted).
    named: Option<PathBuf>,
}

impl PendingFile {
    fn create(target: &Path) -> Result<Self> {
        let dir = match target.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
                dir.to_path_buf()
            }
            None => PathBuf::from("."),
        };
        if target.is_dir() {
            return Err(Error::InvalidArgument(format!("output {} is a directory", target.display())));
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            if let Ok(file) =
                std::fs::OpenOptions::new().write(true).custom_flags(libc::O_TMPFILE).mode(0o644).open(&dir)
            {
                return Ok(PendingFile { file, target: target.to_path_buf(), named: None });
            }
        }
        let name = temp_name(target);
        let file =
            std::fs::OpenOptions::new().write(true).create_new(true).open(&name).map_err(|e| io_err(&name, e))?;
        Ok(PendingFile { file, target: target.to_path_buf(), named: Some(name) })
    }

    /// Syncs the data, gives the file its temporary name (if it has none) and renames it over
    /// the target.
    fn persist(mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| io_err(&self.target, e))?;
        let name = match &self.named {
            Some(name) => name.clone(),
            None => {
                let name = temp_name(&self.target);
                link_unnamed(&self.file, &name)?;
                self.named = Some(name.clone());
                name
            }
        };
        std::fs::rename(&name, &self.target).map_err(|e| io_err(&self.target, e))?;
        self.named = None;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if let Some(name) = &self.named {
            let _ = std::fs::remove_file(name);
        }
    }
}

/// `.{file name}.svft-partial-{pid}-{nanos}` beside the target.
fn temp_name(target: &Path) -> PathBuf {
    let file = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    target.with_file_name(format!(".{file}.svft-partial-{}-{nanos}", std::process::id()))
}

#[cfg(target_os = "linux")]
fn link_unnamed(file: &File, name: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::AsRawFd;
    let proc_path = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
    let c_name = CString::new(name.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("output path {} contains a NUL byte", name.display())))?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::linkat(libc::AT_FDCWD, proc_path.as_ptr(), libc::AT_FDCWD, c_name.as_ptr(), libc::AT_SYMLINK_FOLLOW)
    };
    if rc != 0 {
        return Err(io_err(name, std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn link_unnamed(_file: &File, _name: &Path) -> Result<()> {
    unreachable!("only Linux writes unnamed files")
}

/// Refuses `output` when it is the same file as any of `inputs` (by device and inode, so a
/// second path, hard link or symlink to an input is caught); each input comes with what it is,
/// for the message.
pub fn check_not_an_input(output: &Path, inputs: &[(&str, PathBuf)]) -> Result<()> {
    let Ok(out) = std::fs::metadata(output) else { return Ok(()) };
    for (what, input) in inputs {
        if let Ok(inp) = std::fs::metadata(input) {
            if same_file(&out, &inp) {
                return Err(Error::InvalidArgument(format!(
                    "the output {} is the {what} {}: writing it would replace an input; choose another output path",
                    output.display(),
                    input.display()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_a: &std::fs::Metadata, _b: &std::fs::Metadata) -> bool {
    false
}
