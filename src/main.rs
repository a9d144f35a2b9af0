//! Thin binary: parse arguments, call the library, render its events, map errors to exit codes.

use std::process::ExitCode;

use awq::error::{exit, Error, Result};
use awq::events::Event;
use clap::{CommandFactory, Parser};
use serde_json::json;

mod cli;
mod progress;
mod render;
use cli::{Cli, Command};
use progress::Progress;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // SIGINT/SIGTERM: the first asks the library to stop (it cleans up and returns
    // Interrupted → 130); a second one exits at once.
    let flag = awq::interrupt::flag();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    let json_events = matches!(&cli.command, Command::Quantize(a) if a.json);
    let result = match cli.command {
        Command::Eval(args) => run_eval(args),
        Command::Quantize(args) => run_quantize(args),
        Command::Inspect(args) => run_inspect(args),
        Command::Verify(args) => run_verify(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "awq", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK as u8),
        Err(e) => {
            eprintln!("error: {e}");
            if json_events {
                Progress::new(true, true, false).emit(
                    "error",
                    json!({"exit_code": e.exit_code(), "message": e.to_string()}),
                );
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run_eval(args: cli::EvalArgs) -> Result<()> {
    let dir = awq::io::source::resolve(&args.source.model, args.source.revision.as_deref())?;
    let model = awq::model::Model::open(&dir)?;
    let tok = awq::tokenize::load(&dir)?;
    let bytes = std::fs::read(&args.text).map_err(|e| Error::input_io(&args.text, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| awq::input_err!("{} is not UTF-8: {e}", args.text.display()))?;
    let progress = Progress::new(args.quiet, false, false);
    let sink = |ev: &Event| progress.handle(ev);
    sink(&Event::Phase { name: "tokenize" });
    let ids = awq::tokenize::encode(&tok, &text, false)?;
    let opts = awq::eval::EvalOptions {
        seqlen: args.seqlen,
        max_tokens: args.max_tokens,
    };
    let ids = awq::eval::windows(&ids, &opts)?;
    let res = awq::eval::perplexity(&model, &ids, args.seqlen, &sink)?;
    if args.json {
        let json = serde_json::json!({
            "model": args.source.model,
            "text": args.text,
            "perplexity": res.perplexity,
            "tokens": res.tokens,
            "predicted": res.predicted,
            "windows": res.window_nll.len(),
            "seqlen": res.seqlen,
            "window_nll": res.window_nll,
            "seconds": res.seconds,
        });
        println!("{json}");
    } else {
        println!(
            "perplexity {:.6} over {} predicted tokens ({} windows of {}) in {:.1}s",
            res.perplexity,
            res.predicted,
            res.window_nll.len(),
            res.seqlen,
            res.seconds
        );
    }
    Ok(())
}

fn run_quantize(args: cli::QuantizeArgs) -> Result<()> {
    use awq::quant::pack::Layout;
    use awq::quant::search::Grid;
    if args.search_blocks == Some(0) {
        return Err(Error::Usage("--search-blocks must be at least 1".into()));
    }
    let layout_choice = match args.version {
        cli::VersionArg::Auto => {
            let workload = match args.workload {
                cli::WorkloadArg::Batch => awq::gpu::Workload::Batch,
                cli::WorkloadArg::Single => awq::gpu::Workload::Single,
            };
            let choice = awq::gpu::choose(awq::gpu::detect(), workload)?;
            if !args.quiet {
                eprintln!("[awq] --version auto: {}", choice.reason);
                if let Some(w) = &choice.warning {
                    eprintln!("warning: {w}");
                }
            }
            Some(choice)
        }
        _ => None,
    };
    let quality_gate = match &args.eval_text {
        Some(text) => Some(awq::quantize::QualityGate {
            text: text.clone(),
            max_increase_pct: match &args.max_ppl_increase {
                Some(p) => cli::parse_percent(p).ok_or_else(|| {
                    Error::Usage(format!(
                        "--max-ppl-increase {p:?} is not a percentage like 5%"
                    ))
                })?,
                None => f64::INFINITY,
            },
            max_tokens: args.eval_max_tokens,
        }),
        None => None,
    };
    let shard_size = cli::parse_size(&args.shard_size).ok_or_else(|| {
        Error::Usage(format!(
            "--shard-size {:?} is not a size like 5GB or 500MB",
            args.shard_size
        ))
    })?;
    let opts = awq::quantize::QuantizeOptions {
        model: args.source.model,
        revision: args.source.revision,
        output: args.output,
        w_bit: args.w_bit,
        group: args.group,
        layout: match (args.version, &layout_choice) {
            (_, Some(choice)) => choice.layout,
            (cli::VersionArg::Gemv, None) => Layout::Gemv,
            _ => Layout::Gemm,
        },
        layout_choice,
        dry_run: args.dry_run,
        resume: args.resume,
        quality_gate,
        calib: awq::calib::CalibOptions {
            files: args.calib,
            text_column: args.text_column,
            n_samples: args.n_samples,
            seqlen: args.seqlen,
            seed: args.seed,
            max_blocks: args.max_blocks,
        },
        grid: match args.grid {
            cli::GridArg::Robust => Grid::Robust,
            cli::GridArg::Autoawq => Grid::Autoawq,
        },
        n_grid: args.n_grid,
        clip: !args.no_clip,
        no_search: args.no_search,
        search_blocks: args
            .search_blocks
            .or(args.fast.then_some(awq::quantize::FAST_SEARCH_BLOCKS)),
        shard_size,
        force: args.force,
    };
    let progress = Progress::new(args.quiet, args.json, args.verbose);
    let sink = |ev: &Event| progress.handle(ev);
    let report = match awq::quantize::run(&opts, &sink)? {
        awq::quantize::Outcome::DryRun(plan) => {
            if args.json {
                progress.emit("done", json!({"dry_run": true}));
            } else {
                render::plan(&plan);
            }
            return Ok(());
        }
        awq::quantize::Outcome::Done(report) => report,
    };
    let w = &report.work;
    if args.json {
        progress.emit(
            "done",
            json!({
                "output": opts.output,
                "files": report.files,
                "calibration": report.calibration,
                "seconds": report.seconds_total,
                "work": w,
                "quality": report.quality,
            }),
        );
    } else {
        render::summary(&report, &opts.output);
    }
    if let Some(q) = report.quality.as_ref().filter(|q| !q.passed) {
        return Err(Error::Quality(format!(
            "quality gate failed: perplexity rose {:.2}% (from {:.4} to {:.4}), more than --max-ppl-increase {}%; \
             the checkpoint was written to {} for inspection",
            q.increase_pct,
            q.fp_perplexity,
            q.quantized_perplexity,
            q.max_increase_pct,
            opts.output.display()
        )));
    }
    Ok(())
}

fn run_inspect(args: cli::InspectArgs) -> Result<()> {
    let s = awq::inspect::inspect(&args.dir)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&s).map_err(|e| Error::Runtime(e.to_string()))?
        );
        return Ok(());
    }
    render::inspect(&s);
    Ok(())
}

fn run_verify(args: cli::VerifyArgs) -> Result<()> {
    let r = awq::verify::verify(&args.dir)?;
    let tp_ok = args.tp.map(|tp| {
        r.tensor_parallel
            .iter()
            .find(|t| t.tp == tp)
            .is_some_and(|t| t.vllm_awq)
    });
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| Error::Runtime(e.to_string()))?
        );
    } else {
        render::verify(&r);
    }
    if !r.ok {
        return Err(Error::Quality(format!(
            "{}: {} violation(s), first: {}",
            r.dir,
            r.violations.len(),
            r.violations.first().map_or("", String::as_str)
        )));
    }
    if tp_ok == Some(false) {
        return Err(Error::Quality(format!(
            "{}: vLLM cannot load it at tensor-parallel degree {}",
            r.dir,
            args.tp.unwrap_or(0)
        )));
    }
    Ok(())
}
