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
    /// Quantize a checkpoint to 4-bit AWQ (GEMM or GEMV layout).
    #[command(
        after_help = "Examples:\n  awq quantize --model ./SmolLM2-135M --group 64 --calib wiki.valid.calib.txt -o ./SmolLM2-135M-awq\n  awq quantize --model org/name --calib data.jsonl --text-column content -o out --version gemv\n\n\
vLLM loads the GEMM layout only; GEMV is for AutoAWQ/transformers batch-1 inference."
    )]
    Quantize(QuantizeArgs),
    /// Summarize a checkpoint (fp or AWQ): architecture, quantization config, tensors, sizes.
    #[command(
        after_help = "Example:\n  awq inspect ./SmolLM2-135M-awq --json | jq .quantization_config"
    )]
    Inspect(InspectArgs),
    /// Check an AWQ checkpoint against the loader rules of vLLM (awq, awq_marlin), TGI and
    /// transformers for tensor-parallel degrees 1, 2, 4, 8; dequantize and check every tensor.
    #[command(
        after_help = "Exits 0 when the checkpoint loads at tensor-parallel degree 1 (and at --tp N when given), 5 otherwise.\n\
Example:\n  awq verify ./SmolLM2-135M-awq && echo ship it"
    )]
    Verify(VerifyArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  awq completions bash > ~/.local/share/bash-completion/completions/awq"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint directory.
    pub dir: PathBuf,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// AWQ checkpoint directory.
    pub dir: PathBuf,
    /// Also require that vLLM can load the model at this tensor-parallel degree.
    #[arg(long, value_name = "N")]
    pub tp: Option<usize>,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VersionArg {
    Gemm,
    Gemv,
    /// Detect local NVIDIA GPUs: GEMM without a GPU or for batched serving, GEMV with
    /// --workload single; refuses GPUs older than Turing (sm_75).
    Auto,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum WorkloadArg {
    /// Batched serving (vLLM, TGI).
    Batch,
    /// Batch-1 interactive decoding.
    Single,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GridArg {
    /// Identity (s = 1) first, then AutoAWQ's 20 candidates: never worse than round-to-nearest.
    Robust,
    /// Exactly AutoAWQ's candidates (ratios k/20, duo scaling), for comparison.
    Autoawq,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Calibration file (.txt: documents separated by blank lines; .jsonl: one object per line). Repeatable. Default: the embedded corpus (offline).
    #[arg(long, help_heading = "Calibration")]
    pub calib: Vec<PathBuf>,
    /// Field holding the text in .jsonl calibration files.
    #[arg(long, default_value = "text", help_heading = "Calibration")]
    pub text_column: String,
    /// Documents to accept (AutoAWQ's max_calib_samples); longer than --seqlen are skipped.
    #[arg(long, default_value_t = 128, help_heading = "Calibration")]
    pub n_samples: usize,
    /// Block length in tokens (AutoAWQ's max_calib_seq_len).
    #[arg(long, default_value_t = 512, help_heading = "Calibration")]
    pub seqlen: usize,
    /// Shuffle seed for document selection (portable: same documents on every machine).
    #[arg(long, default_value_t = 42, help_heading = "Calibration")]
    pub seed: u64,
    /// Use at most this many blocks.
    #[arg(long, help_heading = "Calibration")]
    pub max_blocks: Option<usize>,
    /// Bits per weight (only 4 can be packed).
    #[arg(
        long,
        alias = "w_bit",
        default_value_t = 4,
        help_heading = "Quantization"
    )]
    pub w_bit: u8,
    /// Group size along the input dimension (must divide every in_features).
    #[arg(
        long,
        alias = "q-group-size",
        default_value_t = 128,
        help_heading = "Quantization"
    )]
    pub group: usize,
    /// Packed layout. vLLM loads GEMM only; auto picks from the local GPUs.
    #[arg(
        long,
        value_enum,
        default_value = "gemm",
        help_heading = "Quantization"
    )]
    pub version: VersionArg,
    /// Scale-search candidates.
    #[arg(
        long,
        value_enum,
        default_value = "robust",
        help_heading = "Quantization"
    )]
    pub grid: GridArg,
    /// Number of ratios in the scale grid.
    #[arg(long, default_value_t = 20, help_heading = "Quantization")]
    pub n_grid: usize,
    /// Score scale-search candidates on at most N evenly spaced calibration blocks (statistics
    /// still use all blocks). Default: all blocks (AutoAWQ's exact objective).
    #[arg(long, value_name = "N", help_heading = "Quantization")]
    pub search_blocks: Option<usize>,
    /// Preset: --search-blocks 4. Measured on SmolLM2 at 32 x 512: 6.8x faster, perplexity within 0.6% of the exact run (README).
    #[arg(long, help_heading = "Quantization")]
    pub fast: bool,
    /// Skip the clipping search.
    #[arg(long, help_heading = "Quantization")]
    pub no_clip: bool,
    /// Skip the scale search (round-to-nearest; with --no-clip, plain RTN).
    #[arg(long, help_heading = "Quantization")]
    pub no_search: bool,
    /// What --version auto optimizes for.
    #[arg(
        long,
        value_enum,
        default_value = "batch",
        help_heading = "Quantization"
    )]
    pub workload: WorkloadArg,
    /// Output directory (written to a staging directory beside it, then renamed).
    #[arg(long, short, help_heading = "Output")]
    pub output: PathBuf,
    /// Maximum shard size (e.g. 5GB, 500MB, 2GiB, bytes).
    #[arg(long, default_value = "5GB", help_heading = "Output")]
    pub shard_size: String,
    /// Replace an existing output directory.
    #[arg(long, help_heading = "Output")]
    pub force: bool,
    /// Continue a killed run from the staging directory it left beside the output (checked
    /// against a fingerprint of the model, calibration and options).
    #[arg(long, help_heading = "Output")]
    pub resume: bool,
    /// Resolve the model, calibration, layout and estimates, print the plan and write nothing.
    #[arg(long, help_heading = "Output")]
    pub dry_run: bool,
    /// Quality gate: after writing, measure fp and quantized perplexity on this text.
    #[arg(long, value_name = "FILE", help_heading = "Quality gate")]
    pub eval_text: Option<PathBuf>,
    /// Quality gate: exit 5 when the perplexity rises by more than this (e.g. 5%).
    #[arg(
        long,
        value_name = "PCT",
        requires = "eval_text",
        help_heading = "Quality gate"
    )]
    pub max_ppl_increase: Option<String>,
    /// Quality gate: evaluate the first N tokens of --eval-text.
    #[arg(long, default_value_t = 8192, help_heading = "Quality gate")]
    pub eval_max_tokens: usize,
    /// JSON Lines events on stdout (start, layer, done; schema in the README); nothing else there.
    #[arg(long, help_heading = "Runtime")]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long, short, help_heading = "Runtime")]
    pub quiet: bool,
    /// More detail in the progress lines (phase timings per layer).
    #[arg(long, short, help_heading = "Runtime")]
    pub verbose: bool,
}

/// "5%" or "5" → 5.0.
pub fn parse_percent(s: &str) -> Option<f64> {
    let v: f64 = s.trim().trim_end_matches('%').trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v)
}

/// "5GB" → 5_000_000_000; KB/MB/GB are decimal, KiB/MiB/GiB binary.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (v >= 1.0).then_some(v as u64)
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
    #[arg(long, default_value_t = awq::eval::DEFAULT_SEQLEN, help_heading = "Evaluation")]
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
