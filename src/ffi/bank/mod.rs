//! The `svft_bank_*` calls: the adapter bank ([`crate::bank::CpuBank`]) behind an opaque
//! `SvftBank *` handle. Many SVFT adapters of one base layer, one mixed batch per forward, each
//! contiguous segment of rows through its own adapter (inference only).
//!
//! Banks follow the layer conventions of `src/ffi/mod.rs`: status codes, the thread-local last
//! error, every body under [`guard`]. A bank handle is a registry key like a layer handle, in a
//! registry of its own whose keys never equal a layer's (a layer handle passed as a bank, or the
//! reverse, is `SVFT_STATUS_INVALID_HANDLE`); calls on one bank are serialised, and a panic in a
//! step that changes the bank leaves it unusable (every later call but destroy fails), as for
//! layers.
//!
//! A bank lives where the layer it was made from lives (`svft_bank_from_layer`): a CPU bank
//! computes in f32 on host pointers with `stream` NULL; a CUDA bank computes in the layer's
//! dtype on its device, takes device pointers for `x` and `y` and a `CUstream`, and orders
//! itself on that stream as layers do (`src/ffi/mod.rs`). Adapters (their parts, and the
//! segment table) are host memory on both. `svft_bank_from_factors` makes CPU banks.

use std::ffi::{c_char, c_void};

use super::buffers::{c_str, check_disjoint, check_len, mul, opt_out_ptr, out_ptr, parse_dtype, preflight, span};
use super::buffers::{read_as_f32, try_collect};

mod record;
use super::exports::SvftLayer;
use super::layer::AbiLayer;
use super::registry::{self, Registry};
use super::status::{fail, guard, FfiResult, SvftStatus};
use super::{SvftBackend, SvftDtype};
use crate::bank::{Adapter, CpuBank, Segment};
use crate::layer::pattern::{Omega, Pattern};
use crate::layer::svd::Factors;
pub(crate) use record::AbiBank;

/// The adapter id of a segment served by the base weight alone.
pub const SVFT_BANK_BASE: i64 = -1;

/// The C handle type of a bank: opaque, only ever seen through a pointer.
pub struct SvftBank {
    _private: [u8; 0],
}

/// Rows `start..end` of a batch, served by adapter `adapter` (`SVFT_BANK_BASE`: the base weight
/// alone). A forward's segment table is an array of these that tiles `0..n` in order; empty
/// segments (`start == end`) are allowed.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvftSegment {
    /// First row.
    pub start: usize,
    /// One past the last row.
    pub end: usize,
    /// The adapter's id (0..=UINT32_MAX), or `SVFT_BANK_BASE`.
    pub adapter: i64,
}

/// The live banks (handles `id * 16 + 8`: never a layer's).
static BANKS: Registry<Box<dyn AbiBank>> = Registry::new(8, "bank");

/// Runs a read-only `f` on the bank behind `handle` ([`Registry::with`]).
fn with<R>(handle: *const SvftBank, f: impl FnOnce(&dyn AbiBank) -> FfiResult<R>) -> FfiResult<R> {
    BANKS.with(handle as usize, |b| f(&**b))
}

/// `check` (read-only) then `act`, the one step that may modify the bank, with the entry marked
/// broken across `act` ([`Registry::with_mut`], as for layers).
fn with_mut<A, R>(
    handle: *const SvftBank,
    call: &'static str,
    check: impl FnOnce(&dyn AbiBank) -> FfiResult<A>,
    act: impl FnOnce(&mut dyn AbiBank, A) -> FfiResult<R>,
) -> FfiResult<R> {
    BANKS.with_mut(handle as usize, call, |b| check(&**b), |b, a| act(&mut **b, a))
}

/// Checks `out` and clears `*out`, so that it is NULL on every failure after this point.
fn take_out(out: *mut *mut SvftBank) -> FfiResult<*mut *mut SvftBank> {
    let out = out_ptr("out", out)?;
    // SAFETY: checked non-null and aligned.
    unsafe { out.write(std::ptr::null_mut()) };
    Ok(out)
}

fn register(bank: Box<dyn AbiBank>, out: *mut *mut SvftBank) -> FfiResult {
    let handle = BANKS.insert(bank) as *mut SvftBank;
    // SAFETY: `out` was checked by take_out at the start of the call.
    unsafe { out.write(handle) };
    Ok(())
}

