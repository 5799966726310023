//! Checked views of caller buffers: NULL, alignment, element counts, overlap, dtypes.

use std::ffi::{c_char, c_void, CStr};

use super::status::{fail, FfiResult, SvftStatus};
use super::SvftDtype;

/// Parses an `int32_t` dtype value.
pub(crate) fn parse_dtype(value: i32) -> FfiResult<SvftDtype> {
    Ok(match value {
        0 => SvftDtype::F32,
        1 => SvftDtype::Bf16,
        2 => SvftDtype::F16,
        3 => SvftDtype::F64,
        _ => return fail(SvftStatus::UnsupportedDtype, format!("unknown dtype value {value}")),
    })
}

impl SvftDtype {
    /// Bytes per element (also the required alignment).
    pub(crate) fn size(self) -> usize {
        match self {
            SvftDtype::F32 => 4,
            SvftDtype::Bf16 | SvftDtype::F16 => 2,
            SvftDtype::F64 => 8,
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            SvftDtype::F32 => "f32",
            SvftDtype::Bf16 => "bf16",
            SvftDtype::F16 => "f16",
            SvftDtype::F64 => "f64",
        }
    }
}

/// Checks a pointer for NULL and alignment to `align` bytes.
fn check_addr(what: &str, addr: usize, align: usize) -> FfiResult {
    if addr == 0 {
        return fail(SvftStatus::NullPointer, format!("{what} is NULL"));
    }
    if addr % align != 0 {
        return fail(SvftStatus::Misaligned, format!("{what} ({addr:#x}) is not aligned to {align} bytes"));
    }
    Ok(())
}

/// A non-null, aligned output pointer for one value.
pub(crate) fn out_ptr<T>(what: &str, p: *mut T) -> FfiResult<*mut T> {
    check_addr(what, p as usize, align_of::<T>())?;
    Ok(p)
}

/// Like [`out_ptr`] but NULL means "not wanted".
pub(crate) fn opt_out_ptr<T>(what: &str, p: *mut T) -> FfiResult<Option<*mut T>> {
    if p.is_null() {
        Ok(None)
    } else {
        out_ptr(what, p).map(Some)
    }
}

/// `a * b`, or a SHAPE error naming `what`.
pub(crate) fn mul(what: &str, a: usize, b: usize) -> FfiResult<usize> {
    a.checked_mul(b)
        .ok_or_else(|| super::status::FfiError::new(SvftStatus::Shape, format!("{what}: {a} x {b} overflows size_t")))
}

/// Checks that a caller-declared length is the expected one.
pub(crate) fn check_len(what: &str, got: usize, expected: usize) -> FfiResult {
    if got != expected {
        return fail(SvftStatus::Shape, format!("wrong size for {what}: expected {expected} elements, got {got}"));
    }
    Ok(())
}

/// A byte range of a caller buffer, for the overlap check.
#[derive(Clone, Copy)]
pub(crate) struct Span {
    what: &'static str,
    start: usize,
    end: usize,
}

/// The CPU backend's stream rule: `stream` must be NULL.
pub(crate) fn host_stream(stream: *mut c_void) -> FfiResult {
    if !stream.is_null() {
        return fail(SvftStatus::InvalidArgument, "stream must be NULL on the CPU backend");
    }
    Ok(())
}

/// A checked buffer of `len` elements of `elem` bytes (`len` > 0): non-null, aligned, and
/// small enough to be a Rust slice.
pub(crate) fn span(what: &'static str, p: *const c_void, len: usize, elem: usize) -> FfiResult<Span> {
    check_addr(what, p as usize, elem)?;
    let bytes = len.checked_mul(elem).filter(|&b| b <= isize::MAX as usize).ok_or_else(|| {
        super::status::FfiError::new(SvftStatus::Shape, format!("{what}: {len} elements is too many"))
    })?;
    let start = p as usize;
    let end = start.checked_add(bytes).ok_or_else(|| {
        super::status::FfiError::new(SvftStatus::InvalidArgument, format!("{what} wraps the address space"))
    })?;
    Ok(Span { what, start, end })
}

/// Fails when an output span overlaps any other span.
pub(crate) fn check_disjoint(spans: &[Span]) -> FfiResult {
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            if a.start < b.end && b.start < a.end {
                return fail(SvftStatus::InvalidArgument, format!("{} and {} overlap", a.what, b.what));
            }
        }
    }
    Ok(())
}

/// Reads `len` elements of `dt` at `p` as f32 (f64 rounds to nearest).
///
/// # Safety
/// `p` must point to `len` readable elements of `dt` (checked for NULL and alignment here).
pub(crate) unsafe fn read_as_f32(
    what: &'static str,
    p: *const c_void,
    dt: SvftDtype,
    len: usize,
) -> FfiResult<Vec<f32>> {
    span(what, p, len, dt.size())?;
    // SAFETY (all arms): span() checked NULL, alignment and the byte size; the caller vouches
    // for the length.
    match dt {
        SvftDtype::F32 => {
            try_collect(what, len, unsafe { std::slice::from_raw_parts(p.cast::<f32>(), len) }.iter().copied())
        }
        SvftDtype::F64 => try_collect(
            what,
            len,
            unsafe { std::slice::from_raw_parts(p.cast::<f64>(), len) }.iter().map(|&v| v as f32),
        ),
        SvftDtype::Bf16 => try_collect(
            what,
            len,
            unsafe { std::slice::from_raw_parts(p.cast::<u16>(), len) }.iter().map(|&b| bf16_to_f32(b)),
        ),
        SvftDtype::F16 => try_collect(
            what,
            len,
            unsafe { std::slice::from_raw_parts(p.cast::<u16>(), len) }.iter().map(|&b| f16_to_f32(b)),
        ),
    }
}

/// Collects `len` items into a new vector whose memory is reserved fallibly ([`crate::alloc`]):
/// a size that came from outside is OUT_OF_MEMORY when it cannot be had, never an abort.
pub(crate) fn try_collect<T>(what: &str, len: usize, items: impl Iterator<Item = T>) -> FfiResult<Vec<T>> {
    let mut v = crate::alloc::try_with_capacity(what, len)?;
    v.extend(items.take(len));
    Ok(v)
}

/// bfloat16 bits to f32 (exact).
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// IEEE binary16 bits to f32 (exact, subnormals included).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f32;
    match exp {
        0 => sign * frac * 2f32.powi(-24),
        31 if frac == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        _ => sign * (1.0 + frac / 1024.0) * 2f32.powi(exp - 15),
    }
}

/// Reads a NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string.
pub(crate) unsafe fn c_str<'a>(what: &str, p: *const c_char) -> FfiResult<&'a str> {
    if p.is_null() {
        return fail(SvftStatus::NullPointer, format!("{what} is NULL"));
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| super::status::FfiError::new(SvftStatus::InvalidArgument, format!("{what} is not UTF-8")))
}

/// Fails with OUT_OF_MEMORY unless `bytes` can be reserved now (a best-effort pre-flight
/// check, so that absurd sizes fail cleanly instead of aborting the process mid-call).
pub(crate) fn preflight(what: &str, bytes: usize) -> FfiResult {
    let mut probe: Vec<u8> = Vec::new();
    if probe.try_reserve_exact(bytes).is_err() {
        return fail(SvftStatus::OutOfMemory, format!("cannot allocate {bytes} bytes for {what}"));
    }
    Ok(())
}
