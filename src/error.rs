//! One error type for the whole library. Each variant is a *kind* that maps to a documented
//! exit code, so `main` never has to guess from message text what went wrong.

use std::path::Path;

/// Documented process exit codes (README, `--help`).
pub mod exit {
    pub const OK: i32 = 0;
    pub const RUNTIME: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const INPUT: i32 = 3;
    pub const OUTPUT_EXISTS: i32 = 4;
    pub const QUALITY: i32 = 5;
    /// The network or the Hub failed (connection, DNS, TLS, timeout, HTTP 429/5xx): transient,
    /// so a CI job can retry exactly these.
    pub const NETWORK: i32 = 6;
    pub const INTERRUPTED: i32 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid combination of options; the user must change the command line.
    #[error("{0}")]
    Usage(String),
    /// An input (model, tokenizer, calibration or evaluation text) is missing, unreadable or invalid.
    #[error("{0}")]
    Input(String),
    /// The output path already exists and `--force` was not given.
    #[error("{0}")]
    OutputExists(String),
    /// A verification or quality gate failed.
    #[error("{0}")]
    Quality(String),
    /// The network or the Hub failed while fetching a model or dataset (retrying may help);
    /// "not found" and "not authorised" answers are [`Error::Input`].
    #[error("{0}")]
    Network(String),
    /// `awq quantize`'s quality gate failed: the checkpoint was written to `rejected_output`
    /// instead of the output (exit 5, like [`Error::Quality`]).
    #[error("{message}")]
    GateFailed {
        message: String,
        rejected_output: std::path::PathBuf,
    },
    /// The run was interrupted by a signal.
    #[error("interrupted")]
    Interrupted,
    /// The reader of stdout went away (`awq inspect DIR | head -1`): the command ends quietly
    /// with exit 0, as ripgrep and cargo do.
    #[error("stdout was closed")]
    StdoutClosed,
    /// The disk filled up (ENOSPC) while writing; exit 1 like [`Error::Runtime`], kept apart so
    /// that the finished layers are kept for a rerun, as on an interruption.
    #[error("{0}")]
    DiskFull(String),
    /// Anything else that went wrong while working (I/O on the output, numerical failure, ...).
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => exit::USAGE,
            Error::Input(_) => exit::INPUT,
            Error::OutputExists(_) => exit::OUTPUT_EXISTS,
            Error::Quality(_) | Error::GateFailed { .. } => exit::QUALITY,
            Error::Network(_) => exit::NETWORK,
            Error::Interrupted => exit::INTERRUPTED,
            Error::StdoutClosed => exit::OK,
            Error::Runtime(_) | Error::DiskFull(_) => exit::RUNTIME,
        }
    }

    /// An input file that could not be read, with the path in the message.
    pub fn input_io(path: &Path, err: std::io::Error) -> Self {
        Error::Input(format!("cannot read {}: {err}", path.display()))
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Runtime(format!("tensor operation failed: {e}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `Error::Input` built with `format!` syntax.
#[macro_export]
macro_rules! input_err {
    ($($arg:tt)*) => { $crate::error::Error::Input(format!($($arg)*)) };
}