/// Creates an empty bank over the base of a layer: its factors as the layer holds them and its
/// bias (copied; the layer stays independent and may be destroyed), on the layer's backend (and
/// for CUDA its device and dtype: the bank's `x` and `y` are then device buffers of that
/// dtype). Add the layer's own adapter with `svft_bank_add_layer` if it should be served too.
/// On success `*out` is a new handle (free it with `svft_bank_destroy`); on failure it is NULL.
///
/// # Safety
/// `out` must be NULL or writable; any `layer` value is accepted.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_from_layer(layer: *const SvftLayer, out: *mut *mut SvftBank) -> SvftStatus {
    guard("svft_bank_from_layer", || {
        let out = take_out(out)?;
        let bank = registry::with(layer, |l| l.layer.new_bank())?;
        register(bank, out)
    })
}

/// Creates an empty CPU bank over base factors in host f32 (for a CUDA bank, make a CUDA layer
/// from the factors and the bank from it): `u` (`d_out x rank`, row-major), `s`
/// (`rank`, descending), `v` (`d_in x rank`), and `bias` NULL (with `bias_len` 0) or `d_out`
/// finite values. On success `*out` is a new handle; on failure it is NULL.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_from_factors(
    d_out: usize,
    d_in: usize,
    rank: usize,
    u: *const f32,
    u_len: usize,
    s: *const f32,
    s_len: usize,
    v: *const f32,
    v_len: usize,
    bias: *const f32,
    bias_len: usize,
    out: *mut *mut SvftBank,
) -> SvftStatus {
    guard("svft_bank_from_factors", || {
        let out = take_out(out)?;
        if d_out == 0 || d_in == 0 || rank == 0 {
            return fail(SvftStatus::Shape, format!("empty shape: d_out {d_out}, d_in {d_in}, rank {rank}"));
        }
        if rank > d_out.min(d_in) {
            return fail(SvftStatus::InvalidArgument, format!("rank {rank} exceeds min(d_out, d_in)"));
        }
        check_len("U (d_out x rank)", u_len, mul("U", d_out, rank)?)?;
        check_len("s (rank)", s_len, rank)?;
        check_len("V (d_in x rank)", v_len, mul("V", d_in, rank)?)?;
        preflight("the factors", (u_len + s_len + v_len).saturating_mul(8))?;
        let f32_ = SvftDtype::F32;
        // SAFETY (all): read_as_f32 checks NULL and alignment; the caller vouches for the lengths.
        let (u, s, v) = unsafe {
            (
                read_as_f32("U", u.cast(), f32_, u_len)?,
                read_as_f32("s", s.cast(), f32_, s_len)?,
                read_as_f32("V", v.cast(), f32_, v_len)?,
            )
        };
        let bias = if bias.is_null() && bias_len == 0 {
            None
        } else {
            check_len("bias (d_out)", bias_len, d_out)?;
            // SAFETY: as above.
            Some(unsafe { read_as_f32("bias", bias.cast(), f32_, bias_len) }?)
        };
        let factors = Factors::new(d_out, d_in, u, s, v)?;
        register(Box::new(CpuBank::new(factors, bias)?), out)
    })
}

/// Destroys a bank. Later calls with the handle (including a second destroy) return
/// `SVFT_STATUS_INVALID_HANDLE`.
///
/// # Safety
/// Any pointer value is accepted.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_destroy(bank: *mut SvftBank) -> SvftStatus {
    guard("svft_bank_destroy", || BANKS.remove(bank as usize))
}

/// Writes the bank's shape (`d_out`, `d_in`, `rank`) and the number of resident adapters. Each
/// output may be NULL when not wanted.
///
/// # Safety
/// Outputs must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_info(
    bank: *const SvftBank,
    d_out: *mut usize,
    d_in: *mut usize,
    rank: *mut usize,
    adapters: *mut usize,
) -> SvftStatus {
    guard("svft_bank_info", || {
        let outs = [
            opt_out_ptr("d_out", d_out)?,
            opt_out_ptr("d_in", d_in)?,
            opt_out_ptr("rank", rank)?,
            opt_out_ptr("adapters", adapters)?,
        ];
        with(bank, |b| {
            let (f, len) = (b.host().factors(), b.host().len());
            for (p, v) in outs.into_iter().zip([f.d_out, f.d_in, f.r, len]) {
                // SAFETY: checked non-null and aligned.
                p.into_iter().for_each(|p| unsafe { p.write(v) });
            }
            Ok(())
        })
    })
}

