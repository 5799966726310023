//! Allocation of buffers whose size comes from outside the process (a command line, a file
//! header, the C ABI): the size is a checked product, and the memory is reserved fallibly, so
//! a size the machine cannot hold is an [`Error::OutOfMemory`] naming the buffer instead of a
//! capacity-overflow panic or an allocation abort. Buffers sized by the library itself from
//! shapes already admitted here need no such care.

use crate::error::{Error, Result};

/// The product of `dims`, or an error naming `what` when it overflows `usize`.
pub fn checked_len(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::OutOfMemory(format!("{what}: {} elements overflow the address space", show_dims(dims))))
}

/// `len` copies of `value`, reserved fallibly.
pub fn try_filled<T: Clone>(what: &str, len: usize, value: T) -> Result<Vec<T>> {
    let mut v = try_with_capacity(what, len)?;
    v.resize(len, value);
    Ok(v)
}

/// `len` zeros (or defaults), reserved fallibly.
pub fn try_zeroed<T: Clone + Default>(what: &str, len: usize) -> Result<Vec<T>> {
    try_filled(what, len, T::default())
}

/// An empty vector with room for exactly `len` elements, reserved fallibly.
pub fn try_with_capacity<T>(what: &str, len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        let bytes = (len as u128) * (std::mem::size_of::<T>() as u128);
        Error::OutOfMemory(format!("cannot allocate {} for {what}", show_bytes(bytes)))
    })?;
    Ok(v)
}

/// The memory this process can still take: the smaller of the system's available memory
/// (`MemAvailable` of /proc/meminfo) and the address-space limit (`ulimit -v`) less what is
/// mapped already. `None` where neither can be read (then only allocation itself can tell).
pub fn available_bytes() -> Option<u128> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| kib_field(&t, "MemAvailable:"));
    let limit = address_space_left();
    match (meminfo, limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn kib_field(text: &str, key: &str) -> Option<u128> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim().trim_end_matches("kB").trim().parse::<u128>().ok().map(|k| k * 1024)
}

#[cfg(unix)]
fn address_space_left() -> Option<u128> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    let mapped = std::fs::read_to_string("/proc/self/status").ok().and_then(|t| kib_field(&t, "VmSize:")).unwrap_or(0);
    Some((lim.rlim_cur as u128).saturating_sub(mapped))
}

#[cfg(not(unix))]
fn address_space_left() -> Option<u128> {
    None
}

/// Refuses work that needs about `bytes` of host memory when the machine cannot give them
/// ([`available_bytes`]), before anything is allocated, naming `what`.
pub fn check_fits(what: &str, bytes: u128) -> Result<()> {
    match available_bytes() {
        Some(avail) if bytes > avail => Err(Error::OutOfMemory(format!(
            "{what} needs about {} of memory, and {} is available",
            show_bytes(bytes),
            show_bytes(avail)
        ))),
        _ => Ok(()),
    }
}

/// Bytes in human units (`1.5 GiB`).
pub fn show_bytes(bytes: u128) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = bytes as f64;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < UNITS.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{x:.1} {}", UNITS[i])
    }
}

fn show_dims(dims: &[usize]) -> String {
    dims.iter().map(usize::to_string).collect::<Vec<_>>().join(" x ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_and_huge_sizes_are_errors() {
        assert_eq!(checked_len("w", &[3, 5, 7]).unwrap(), 105);
        let e = checked_len("w", &[usize::MAX / 2, 3]).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
        // More than any address space holds: the reservation fails, it does not abort.
        let e = try_zeroed::<f32>("a huge buffer", usize::MAX / 8).unwrap_err();
        assert!(e.to_string().contains("a huge buffer"), "{e}");
        assert_eq!(try_zeroed::<f32>("small", 3).unwrap(), vec![0.0; 3]);
        assert_eq!(show_bytes(1536), "1.5 KiB");
        assert!(check_fits("a step", u128::MAX / 2).unwrap_err().to_string().contains("a step needs about"));
        assert!(check_fits("a step", 1).is_ok());
    }
}
