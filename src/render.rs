//! Human-readable output of the commands on stdout (the JSON forms are serialized directly).
//! Every function writes to the writer it is given and returns the write error, so that a
//! closed stdout (`awq inspect DIR | head -1`) ends the command quietly instead of panicking.

use std::io::{self, Write};
use std::path::Path;

use awq::inspect::Summary;
use awq::quantize::{Plan, Report};
use awq::verify::VerifyReport;

/// `--dry-run`: the resolved plan.
/// Lines that differ only in an expert index (`experts.7.` → `experts.*.`) become one line with
/// `×count`, in first-seen order.
fn collapse_experts(lines: impl Iterator<Item = String>) -> Vec<String> {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for line in lines {
        let key = awq::model::arch::expert_pattern(&line);
        match kinds.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => kinds.push((key, 1)),
        }
    }
    kinds
        .into_iter()
        .map(|(k, n)| if n > 1 { format!("{k} ×{n}") } else { k })
        .collect()
}

pub fn plan(w: &mut impl Write, plan: &Plan) -> io::Result<()> {
    writeln!(w, "dry run: nothing written")?;
    writeln!(
        w,
        "model        {} ({}, {} layers)",
        plan.model_dir.display(),
        plan.architecture,
        plan.layers
    )?;
    if let Some(v) = &plan.vision {
        writeln!(
            w,
            "vision       {}: {:.1} M parameters, {:.1} MB, stay float (copied unchanged; only the \
             text decoder is quantized)",
            v.modules
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            v.parameters() as f64 / 1e6,
            v.bytes() as f64 / 1e6
        )?;
    }
    if let Some([rows, cols]) = plan.fp8_block {
        writeln!(
            w,
            "source       fp8 (e4m3, one scale per {rows}×{cols} block): dequantized on load, one \
             layer (one expert) at a time; the output keeps no trace of fp8"
        )?;
    }
    if plan.mtp_layers_left_out > 0 {
        writeln!(
            w,
            "mtp          {} multi-token-prediction layer(s) left out (see the README)",
            plan.mtp_layers_left_out
        )?;
    }
    let cal = &plan.calibration;
    // With --split-long, documents_used counts pieces: say so rather than "89 of 20 documents".
    let used = if cal.documents_split > 0 {
        format!(
            "{} pieces from {} documents, {} split by --split-long",
            cal.documents_used, cal.documents_read, cal.documents_split
        )
    } else {
        format!("{} of {} documents", cal.documents_used, cal.documents_read)
    };
    let skipped = match cal.documents_skipped {
        0 => String::new(),
        n => format!(", {n} null records skipped"),
    };
    writeln!(
        w,
        "calibration  {} ({used}{skipped}, {} blocks of {} = {} tokens)",
        cal.source, cal.blocks, cal.seqlen, cal.tokens
    )?;
    writeln!(
        w,
        "quantization {}-bit, group {}, {}{}",
        plan.w_bit,
        plan.group,
        plan.layout.name(),
        plan.layout_reason
            .as_ref()
            .map_or(String::new(), |r| format!(" ({r})"))
    )?;
    // A MoE layer's experts are listed once each kind, with their count.
    let linears = collapse_experts(
        plan.linears
            .iter()
            .map(|(name, [out, inp])| format!("{name} [{out}, {inp}]")),
    );
    for line in linears {
        writeln!(w, "  linear     {line}")?;
    }
    let groups = collapse_experts(plan.scale_groups.iter().map(|(name, linears, inspect)| {
        let linears = collapse_experts(linears.iter().cloned()).join(", ");
        format!("{name}: {linears} (inspects {inspect})")
    }));
    for line in groups {
        writeln!(w, "  group      {line}")?;
    }
    if let Some(e) = &plan.experts {
        writeln!(
            w,
            "experts      {} routed per layer in {} MoE layer(s), top-{}: about {:.0} calibration \
             tokens each on average (the router decides the spread); below {} an expert keeps \
             round-to-nearest",
            e.experts, e.moe_layers, e.top_k, e.mean_tokens, e.min_tokens
        )?;
    }
    if let Some(r) = &plan.rounding {
        let moe = plan.experts.is_some();
        writeln!(w, "rounding     {}", r.words(&plan.calibration, moe))?;
    }
    writeln!(
        w,
        "output       {} (about {:.1} MB)",
        plan.output.display(),
        plan.output_bytes_estimate as f64 / 1e6
    )?;
    if let Some(b) = plan.keep_fp16_budget_bytes {
        writeln!(
            w,
            "fp16 budget  up to +{:.1} MB for the linears whose quantization hurts most (measured per layer)",
            b as f64 / 1e6
        )?;
    }
    writeln!(
        w,
        "memory       about {:.0} MiB peak",
        plan.peak_memory_estimate_mb
    )?;
    writeln!(
        w,
        "time         about {} on {} threads (rough: ±50 %)",
        duration(plan.seconds_estimate),
        rayon::current_num_threads()
    )?;
    if let Some(staging) = &plan.staging {
        writeln!(w, "staging      {staging}")?;
    }
    if let Some([a, b]) = plan.layer_range {
        writeln!(
            w,
            "shard        layers {a}..{b} of {} (the float forward through the {a} before them first)",
            plan.layers
        )?;
    }
    for s in plan.shards.iter().flatten() {
        writeln!(
            w,
            "shard {:<6} layers {}..{}: about {} ({} of it the float forward of the layers before), {:.0} MiB peak",
            s.shard,
            s.layers[0],
            s.layers[1],
            duration(s.seconds),
            duration(s.prefix_seconds),
            s.peak_memory_mb
        )?;
    }
    Ok(())
}