/// Writes to `*out` whether adapter `id` is resident.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_contains(bank: *const SvftBank, id: u32, out: *mut bool) -> SvftStatus {
    guard("svft_bank_contains", || {
        let out = out_ptr("out", out)?;
        with(bank, |b| {
            // SAFETY: checked non-null and aligned.
            unsafe { out.write(b.host().contains(id)) };
            Ok(())
        })
    })
}

/// The adapter a layer holds (its index set, coefficients, gamma and gate, copied), after
/// checking that the layer is over the bank's base: the same factors (as each holds them) and
/// bias, value for value.
fn layer_adapter(b: &dyn AbiBank, id: u32, l: &dyn AbiLayer) -> FfiResult<Adapter> {
    let host = b.host();
    let f = host.factors();
    let [u, s, v] = l.factors()?;
    let d = l.core().dims();
    let bias = l.bias()?;
    let same = (d.d_out, d.d_in, d.r) == (f.d_out, f.d_in, f.r)
        && *u == f.u[..]
        && *s == f.s[..]
        && *v == f.v[..]
        && bias.as_deref() == host.bias();
    if !same {
        return fail(
            SvftStatus::InvalidArgument,
            format!(
                "adapter {id}: the layer is not over this bank's base (its {}x{} rank {} factors{} differ from the bank's {}x{} rank {}{})",
                d.d_out,
                d.d_in,
                d.r,
                if bias.is_some() { " with bias" } else { "" },
                f.d_out,
                f.d_in,
                f.r,
                if host.bias().is_some() { " with bias" } else { "" },
            ),
        );
    }
    let core = l.core();
    Ok(Adapter::new(core.omega().clone(), l.coefficients()?.into_owned(), l.gamma()?, core.config().gate)?)
}

/// `svft_bank_add_layer` and `_replace_layer`: the layer is read (under its lock) while the
/// bank's check runs, and only the adapter crosses into the step that changes the bank.
fn with_layer_adapter(
    bank: *mut SvftBank,
    id: u32,
    layer: *const SvftLayer,
    call: &'static str,
    act: impl FnOnce(&mut dyn AbiBank, Adapter) -> FfiResult,
) -> FfiResult {
    registry::with(layer, |l| with_mut(bank, call, |b| layer_adapter(b, id, &*l.layer), act))
}

/// Adds the adapter of a layer (its index set, coefficients, gamma and gate, copied) as
/// adapter `id`. The layer must be over the bank's base: the same factors (as each holds them:
/// U and V in the layer's dtype on CUDA) and bias, value for value (e.g. the layer the bank was
/// made from, or one built by `svft_layer_from_factors` from the same factors and dtype). An `id` already resident is `SVFT_STATUS_INVALID_ARGUMENT` (replace it
/// instead); nothing changes on any failure.
///
/// # Safety
/// Any handle values are accepted.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_add_layer(bank: *mut SvftBank, id: u32, layer: *const SvftLayer) -> SvftStatus {
    guard("svft_bank_add_layer", || with_layer_adapter(bank, id, layer, "svft_bank_add_layer", |b, a| b.add(id, a)))
}

/// Replaces resident adapter `id` by the adapter of a layer over the bank's base (see
/// `svft_bank_add_layer`). An `id` not resident is `SVFT_STATUS_INVALID_ARGUMENT`; nothing
/// changes on any failure, and the other adapters are untouched.
///
/// # Safety
/// Any handle values are accepted.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_replace_layer(bank: *mut SvftBank, id: u32, layer: *const SvftLayer) -> SvftStatus {
    guard("svft_bank_replace_layer", || {
        with_layer_adapter(bank, id, layer, "svft_bank_replace_layer", |b, a| b.replace(id, a))
    })
}

