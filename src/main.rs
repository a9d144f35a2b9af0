//! Thin binary: parse arguments, call the library, render its events, map errors to exit codes.

use std::io::{self, BufWriter, StdoutLock, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use awq::error::{exit, Error, Result};
use awq::events::Event;
use clap::{CommandFactory, Parser};
use serde_json::json;

mod cli;
mod outcome;
mod progress;
mod render;
use cli::{Cli, Command};
use progress::Progress;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    // SIGINT/SIGTERM: the first asks the library to stop (it cleans up and returns
    // Interrupted → 130); a second one exits at once.
    let flag = awq::interrupt::flag();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    let json_events = match &cli.command {
        Command::Quantize(a) => a.json,
        Command::Merge(a) => a.json,
        _ => false,
    };
    // eval, inspect and verify print one JSON object: on an error before it, that object is
    // the error, so `awq verify --json DIR | jq .ok` never reads an empty stream.
    let json_object = match &cli.command {
        Command::Eval(a) => a.json,
        Command::Inspect(a) => a.json,
        Command::Verify(a) => a.json,
        _ => false,
    };
    let result = match cli.command {
        Command::Eval(args) => run_eval(args),
        Command::Quantize(args) => run_quantize(*args),
        Command::Merge(args) => run_merge(args),
        Command::Inspect(args) => run_inspect(args),
        Command::Verify(args) => run_verify(args),
        Command::Completions { shell } => run_completions(shell),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK as u8),
        // stdout's reader went away (`awq inspect DIR | head -1`): end quietly, as ripgrep and
        // cargo do. Any other error keeps its exit code.
        Err(Error::StdoutClosed) => ExitCode::from(exit::OK as u8),
        Err(e) => {
            eprintln!("error: {e}");
            if json_events {
                let mut event = json!({"exit_code": e.exit_code(), "message": e.to_string()});
                if let Error::GateFailed {
                    rejected_output, ..
                } = &e
                {
                    event["rejected_output"] = json!(rejected_output);
                }
                Progress::new(true, true, false).emit("error", event);
            }
            if json_object && !STDOUT_WRITTEN.load(Ordering::Relaxed) {
                let error =
                    json!({"ok": false, "exit_code": e.exit_code(), "error": e.to_string()});
                let _ = to_stdout(|w| writeln!(w, "{error}"));
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// A command line clap refused (exit 2). With `--json`, stdout gets what the command would
/// have printed on any other error: the `error` event (quantize) or the error object.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    let help = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !help && std::env::args().any(|a| a == "--json") {
        // clap's text without its "error: " prefix and usage footer, on one line.
        let text = e.to_string();
        let body = text.split("\n\nUsage:").next().unwrap_or("");
        let body = body.split("\n\nFor more information").next().unwrap_or("");
        let message = body
            .trim_start_matches("error: ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let exit_code = e.exit_code();
        match std::env::args().nth(1).as_deref() {
            Some("quantize" | "merge") => Progress::new(true, true, false)
                .emit("error", json!({"exit_code": exit_code, "message": message})),
            _ => println!(
                "{}",
                json!({"ok": false, "exit_code": exit_code, "error": message})
            ),
        }
    }
    e.exit()
}

/// Set once a write to stdout failed because its reader went away (EPIPE).
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether stdout's reader went away (later writes are skipped).
fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// Set once a command has written its result to stdout.
static STDOUT_WRITTEN: AtomicBool = AtomicBool::new(false);

/// Writes a command's output through `f` to stdout (buffered, flushed at the end), with write
/// errors as [`Error`]s (see [`stdout_error`]) instead of `println!`'s panic.
pub(crate) fn to_stdout(
    f: impl FnOnce(&mut BufWriter<StdoutLock<'static>>) -> io::Result<()>,
) -> Result<()> {
    STDOUT_WRITTEN.store(true, Ordering::Relaxed);
    let mut out = BufWriter::new(io::stdout().lock());
    f(&mut out).and_then(|()| out.flush()).map_err(stdout_error)
}

/// The error for a failed write to stdout. A closed stdout (EPIPE) is remembered, so that a
/// quantize run emitting `--json` events goes on without them (the checkpoint is its result).
fn stdout_error(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        return Error::StdoutClosed;
    }
    Error::Runtime(format!("cannot write to stdout: {e}"))
}

fn run_completions(shell: clap_complete::Shell) -> Result<()> {
    // Generated in memory: clap_complete panics on a failed write.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "awq", &mut script);
    to_stdout(|w| w.write_all(&script))
}

fn run_eval(args: cli::EvalArgs) -> Result<()> {
    let dir = awq::io::source::resolve(&args.source.model, args.source.revision.as_deref())?;
    let mut model = awq::model::Model::open(&dir)?;
    model.spec.serve_dtype = args.dtype.rounding();
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
    let ids = awq::eval::windows(&ids, &opts)
        .map_err(|e| awq::input_err!("--text {}: {e}", args.text.display()))?;
    if let Some(max) = model.spec.max_positions.filter(|m| args.seqlen > *m) {
        sink(&Event::Warning {
            message: format!(
                "--seqlen {} is longer than the model's max_position_embeddings {max}: the \
                 perplexity measures positions it was never trained for",
                args.seqlen
            ),
        });
    }
    let res = awq::eval::perplexity(&model, &ids, args.seqlen, &sink)?;
    if args.json {
        let json = serde_json::json!({
            "ok": true,
            "model": args.source.model,
            "text": args.text,
            "perplexity": res.perplexity,
            "tokens": res.tokens,
            "predicted": res.predicted,
            "windows": res.window_nll.len(),
            "seqlen": res.seqlen,
            "dtype": args.dtype,
            "window_nll": res.window_nll,
            "seconds": res.seconds,
        });
        to_stdout(|w| writeln!(w, "{json}"))?;
    } else {
        to_stdout(|w| {
            writeln!(
                w,
                "perplexity {:.6} over {} predicted tokens ({} window{} of {}) in {:.1}s",
                res.perplexity,
                res.predicted,
                res.window_nll.len(),
                if res.window_nll.len() == 1 { "" } else { "s" },
                res.seqlen,
                res.seconds
            )
        })?;
    }
    Ok(())
}

fn run_quantize(args: cli::QuantizeArgs) -> Result<()> {
    let (quiet, json_events, verbose) = (args.quiet, args.json, args.verbose);
    let opts = awq::quantize::QuantizeOptions::try_from(args)?;
    if let (Some(choice), false) = (&opts.layout_choice, quiet) {
        eprintln!("[awq] --version auto: {}", choice.reason);
        if let Some(w) = &choice.warning {
            eprintln!("warning: {w}");
        }
    }
    let progress = Progress::new(quiet, json_events, verbose);
    let sink = |ev: &Event| progress.handle(ev);
    let outcome = awq::quantize::run(&opts, &sink)?;
    outcome::show(outcome, &opts.output, &progress, json_events)
}

fn run_merge(args: cli::MergeArgs) -> Result<()> {
    let (quiet, json_events) = (args.quiet, args.json);
    let opts = awq::quantize::MergeOptions::from(args);
    let progress = Progress::new(quiet, json_events, false);
    let sink = |ev: &Event| progress.handle(ev);
    let outcome = awq::quantize::merge(&opts, &sink)?;
    outcome::show(outcome, &opts.output, &progress, json_events)
}

fn run_inspect(args: cli::InspectArgs) -> Result<()> {
    let s = awq::inspect::inspect(&args.dir)?;
    if args.json {
        let mut json = serde_json::to_value(&s).map_err(|e| Error::Runtime(e.to_string()))?;
        if let Some(obj) = json.as_object_mut() {
            obj.insert("ok".into(), true.into());
        }
        return to_stdout(|w| writeln!(w, "{json}"));
    }
    to_stdout(|w| render::inspect(w, &s))
}

fn run_verify(args: cli::VerifyArgs) -> Result<()> {
    let opts = awq::verify::VerifyOptions {
        tp: args.tp,
        target: match args.target {
            cli::TargetArg::Vllm => awq::verify::Target::Vllm,
            cli::TargetArg::Tgi => awq::verify::Target::Tgi,
            cli::TargetArg::Transformers => awq::verify::Target::Transformers,
        },
    };
    let r = awq::verify::verify(&args.dir, &opts)?;
    let written = if args.json {
        let json = serde_json::to_string(&r).map_err(|e| Error::Runtime(e.to_string()))?;
        to_stdout(|w| writeln!(w, "{json}"))
    } else {
        to_stdout(|w| render::verify(w, &r))
    };
    // `ok` (printed above) is the verdict and the exit status follows it, also when stdout's
    // reader went away early (`awq verify DIR | head -1` under pipefail must not pass a broken
    // checkpoint).
    match r.failure() {
        Some(why) => Err(Error::Quality(why)),
        None => written,
    }
}