/// `awq quantize --shard`: the shard directory written.
pub fn shard(w: &mut impl Write, d: &awq::quantize::ShardDone) -> io::Result<()> {
    writeln!(
        w,
        "wrote shard {} (layers {}..{} of {}) in {:.1}s, {:.1}s of it the float forward of the layers before; merge the shards with awq merge",
        d.output.display(),
        d.layers[0],
        d.layers[1],
        d.total_layers,
        d.seconds,
        d.prefix_seconds
    )
}

/// `95s`, `12m05s`, `3h07m`: a duration as the progress lines and the plan show it.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=99 => format!("{s}s"),
        100..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// GFLOP for the summary: whole numbers, with two decimals below 10 (a tiny model's run is not
/// 0 GFLOP).
fn gflop(g: f64) -> String {
    match g < 10.0 {
        true => format!("{g:.2}"),
        false => format!("{g:.0}"),
    }
}

/// `awq quantize`: where the output went, where the time went, and the quality gate.
pub fn summary(out: &mut impl Write, report: &Report, output: &Path) -> io::Result<()> {
    let w = &report.work;
    let p = &w.seconds;
    writeln!(out,
            "wrote {} ({} layers, {} calibration blocks of {}) in {:.1}s\n\
             time: calibration {:.1}s, load {:.1}s, forward {:.1}s, search {:.1}s, clip {:.1}s, guard {:.1}s{}, fp16 budget {:.1}s, quantize+pack {:.1}s, write {:.1}s\n\
             matmul{}: {} GFLOP in {:.1}s ({:.0} GFLOP/s, {:.0}% of the run); peak RSS {}",
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
            p.guard,
            // Only where the check ran: a MoE model or a shard has none.
            match report.end_to_end {
                Some(_) => format!(", end-to-end check {:.1}s", p.end_to_end),
                None => String::new(),
            },
            p.fp16_budget,
            p.quantize,
            p.write,
            // A merge's phase times are the shards'; its matmuls and peak RSS are its own.
            match (&report.shards, &report.end_to_end) {
                (Some(_), Some(_)) => " (this merge's end-to-end check)",
                (Some(_), None) => " (this merge)",
                (None, _) => "",
            },
            gflop(w.matmul_gflop),
            w.matmul_seconds,
            w.matmul_gflops,
            100.0 * w.matmul_share,
            w.peak_rss_mb
                .map_or("unknown".into(), |m| format!("{m:.0} MiB")),
        )?;
    if let Some(k) = &report.kept_fp16 {
        writeln!(
            out,
            "kept unquantized ({}): {} unit(s), {} linears, +{:.2} MB of a {}% budget ({:.2} MB){}{}",
            report.float_dtype.torch_name(),
            k.units.len(),
            k.linears.len(),
            k.extra_bytes as f64 / 1e6,
            k.budget_pct,
            k.budget_bytes as f64 / 1e6,
            if k.units.is_empty() { "" } else { ": " },
            k.units.join(", ")
        )?;
    }
    writeln!(out, "rounding: {}", report.rounding_words())?;
    if let Some(e) = &report.end_to_end {
        writeln!(
            out,
            "end-to-end check: KL from the float model {:.4} as written{}, {:.4} round-to-nearest \
             (next-token loss {:.4} as written, {:.4} round-to-nearest, {:.4} float; {} predictions \
             on calibration blocks)",
            e.output().kl,
            match e.fallback {
                Some(f) => format!(
                    " (after the fallback to {}; {:.4} as quantized)",
                    f.words(),
                    e.written.kl
                ),
                None => String::new(),
            },
            e.rtn.kl,
            e.output().loss,
            e.rtn.loss,
            e.fp_loss,
            e.predictions
        )?;
    }
    if let Some(q) = &report.quality {
        writeln!(
            out,
            "quality: perplexity {:.4} → {:.4} ({:+.2}%, limit {}%) on {} tokens of {}",
            q.fp_perplexity,
            q.quantized_perplexity,
            q.increase_pct,
            q.max_increase_pct,
            q.tokens,
            q.text.display()
        )?;
    }
    Ok(())
}

