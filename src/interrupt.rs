//! Cooperative interruption. The binary points SIGINT/SIGTERM at [`flag`]; long loops call
//! [`check`] between units of work (layers, search candidates), which turns a set flag into
//! [`Error::Interrupted`]. The quantize run then keeps its staging directory when it holds
//! finished layers (a rerun continues from them) and removes it otherwise; nothing half-written
//! reaches the output path, and the CLI exits 130.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// The process-wide interruption flag (for signal handlers to set).
pub fn flag() -> Arc<AtomicBool> {
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

/// `Err(Interrupted)` once the flag is set.
pub fn check() -> Result<()> {
    match FLAG.get() {
        Some(f) if f.load(Ordering::Relaxed) => Err(Error::Interrupted),
        _ => Ok(()),
    }
}

/// Runs `f` (a download: blocking network I/O that never reaches [`check`]) with a signal
/// ending the process at once (exit 130): the binary's handler exits when the flag is already
/// set, and nothing is staged yet to clean up. The flag is cleared again afterwards.
pub fn immediate<T>(f: impl FnOnce() -> T) -> T {
    let flag = flag();
    let was = flag.swap(true, Ordering::SeqCst);
    let out = f();
    if !was {
        flag.store(false, Ordering::SeqCst);
    }
    out
}
