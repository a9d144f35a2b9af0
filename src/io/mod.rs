//! Everything that touches bytes on disk: checkpoint reading and model source resolution.

pub mod fingerprint;
pub mod fp8;
pub mod output;
pub mod part;
pub mod reader;
pub mod source;
pub mod space;
pub mod writer;