/// An adapter from raw arguments (host memory), checked against nothing but itself.
///
/// # Safety
/// Pointers NULL or valid for `nnz` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn raw_adapter(
    rank: usize,
    pattern: *const c_char,
    rows: *const u32,
    cols: *const u32,
    nnz: usize,
    m: *const f32,
    gamma: f32,
    gate: bool,
) -> FfiResult<Adapter> {
    // SAFETY: the caller passes NULL or a NUL-terminated string.
    let pattern: Pattern = unsafe { c_str("pattern", pattern) }?.parse()?;
    if nnz == 0 {
        return fail(SvftStatus::Shape, "nnz (the number of coefficients) must be positive");
    }
    span("rows", rows.cast(), nnz, 4)?;
    span("cols", cols.cast(), nnz, 4)?;
    span("m", m.cast(), nnz, 4)?;
    preflight("the adapter", nnz.saturating_mul(24))?;
    // SAFETY: checked non-null, aligned and sized; the caller vouches for nnz elements.
    let (rows, cols, m) = unsafe {
        (
            try_collect("rows", nnz, std::slice::from_raw_parts(rows, nnz).iter().copied())?,
            try_collect("cols", nnz, std::slice::from_raw_parts(cols, nnz).iter().copied())?,
            try_collect("m", nnz, std::slice::from_raw_parts(m, nnz).iter().copied())?,
        )
    };
    let omega = Omega::from_indices(pattern, rank, rows, cols)?;
    Ok(Adapter::new(omega, m, gamma, gate)?)
}

/// Adds adapter `id` from its parts, all host memory: coefficient k (`m[k]`) sits at
/// `(rows[k], cols[k])` of the `rank x rank` core, `nnz` of each; `pattern` names the index set
/// as in `svft_layer_from_factors_indexed` (a "plain" or "banded:D" set must be that band's own,
/// complete and in row-major order, as `svft_layer_indices` reports it; "random:D" or "topk:D"
/// name any other set); `gamma` is the gate parameter (`g = sigmoid(gamma)` when `gate`, else
/// 1). M and gamma must be finite. An `id` already resident is `SVFT_STATUS_INVALID_ARGUMENT`;
/// nothing changes on any failure.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_add(
    bank: *mut SvftBank,
    id: u32,
    pattern: *const c_char,
    rows: *const u32,
    cols: *const u32,
    nnz: usize,
    m: *const f32,
    gamma: f32,
    gate: bool,
) -> SvftStatus {
    guard("svft_bank_add", || {
        with_mut(
            bank,
            "svft_bank_add",
            // SAFETY: per the contract.
            |b| unsafe { raw_adapter(b.host().factors().r, pattern, rows, cols, nnz, m, gamma, gate) },
            |b, a| b.add(id, a),
        )
    })
}

/// Replaces resident adapter `id` by one from its parts (see `svft_bank_add`); the other
/// adapters are untouched. An `id` not resident is `SVFT_STATUS_INVALID_ARGUMENT`; nothing
/// changes on any failure.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_replace(
    bank: *mut SvftBank,
    id: u32,
    pattern: *const c_char,
    rows: *const u32,
    cols: *const u32,
    nnz: usize,
    m: *const f32,
    gamma: f32,
    gate: bool,
) -> SvftStatus {
    guard("svft_bank_replace", || {
        with_mut(
            bank,
            "svft_bank_replace",
            // SAFETY: per the contract.
            |b| unsafe { raw_adapter(b.host().factors().r, pattern, rows, cols, nnz, m, gamma, gate) },
            |b, a| b.replace(id, a),
        )
    })
}

/// Removes resident adapter `id` (not resident: `SVFT_STATUS_INVALID_ARGUMENT`); the other
/// adapters are untouched. A later segment naming `id` is an error.
///
/// # Safety
/// Any handle value is accepted.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_remove(bank: *mut SvftBank, id: u32) -> SvftStatus {
    guard("svft_bank_remove", || {
        with_mut(
            bank,
            "svft_bank_remove",
            |b| {
                if !b.host().contains(id) {
                    return fail(SvftStatus::InvalidArgument, format!("adapter id {id} is not in the bank"));
                }
                Ok(())
            },
            |b, ()| b.remove(id),
        )
    })
}

