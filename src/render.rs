//! Human-readable output of the commands on stdout (the JSON forms are serialized directly).

use std::path::Path;

use awq::inspect::Summary;
use awq::quantize::{Plan, Report};
use awq::verify::VerifyReport;

/// `--dry-run`: the resolved plan.
pub fn plan(plan: &Plan) {
    println!("dry run: nothing written");
    println!(
        "model        {} ({}, {} layers)",
        plan.model_dir.display(),
        plan.architecture,
        plan.layers
    );
    println!(
        "calibration  {} ({} of {} documents, {} blocks of {} = {} tokens)",
        plan.calibration.source,
        plan.calibration.documents_used,
        plan.calibration.documents_read,
        plan.calibration.blocks,
        plan.calibration.seqlen,
        plan.calibration.tokens
    );
    println!(
        "quantization {}-bit, group {}, {}{}",
        plan.w_bit,
        plan.group,
        plan.layout.name(),
        plan.layout_reason
            .as_ref()
            .map_or(String::new(), |r| format!(" ({r})"))
    );
    for (name, [out, inp]) in &plan.linears {
        println!("  linear     {name} [{out}, {inp}]");
    }
    for (name, linears, inspect) in &plan.scale_groups {
        println!(
            "  group      {name}: {} (inspects {inspect})",
            linears.join(", ")
        );
    }
    println!(
        "output       {} (about {:.1} MB)",
        plan.output.display(),
        plan.output_bytes_estimate as f64 / 1e6
    );
    println!(
        "memory       about {:.0} MB peak",
        plan.peak_memory_estimate_mb
    );
}

/// `awq quantize`: where the output went, where the time went, and the quality gate.
pub fn summary(report: &Report, output: &Path) {
    let w = &report.work;
    let p = &w.seconds;
    println!(
            "wrote {} ({} layers, {} calibration blocks of {}) in {:.1}s\n\
             time: calibration {:.1}s, load {:.1}s, forward {:.1}s, search {:.1}s, clip {:.1}s, quantize+pack {:.1}s, write {:.1}s\n\
             matmul: {:.0} GFLOP in {:.1}s ({:.0} GFLOP/s, {:.0}% of the run); peak RSS {}",
            output.display(),
            report.layers.len(),
            report.calibration.blocks,
            report.calibration.seqlen,
            report.seconds_total,
            w.calibration_seconds,
            p.load,
            p.forward,
            p.search,
            p.clip,
            p.quantize,
            p.write,
            w.matmul_gflop,
            w.matmul_seconds,
            w.matmul_gflops,
            100.0 * w.matmul_share,
            w.peak_rss_mb
                .map_or("unknown".into(), |m| format!("{m:.0} MB")),
        );
    if let Some(q) = &report.quality {
        println!(
            "quality: perplexity {:.4} → {:.4} ({:+.2}%, limit {}%) on {} tokens of {}",
            q.fp_perplexity,
            q.quantized_perplexity,
            q.increase_pct,
            q.max_increase_pct,
            q.tokens,
            q.text.display()
        );
    }
}

/// `awq inspect`.
pub fn inspect(s: &Summary) {
    let opt = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
    println!("{}", s.dir);
    println!(
        "architecture {} — {} layers, hidden {}, intermediate {}, heads {}/{}, vocab {}",
        s.architecture.as_deref().unwrap_or("?"),
        opt(s.layers),
        opt(s.hidden_size),
        opt(s.intermediate_size),
        opt(s.attention_heads),
        opt(s.key_value_heads),
        opt(s.vocab_size)
    );
    match &s.quantization_config {
        Some(q) => println!("quantization {q}"),
        None => println!(
            "quantization none ({})",
            s.torch_dtype.as_deref().unwrap_or("?")
        ),
    }
    println!(
        "{} tensors in {} file(s), {:.1} MB: {}",
        s.tensor_count,
        s.files.len(),
        s.total_bytes as f64 / 1e6,
        s.bytes_by_dtype
            .iter()
            .map(|(d, b)| format!("{d} {:.1} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for t in &s.tensors {
        println!(
            "  {:<60} {:<5} {:<16} {:>12}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            t.bytes
        );
    }
}

/// `awq verify`: violations, then loadability per tensor-parallel degree.
pub fn verify(r: &VerifyReport) {
    println!(
        "{}: {} {} layers, group {}, {} — {} linears checked",
        r.dir, r.architecture, r.layers, r.group, r.version, r.linears_checked
    );
    for v in &r.violations {
        println!("  FAIL {v}");
    }
    for t in &r.tensor_parallel {
        let status = match (t.vllm_awq, t.vllm_awq_marlin) {
            (true, true) => "vLLM awq + awq_marlin",
            (true, false) => "vLLM awq (no Marlin)",
            _ => "not loadable",
        };
        println!("  tp {}: {status}", t.tp);
        if !t.vllm_awq || !t.vllm_awq_marlin {
            for reason in t.reasons.iter().take(3) {
                println!("         {reason}");
            }
        }
    }
    println!("  loaders: {}", r.loaders.join(", "));
    println!("{}", if r.ok { "ok" } else { "FAILED" });
}