/// `awq inspect`.
pub fn inspect(w: &mut impl Write, s: &Summary) -> io::Result<()> {
    let opt = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
    writeln!(w, "{}", s.dir)?;
    writeln!(
        w,
        "architecture {} — {} layers, hidden {}, intermediate {}, heads {}/{}, vocab {}",
        s.architecture.as_deref().unwrap_or("?"),
        opt(s.layers),
        opt(s.hidden_size),
        opt(s.intermediate_size),
        opt(s.attention_heads),
        opt(s.key_value_heads),
        opt(s.vocab_size)
    )?;
    match &s.quantization_config {
        Some(q) if q["quant_method"] == "compressed-tensors" => {
            let weights = &q["config_groups"]["group_0"]["weights"];
            writeln!(
                w,
                "quantization compressed-tensors {}, {}-bit {}, strategy {}, group_size {}; ignore {}",
                q["format"].as_str().unwrap_or("?"),
                weights["num_bits"],
                if weights["symmetric"] == true {
                    "symmetric"
                } else {
                    "asymmetric"
                },
                weights["strategy"].as_str().unwrap_or("?"),
                weights["group_size"],
                q["ignore"]
            )?
        }
        Some(q) => writeln!(w, "quantization {q}")?,
        None => writeln!(
            w,
            "quantization none ({})",
            s.torch_dtype.as_deref().unwrap_or("?")
        )?,
    }
    writeln!(
        w,
        "{} tensors in {} file(s), {:.1} MB: {}",
        s.tensor_count,
        s.files.len(),
        s.total_bytes as f64 / 1e6,
        s.bytes_by_dtype
            .iter()
            .map(|(d, b)| format!("{d} {:.1} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(w, "weights read: {}", s.weights)?;
    if let Some(t) = &s.text_decoder {
        writeln!(
            w,
            "text decoder {} under {}.* (head {}), quantized by awq",
            t.text_architecture,
            t.root,
            if t.tied_embeddings {
                "tied to the embedding".to_string()
            } else {
                format!("{}.weight", t.head)
            }
        )?;
    }
    if let Some(v) = &s.vision {
        for m in &v.modules {
            writeln!(
                w,
                "vision part {}: {} tensors, {:.1} M parameters, {:.1} MB ({}), stays float, copied unchanged",
                m.name,
                m.tensors,
                m.parameters as f64 / 1e6,
                m.bytes as f64 / 1e6,
                m.dtypes.join("/")
            )?;
        }
    }
    if let Some(why) = &s.unsupported {
        writeln!(w, "awq cannot quantize or evaluate it: {why}")?;
    }
    if let Some(list) = &s.stays_float {
        writeln!(w, "stays float when quantized: {}", list.join(", "))?;
    }
    for t in &s.tensors {
        writeln!(
            w,
            "  {:<60} {:<5} {:<16} {:>12}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            t.bytes
        )?;
    }
    Ok(())
}

/// `awq verify`: every violation, vLLM's verdict per tensor-parallel degree with every reason,
/// then per loader loadable or not, and the verdict for `--for` (the exit status agrees).
pub fn verify(w: &mut impl Write, r: &VerifyReport) -> io::Result<()> {
    writeln!(
        w,
        "{}: {} {} layers, group {}, {} — {} linears checked",
        r.dir,
        r.architecture,
        r.layers,
        r.group,
        r.version.to_uppercase(),
        r.linears_checked
    )?;
    if let Some(why) = &r.quality_gate_failed {
        writeln!(w, "  QUALITY GATE FAILED {why}")?;
    }
    for v in &r.violations {
        writeln!(w, "  FAIL {v}")?;
    }
    for note in &r.notes {
        writeln!(w, "  note: {note}")?;
    }
    if let Some(v) = &r.vision {
        let modules: Vec<String> = v
            .parts
            .modules
            .iter()
            .map(|m| format!("{} ({} tensors)", m.name, m.tensors))
            .collect();
        writeln!(
            w,
            "  vision parts float, matched by {}: {}",
            if r.version == "pack-quantized" {
                "ignore"
            } else {
                "modules_to_not_convert"
            },
            modules.join(", ")
        )?;
        if let Some(note) = &v.dtype_note {
            writeln!(w, "  note: {note}")?;
        }
    }
    if r.version == "gemv" {
        writeln!(
            w,
            "  tensor parallel: not applicable (vLLM and TGI load the GEMM layout only)"
        )?;
    } else {
        for t in &r.tensor_parallel {
            let ct = r.version == "pack-quantized";
            let status = match (t.vllm_awq, t.vllm_awq_marlin, ct) {
                (true, true, false) => "vLLM awq + awq_marlin",
                (true, false, false) => "vLLM awq (no Marlin)",
                (false, true, false) => "vLLM awq_marlin only (compute capability 8.0+)",
                (true, true, true) => "vLLM compressed-tensors (Marlin)",
                (true, false, true) => "vLLM compressed-tensors (Machete, Hopper only)",
                _ => "not loadable by vLLM",
            };
            writeln!(w, "  tp {}: {status}", t.tp)?;
            // Why each kernel path that does not apply refuses it.
            let marlin = match t.vllm_awq_marlin {
                false => &t.marlin_reasons[..],
                true => &[][..],
            };
            for reason in t.reasons.iter().chain(marlin) {
                writeln!(w, "         {reason}")?;
            }
        }
    }
    for t in &r.targets {
        let name = if t.target.tensor_parallel() {
            format!("{} (tp {})", t.target.name(), t.tp)
        } else {
            t.target.name().to_string()
        };
        let chosen = if t.target == r.target {
            "  [--for]"
        } else {
            ""
        };
        let status = if t.loadable {
            "loadable"
        } else {
            "not loadable"
        };
        writeln!(w, "  {name}: {status}{chosen}")?;
        for reason in &t.reasons {
            writeln!(w, "         {reason}")?;
        }
    }
    let verdict = if r.ok { "ok" } else { "FAILED" };
    let not = if r.ok { "" } else { "not " };
    let tp = if r.target.tensor_parallel() {
        format!(" at tensor-parallel degree {}", r.tp)
    } else {
        String::new()
    };
    if r.quality_gate_failed.is_some() {
        return writeln!(w, "FAILED: quality gate failed (not for shipping)");
    }
    writeln!(w, "{verdict}: {not}loadable by {}{tp}", r.target.name())
}
