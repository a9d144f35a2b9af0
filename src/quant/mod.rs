//! Pure quantization functions: round-to-nearest (AutoAWQ-exact), the AWQ scale search, the
//! clipping search, error-feedback (GPTQ) rounding and the packed layouts. No I/O, no model
//! knowledge.

pub mod clip;
pub mod gptq;
pub mod pack;
pub mod pack_quantized;
pub mod reduce;
pub mod rtn;
pub mod search;
