//! Progress events. The library never prints: it hands events to a sink chosen by the caller
//! (the CLI renders them as a bar, plain lines or JSON Lines).

use crate::quantize::{LayerReport, Plan};

#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// `awq quantize` resolved everything (model, calibration, layout, estimates); sent once,
    /// before any layer.
    Plan(&'a Plan),
    /// Something the user should know that is not an error (e.g. a stale staging directory
    /// was removed).
    Notice { message: String },
    /// Something about the output the user must not miss (e.g. a float16 checkpoint whose
    /// activations overflow float16); shown even with `--quiet`.
    Warning { message: String },
    /// A named phase started (e.g. "tokenize", "embed", "head").
    Phase { name: &'static str },
    /// Decoder layer `index` (0-based) of `total` finished in `seconds`; `report` holds what
    /// quantizing it chose (scale search, guard, rounding, fp16 candidates; `None` for eval).
    Layer {
        index: usize,
        total: usize,
        seconds: f64,
        report: Option<&'a LayerReport>,
    },
}

/// Where events go. `&|_| {}` discards them.
pub type Sink<'a> = &'a (dyn Fn(&Event) + Sync);
