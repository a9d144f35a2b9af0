//! Thin binary: parse arguments, call the library, render its events, map errors to exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;

use awq::error::{exit, Error, Result};
use awq::events::Event;
use clap::Parser;

mod cli;
use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(args) => run_eval(args),
        Command::Quantize(args) => run_quantize(args),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK as u8),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Plain progress lines on stderr (one per layer); silent with `--quiet`.
fn progress(quiet: bool) -> impl Fn(&Event) + Sync {
    let tty = std::io::stderr().is_terminal();
    move |ev: &Event| {
        if quiet {
            return;
        }
        match ev {
            Event::Phase { name } => eprintln!("[awq] {name}"),
            Event::Layer {
                index,
                total,
                seconds,
            } => {
                if tty || index + 1 == *total || index % 5 == 0 {
                    eprintln!("[awq] layer {}/{} {:.2}s", index + 1, total, seconds)
                }
            }
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
    let sink = progress(args.quiet);
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
        layout: match args.version {
            cli::VersionArg::Gemm => Layout::Gemm,
            cli::VersionArg::Gemv => Layout::Gemv,
        },
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
    let sink = progress(args.quiet);
    let report = awq::quantize::run(&opts, &sink)?;
    if args.json {
        let json = serde_json::json!({
            "output": opts.output,
            "files": report.files,
            "calibration": report.calibration,
            "seconds": report.seconds_total,
            "work": report.work,
        });
        println!("{json}");
    } else {
        let w = &report.work;
        let p = &w.seconds;
        println!(
            "wrote {} ({} layers, {} calibration blocks of {}) in {:.1}s\n\
             time: calibration {:.1}s, load {:.1}s, forward {:.1}s, search {:.1}s, clip {:.1}s, quantize+pack {:.1}s, write {:.1}s\n\
             matmul: {:.0} GFLOP in {:.1}s ({:.0} GFLOP/s, {:.0}% of the run); peak RSS {}",
            opts.output.display(),
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
    }
    Ok(())
}
