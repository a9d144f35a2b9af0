//! Progress events. The library never prints: it hands events to a sink chosen by the caller
//! (the CLI renders them as a bar, plain lines or JSON).

#[derive(Debug, Clone)]
pub enum Event {
    /// A named phase started (e.g. "tokenize", "embed", "head").
    Phase { name: &'static str },
    /// Decoder layer `index` (0-based) of `total` finished in `seconds`.
    Layer {
        index: usize,
        total: usize,
        seconds: f64,
    },
}

/// Where events go. `&|_| {}` discards them.
pub type Sink<'a> = &'a (dyn Fn(&Event) + Sync);
