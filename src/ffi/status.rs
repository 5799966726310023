//! Status codes, the thread-local last error and the guard that every export runs under.

use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Error;

/// What an `svft_*` call returns. 0 is success; [`svft_last_error`] explains any other value.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvftStatus {
    /// Success.
    Ok = 0,
    /// A required pointer was NULL.
    NullPointer = 1,
    /// An argument the call cannot use (unknown enumeration value, overlapping buffers, ...).
    InvalidArgument = 2,
    /// A buffer length or dimension that does not match the layer's shape (or is zero).
    Shape = 3,
    /// A NaN or infinity where finite values are required.
    NonFinite = 4,
    /// A pattern spec that does not parse, or a pattern impossible for this rank.
    Pattern = 5,
    /// backward without a matching forward (none yet, different token count, or changed M).
    NoForward = 6,
    /// The CUDA backend is not available (not built, or no device).
    CudaUnavailable = 7,
    /// Memory (host or device) could not be allocated.
    OutOfMemory = 8,
    /// A handle that is NULL-free but not a live layer (destroyed, never created, or unusable
    /// after an internal panic).
    InvalidHandle = 9,
    /// An internal panic was caught; the message says where.
    Panic = 10,
    /// A dtype the call does not accept (or an unknown dtype value).
    UnsupportedDtype = 11,
    /// A pointer not aligned for its element type.
    Misaligned = 12,
    /// The SVD did not converge.
    SvdFailed = 13,
    /// A CUDA driver or kernel error.
    CudaError = 14,
}

impl SvftStatus {
    /// The C name of the code.
    pub(crate) fn name(self) -> &'static CStr {
        match self {
            SvftStatus::Ok => c"SVFT_STATUS_OK",
            SvftStatus::NullPointer => c"SVFT_STATUS_NULL_POINTER",
            SvftStatus::InvalidArgument => c"SVFT_STATUS_INVALID_ARGUMENT",
            SvftStatus::Shape => c"SVFT_STATUS_SHAPE",
            SvftStatus::NonFinite => c"SVFT_STATUS_NON_FINITE",
            SvftStatus::Pattern => c"SVFT_STATUS_PATTERN",
            SvftStatus::NoForward => c"SVFT_STATUS_NO_FORWARD",
            SvftStatus::CudaUnavailable => c"SVFT_STATUS_CUDA_UNAVAILABLE",
            SvftStatus::OutOfMemory => c"SVFT_STATUS_OUT_OF_MEMORY",
            SvftStatus::InvalidHandle => c"SVFT_STATUS_INVALID_HANDLE",
            SvftStatus::Panic => c"SVFT_STATUS_PANIC",
            SvftStatus::UnsupportedDtype => c"SVFT_STATUS_UNSUPPORTED_DTYPE",
            SvftStatus::Misaligned => c"SVFT_STATUS_MISALIGNED",
            SvftStatus::SvdFailed => c"SVFT_STATUS_SVD_FAILED",
            SvftStatus::CudaError => c"SVFT_STATUS_CUDA_ERROR",
        }
    }

    pub(super) const ALL: [SvftStatus; 15] = [
        SvftStatus::Ok,
        SvftStatus::NullPointer,
        SvftStatus::InvalidArgument,
        SvftStatus::Shape,
        SvftStatus::NonFinite,
        SvftStatus::Pattern,
        SvftStatus::NoForward,
        SvftStatus::CudaUnavailable,
        SvftStatus::OutOfMemory,
        SvftStatus::InvalidHandle,
        SvftStatus::Panic,
        SvftStatus::UnsupportedDtype,
        SvftStatus::Misaligned,
        SvftStatus::SvdFailed,
        SvftStatus::CudaError,
    ];
}

/// A failure inside an export: its status and message.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub status: SvftStatus,
    pub msg: String,
}

impl FfiError {
    pub fn new(status: SvftStatus, msg: impl Into<String>) -> Self {
        FfiError { status, msg: msg.into() }
    }
}

/// Shorthand: `Err(FfiError::new(status, msg))`.
pub(crate) fn fail<T>(status: SvftStatus, msg: impl Into<String>) -> Result<T, FfiError> {
    Err(FfiError::new(status, msg))
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::PatternSpec { .. } | Error::PatternSize { .. } => SvftStatus::Pattern,
            Error::Shape { .. } | Error::Empty { .. } => SvftStatus::Shape,
            Error::NonFinite { .. } => SvftStatus::NonFinite,
            Error::Rank { .. } | Error::InvalidArgument(_) | Error::Io { .. } | Error::File { .. } => {
                SvftStatus::InvalidArgument
            }
            Error::Svd(_) => SvftStatus::SvdFailed,
            Error::NoForward(_) => SvftStatus::NoForward,
            Error::Cuda(_) => SvftStatus::CudaError,
            Error::OutOfMemory(_) => SvftStatus::OutOfMemory,
        };
        FfiError { status, msg: e.to_string() }
    }
}

pub(crate) type FfiResult<T = ()> = Result<T, FfiError>;

thread_local! {
    /// The calling thread's last failure message, NUL-free.
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(msg: String) {
    let msg = msg.replace('\0', "\\0");
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = msg);
}

/// Runs an export's body: clears the last error, catches panics, records failures.
pub(crate) fn guard(name: &'static str, body: impl FnOnce() -> FfiResult) -> SvftStatus {
    set_last_error(String::new());
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => SvftStatus::Ok,
        Ok(Err(e)) => {
            set_last_error(format!("{name}: {}", e.msg));
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            // Dropping a payload whose Drop panics would unwind out of here: leak it instead.
            std::mem::forget(payload);
            set_last_error(format!("{name}: internal panic (a bug in svft, please report it): {what}"));
            SvftStatus::Panic
        }
    }
}

/// Copies the calling thread's last error message into `buf` (at most `buf_len` bytes including
/// the terminating NUL; longer messages are truncated and still NUL-terminated) and writes its
/// full length (without the NUL) to `out_len` when that is not NULL. `buf` may be NULL when
/// `buf_len` is 0 (to ask for the length). The message is empty after a successful call and is
/// not changed by this function, whatever it returns.
///
/// # Safety
/// `buf` must be NULL or point to `buf_len` writable bytes; `out_len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_last_error(buf: *mut c_char, buf_len: usize, out_len: *mut usize) -> SvftStatus {
    let run = || -> FfiResult {
        if buf.is_null() && buf_len > 0 {
            return fail(SvftStatus::NullPointer, "buf is NULL but buf_len > 0");
        }
        LAST_ERROR.with(|e| {
            let msg = e.borrow();
            let bytes = msg.as_bytes();
            if buf_len > 0 {
                let n = bytes.len().min(buf_len - 1);
                // SAFETY: the caller provides buf_len writable bytes at buf.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
                    *buf.add(n) = 0;
                }
            }
            if !out_len.is_null() {
                // SAFETY: checked non-null; the caller provides a writable size_t.
                unsafe { out_len.write_unaligned(bytes.len()) };
            }
        });
        Ok(())
    };
    // Not through `guard`: this call must leave the message alone.
    catch_unwind(AssertUnwindSafe(run)).map_or(SvftStatus::Panic, |r| r.map_or_else(|e| e.status, |()| SvftStatus::Ok))
}
