//! `awq`: activation-aware weight quantization of Hugging Face checkpoints, streamed one decoder
//! layer at a time. The library never prints; progress goes through [`events`].

pub mod calib;
pub mod error;
pub mod eval;
pub mod events;
pub mod gpu;
pub mod inspect;
pub mod interrupt;
pub mod io;
pub mod model;
pub mod ops;
pub mod quant;
pub mod quantize;
pub mod tokenize;
pub mod verify;

pub use error::{Error, Result};
