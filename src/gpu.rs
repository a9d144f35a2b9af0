//! `--version auto`: pick the packed layout for the GPUs of this machine.
//!
//! Detection runs `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader` (the program
//! named by `AWQ_NVIDIA_SMI` when set, which is how tests fake GPUs). The rule:
//! no GPU visible → GEMM (the portable layout, and the only one vLLM loads); any GPU below
//! compute capability 7.5 → refuse (AWQ kernels need Turing, sm_75, or newer); otherwise GEMM,
//! or GEMV for `--workload single` (batch-1 decoding, where GEMV is faster) with a warning that
//! vLLM loads GEMM only.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::quant::pack::Layout;

/// Environment variable naming the `nvidia-smi` to run.
pub const NVIDIA_SMI_ENV: &str = "AWQ_NVIDIA_SMI";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    pub name: String,
    /// Compute capability as `major.minor`, e.g. 8.6.
    pub compute_capability: String,
}

impl Gpu {
    fn capability(&self) -> Option<(u32, u32)> {
        let (a, b) = self.compute_capability.split_once('.')?;
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Batched serving (vLLM, TGI).
    Batch,
    /// Batch-1 interactive decoding.
    Single,
}

/// What `--version auto` chose and why, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct LayoutChoice {
    pub gpus: Vec<Gpu>,
    pub layout: Layout,
    pub reason: String,
    /// Something the user should hear about (printed as a warning).
    pub warning: Option<String>,
}

/// What `nvidia-smi` said.
#[derive(Debug, Clone, Default)]
pub struct Detection {
    pub gpus: Vec<Gpu>,
    /// Why no GPU could be listed although `nvidia-smi` was found (it failed, or printed
    /// nothing it could parse): worth a warning, since a GPU may be there.
    pub problem: Option<String>,
}

impl Detection {
    /// A detection that listed `gpus` without trouble.
    pub fn listed(gpus: Vec<Gpu>) -> Self {
        Self {
            gpus,
            problem: None,
        }
    }
}

/// GPUs listed by `nvidia-smi` (or the program in `AWQ_NVIDIA_SMI`). A missing program means no
/// driver, no GPU; one that fails or prints nothing parseable is reported as a problem.
pub fn detect() -> Detection {
    let program = std::env::var(NVIDIA_SMI_ENV).unwrap_or_else(|_| "nvidia-smi".into());
    let out = std::process::Command::new(&program)
        .args(["--query-gpu=name,compute_cap", "--format=csv,noheader"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let problem = |what: String| Detection {
        gpus: Vec::new(),
        problem: Some(format!("{program} {what}")),
    };
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Detection::default(),
        Err(e) => problem(format!("could not run: {e}")),
        Ok(o) if !o.status.success() => problem(format!("failed ({})", o.status)),
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            let gpus = parse(&text);
            if gpus.is_empty() && !text.trim().is_empty() {
                problem("printed no GPU line it could read".into())
            } else {
                Detection::listed(gpus)
            }
        }
    }
}

/// Parses `name, major.minor` lines.
pub fn parse(csv: &str) -> Vec<Gpu> {
    csv.lines()
        .filter_map(|line| {
            let (name, cap) = line.rsplit_once(',')?;
            Some(Gpu {
                name: name.trim().to_string(),
                compute_capability: cap.trim().to_string(),
            })
        })
        .filter(|g| !g.name.is_empty())
        .collect()
}

pub fn choose(detection: Detection, workload: Workload) -> Result<LayoutChoice> {
    let gpus = detection.gpus;
    if gpus.is_empty() {
        let gemm = "GEMM, the portable layout and the only one vLLM loads";
        return Ok(LayoutChoice {
            gpus,
            layout: Layout::Gemm,
            reason: match &detection.problem {
                None => format!("no NVIDIA GPU visible: {gemm}"),
                Some(p) => format!("no GPU listed ({p}): {gemm}"),
            },
            warning: detection.problem.map(|p| {
                format!("{p}, so --version auto could not see the GPUs and chose GEMM; pass --version explicitly if that is wrong")
            }),
        });
    }
    for g in &gpus {
        match g.capability() {
            Some(cc) if cc >= (7, 5) => {}
            Some(_) => {
                return Err(Error::Usage(format!(
                    "--version auto: {} has compute capability {}, but AWQ kernels need Turing (sm_75) or newer; \
                     pass --version gemm to build for another machine",
                    g.name, g.compute_capability
                )))
            }
            None => {
                return Err(Error::Runtime(format!(
                    "--version auto: cannot read the compute capability {:?} of {}",
                    g.compute_capability, g.name
                )))
            }
        }
    }
    let names: Vec<String> = gpus
        .iter()
        .map(|g| format!("{} (sm_{})", g.name, g.compute_capability.replace('.', "")))
        .collect();
    Ok(match workload {
        Workload::Batch => LayoutChoice {
            reason: format!("{}: GEMM for batched serving", names.join(", ")),
            gpus,
            layout: Layout::Gemm,
            warning: None,
        },
        Workload::Single => LayoutChoice {
            reason: format!(
                "{}: GEMV for batch-1 decoding (--workload single)",
                names.join(", ")
            ),
            gpus,
            layout: Layout::Gemv,
            warning: Some(
                "GEMV checkpoints load in transformers and AutoAWQ; vLLM loads GEMM only".into(),
            ),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_lines() {
        let g = parse("NVIDIA A100-SXM4-80GB, 8.0\nTesla T4, 7.5\n\n");
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].name, "Tesla T4");
        assert_eq!(g[1].capability(), Some((7, 5)));
    }

    #[test]
    fn rule() {
        assert_eq!(
            choose(Detection::default(), Workload::Single)
                .unwrap()
                .layout,
            Layout::Gemm
        );
        let old = parse("Tesla P4, 6.1");
        assert!(matches!(
            choose(Detection::listed(old), Workload::Batch),
            Err(Error::Usage(_))
        ));
        let h100 = parse("NVIDIA H100, 9.0");
        assert_eq!(
            choose(Detection::listed(h100.clone()), Workload::Batch)
                .unwrap()
                .layout,
            Layout::Gemm
        );
        let c = choose(Detection::listed(h100), Workload::Single).unwrap();
        assert_eq!(c.layout, Layout::Gemv);
        assert!(c.warning.is_some());
    }
}
