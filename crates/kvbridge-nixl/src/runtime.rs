//! Finding and loading the NIXL runtime. nixl-sys (feature `stub-api`) `dlopen`s
//! `libnixl_capi.so` on first use and **aborts** if it is missing, so every entry point
//! of this crate calls [`ensure_loaded`] first, which returns a typed error instead.
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::NixlError;

const LIB: &str = "libnixl_capi.so";

static LOADED: OnceLock<Result<PathBuf, Vec<String>>> = OnceLock::new();

/// Directories searched, in order: `KVBRIDGE_NIXL_LIB_DIR`, `NIXL_LIB_DIR`, the
/// `hint` (the Python layer passes the installed `nixl_cu12` package's libs dir), then the
/// plain loader path (`LD_LIBRARY_PATH`, rpath).
fn candidates(hint: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for var in ["KVBRIDGE_NIXL_LIB_DIR", "NIXL_LIB_DIR"] {
        if let Some(v) = std::env::var_os(var) {
            if !v.is_empty() {
                out.push(PathBuf::from(v).join(LIB));
            }
        }
    }
    if let Some(h) = hint {
        out.push(h.join(LIB));
    }
    out
}

fn dlopen_global(path: &str) -> Result<(), String> {
    let c = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: plain dlopen of a shared library; RTLD_GLOBAL makes its soname visible so
    // nixl-sys's later dlopen("libnixl_capi.so") resolves to this already-loaded copy.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let err = unsafe { libc::dlerror() };
        let msg = if err.is_null() {
            "unknown dlopen error".to_string()
        } else {
            unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned()
        };
        return Err(format!("{path}: {msg}"));
    }
    Ok(())
}

/// Make sure `libnixl_capi.so` is loaded; never aborts. Idempotent (the first call's
/// outcome is final for the process, as nixl-sys caches its own dlopen).
pub fn ensure_loaded(hint: Option<&Path>) -> Result<PathBuf, NixlError> {
    let r = LOADED.get_or_init(|| {
        let mut searched = Vec::new();
        for c in candidates(hint) {
            let s = c.to_string_lossy().into_owned();
            if c.is_file() {
                match dlopen_global(&s) {
                    Ok(()) => return Ok(c),
                    Err(e) => searched.push(e),
                }
            } else {
                searched.push(format!("{s} (absent)"));
            }
        }
        // Last: whatever the loader finds by name (LD_LIBRARY_PATH, rpath).
        match dlopen_global(LIB) {
            Ok(()) => Ok(PathBuf::from(LIB)),
            Err(e) => {
                searched.push(e);
                Err(searched)
            }
        }
    });
    match r {
        Ok(p) => {
            // The library is loaded; nixl-sys's own dlopen will now succeed.
            if nixl_sys::is_stub() {
                return Err(NixlError::RuntimeMissing {
                    searched: vec![format!("{} loaded but nixl-sys still reports stub mode", p.display())],
                });
            }
            Ok(p.clone())
        }
        Err(s) => Err(NixlError::RuntimeMissing { searched: s.clone() }),
    }
}

/// True if the runtime can be loaded (without aborting when it cannot).
pub fn available(hint: Option<&Path>) -> bool {
    ensure_loaded(hint).is_ok()
}
