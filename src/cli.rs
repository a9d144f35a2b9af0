//! Command-line definition (clap derive). Parsing only: the work is done by the library.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "awq",
    version,
    about = "Fast, offline, layer-streaming AWQ quantizer for Hugging Face checkpoints",
    after_help = "Exit codes: 0 success, 1 runtime failure, 2 usage error, 3 input missing or invalid, \
                  4 output exists, 5 verification or quality gate failed, 130 interrupted."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Perplexity of a model (fp16/bf16/f32 checkpoint) on a text file.
    #[command(
        after_help = "Example:\n  awq eval --model ./SmolLM2-135M --text wiki.valid.raw --max-tokens 8192"
    )]
    Eval(EvalArgs),
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Model directory, or a Hugging Face Hub id (org/name) resolved through the HF cache.
    #[arg(long, help_heading = "Source")]
    pub model: String,
    /// Hub revision (branch, tag or commit) when --model is a Hub id.
    #[arg(long, help_heading = "Source")]
    pub revision: Option<String>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// UTF-8 text file, read as is (newlines included) and tokenized once without special tokens.
    #[arg(long, help_heading = "Evaluation")]
    pub text: PathBuf,
    /// Window length; windows do not overlap and a partial tail window is dropped.
    #[arg(long, default_value_t = 2048, help_heading = "Evaluation")]
    pub seqlen: usize,
    /// Evaluate only the first N tokens of the text.
    #[arg(long, help_heading = "Evaluation")]
    pub max_tokens: Option<usize>,
    /// Print one JSON object on stdout and nothing else.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long, short, help_heading = "Output")]
    pub quiet: bool,
}