/// `Y` for a mixed batch of `n` rows: row `b` of `y` (`n x d_out`, `y_len` elements) is row `b`
/// of `x` (`n x d_in`, `x_len`) through the adapter of the segment holding `b`, or through the
/// base weight alone for `SVFT_BANK_BASE`, plus the base's bias. `segments` (`num_segments`
/// entries) must tile `0..n` in order (empty segments allowed) and name resident adapters; the
/// table is checked in full before anything is written, and a bad one is
/// `SVFT_STATUS_INVALID_ARGUMENT` naming the offending segment. `dtype` must be the bank's
/// (`svft_bank_backend` reports it: f32 on the CPU). On the CPU `x` and `y` are host memory and
/// `stream` NULL; on CUDA they are device buffers on the bank's device and `stream` a `CUstream`
/// of its primary context (NULL: the legacy default stream), and the call only enqueues work
/// (see `src/ffi/mod.rs`, CUDA streams). `segments` is host memory on both; `y` must not
/// overlap `x` or `segments`.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_forward(
    bank: *mut SvftBank,
    dtype: i32,
    x: *const c_void,
    x_len: usize,
    n: usize,
    segments: *const SvftSegment,
    num_segments: usize,
    y: *mut c_void,
    y_len: usize,
    stream: *mut c_void,
) -> SvftStatus {
    guard("svft_bank_forward", || {
        let check = |b: &dyn AbiBank| -> FfiResult<Vec<Segment>> {
            let dt = parse_dtype(dtype)?;
            if dt != b.dtype() {
                return fail(
                    SvftStatus::UnsupportedDtype,
                    format!("this bank computes in {}, not {}", b.dtype().name(), dt.name()),
                );
            }
            b.check_stream(stream)?;
            if n == 0 {
                return fail(SvftStatus::Shape, "n (tokens) must be positive");
            }
            let f = b.host().factors();
            check_len("x (n x d_in)", x_len, mul("x", n, f.d_in)?)?;
            check_len("y (n x d_out)", y_len, mul("y", n, f.d_out)?)?;
            if num_segments == 0 {
                return fail(
                    SvftStatus::InvalidArgument,
                    format!("segment table is empty: it must cover the {n} rows"),
                );
            }
            let elem = std::mem::size_of::<SvftSegment>();
            let spans = [
                b.check_buffer("x", x, x_len, dt.size())?,
                span("segments", segments.cast(), mul("segments", num_segments, elem / 8)?, 8)?,
                b.check_buffer("y", y, y_len, dt.size())?,
            ];
            check_disjoint(&spans[1..])?;
            check_disjoint(&[spans[0], spans[2]])?;
            // T and S (n x r each) on the bank's backend, the table on the host.
            if b.backend() == SvftBackend::Cpu {
                preflight("the bank's workspace", mul("workspace", n, f.r)?.saturating_mul(8))?;
            }
            // SAFETY: checked non-null, aligned and sized; the caller vouches for the length.
            let table = unsafe { std::slice::from_raw_parts(segments, num_segments) };
            try_collect(
                "segments",
                num_segments,
                table.iter().map(|s| Segment { start: s.start, end: s.end, adapter: s.adapter }),
            )
        };
        // SAFETY: checked buffers of the bank's memory, dtype and shape, disjoint.
        with_mut(bank, "svft_bank_forward", check, |b, table| unsafe {
            b.forward((x, x_len), n, &table, (y, y_len), stream)
        })
    })
}

/// Writes the backend a bank lives on (`SvftBackend`, as `int32_t`) and the dtype its `x` and
/// `y` must have (`SvftDtype`). Each output may be NULL when not wanted.
///
/// # Safety
/// Outputs must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_bank_backend(bank: *const SvftBank, backend: *mut i32, dtype: *mut i32) -> SvftStatus {
    guard("svft_bank_backend", || {
        let outs = [opt_out_ptr("backend", backend)?, opt_out_ptr("dtype", dtype)?];
        with(bank, |b| {
            for (p, v) in outs.into_iter().zip([b.backend() as i32, b.dtype() as i32]) {
                // SAFETY: checked non-null and aligned.
                p.into_iter().for_each(|p| unsafe { p.write(v) });
            }
            Ok(())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_layout_is_the_banks() {
        assert_eq!(std::mem::size_of::<SvftSegment>(), std::mem::size_of::<Segment>());
        assert_eq!(std::mem::align_of::<SvftSegment>(), 8);
        assert_eq!(SVFT_BANK_BASE, crate::bank::BASE);
    }
}
