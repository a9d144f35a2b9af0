//! Command-line definition (clap derive). Parsing only: the work is done by the library.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "awq",
    version,
    about = "Fast, offline, layer-streaming AWQ quantizer for Hugging Face checkpoints",
    after_help = "Exit codes: 0 success, 1 runtime failure, 2 usage error, 3 input missing or invalid, \
                  4 output exists, 5 verification or quality gate failed, 6 network or Hub failure \
                  (retry), 130 interrupted."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Perplexity of a model (fp16/bf16/f32 checkpoint, or an AWQ output) on a text file.
    #[command(
        after_help = "Example:\n  awq eval --model ./SmolLM2-135M --text wiki.valid.raw --max-tokens 8192"
    )]
    Eval(EvalArgs),
    /// Quantize a checkpoint to 4-bit AWQ (GEMM or GEMV layout, or compressed-tensors).
    #[command(
        after_help = "Examples:\n  awq quantize --model ./SmolLM2-135M --group 64 --calib wiki.valid.calib.txt -o ./SmolLM2-135M-awq\n  awq quantize --model org/name --calib data.jsonl --text-column content -o out --version gemv\n  awq quantize --model org/name -o out --format compressed-tensors\n\n\
vLLM loads the GEMM layout only; GEMV is for AutoAWQ/transformers batch-1 inference;\n\
compressed-tensors loads in vLLM and in transformers with the compressed-tensors package."
    )]
    Quantize(Box<QuantizeArgs>),
    /// Summarize a checkpoint (fp or AWQ): architecture, quantization config, tensors, sizes.
    #[command(
        after_help = "Example:\n  awq inspect ./SmolLM2-135M-awq --json | jq .quantization_config"
    )]
    Inspect(InspectArgs),
    /// Check an AWQ checkpoint against the loader rules of vLLM (awq, awq_marlin), TGI and
    /// transformers for tensor-parallel degrees 1, 2, 4, 8 (and --tp N); dequantize and check
    /// every tensor.
    #[command(
        after_help = "Exits 0 when the --for loader (default vllm) loads the checkpoint at tensor-parallel degree --tp (default 1), 5 otherwise (also when its quality gate failed), 3 when DIR is not an AWQ checkpoint; the printed verdict agrees.\n\
vLLM and TGI load the GEMM layout only; GEMV loads in transformers (with the autoawq package) and AutoAWQ: check it with --for transformers.\n\
Examples:\n  awq verify ./SmolLM2-135M-awq && echo ship it\n  awq verify ./model-awq --tp 4 --json | jq .ok\n  awq verify ./model-awq-gemv --for transformers"
    )]
    Verify(VerifyArgs),
    /// Merge the shard directories of one split job (awq quantize --shard) into the
    /// checkpoint a single run writes, byte for byte.
    #[command(
        after_help = "Checks the set first (same fingerprint, every layer exactly once and finished, no overlap with -o; exit 2/3, nothing written). Merging again is idempotent (exit 0 when -o already holds it).\n\
Examples:\n  awq merge shards/0 shards/1 shards/2 -o ./model-awq\n  awq merge shards/* -o ./model-awq --eval-text held-out.txt --max-ppl-increase 5%"
    )]
    Merge(MergeArgs),
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
pub struct MergeArgs {
    /// Shard directories (written by awq quantize --shard/--layers), in any order.
    #[arg(required = true, value_name = "SHARD_DIR")]
    pub shards: Vec<PathBuf>,
    /// The merged checkpoint's directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an existing output that is an earlier awq output of other settings.
    #[arg(long)]
    pub force: bool,
    /// The source model's directory on this machine, when it is not where the shards read it
    /// (its contents must be the same).
    #[arg(long)]
    pub model: Option<String>,
    /// Quality gate: measure fp and merged perplexity on this text.
    #[arg(long, value_name = "FILE")]
    pub eval_text: Option<PathBuf>,
    /// Quality gate: exit 5 (the checkpoint kept at OUT.rejected) when the perplexity rises by
    /// more than this (needs --eval-text).
    #[arg(long, value_name = "PCT", value_parser = parse_percent, requires = "eval_text")]
    pub max_ppl_increase: Option<f64>,
    /// Quality gate: evaluate the first N (≥ 2) tokens of --eval-text.
    #[arg(long, default_value_t = 8192, value_parser = at_least(2))]
    pub eval_max_tokens: usize,
    /// JSON Lines events on stdout, as awq quantize --json.
    #[arg(long)]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

impl From<MergeArgs> for awq::quantize::MergeOptions {
    fn from(a: MergeArgs) -> Self {
        Self {
            shards: a.shards,
            output: a.output,
            force: a.force,
            model: a.model,
            quality_gate: a.eval_text.map(|text| awq::quantize::QualityGate {
                text,
                max_increase_pct: a.max_ppl_increase.unwrap_or(f64::INFINITY),
                max_tokens: a.eval_max_tokens,
            }),
        }
    }
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
    /// Require that the target loads the model at this tensor-parallel degree (any N >= 1;
    /// vllm and tgi only). Default: 1.
    #[arg(long, value_name = "N", value_parser = parse_tp)]
    pub tp: Option<usize>,
    /// The loader that must load it: vllm and tgi load the GEMM layout only; transformers
    /// (with the autoawq package) loads GEMM and GEMV.
    #[arg(
        long = "for",
        value_name = "LOADER",
        value_enum,
        ignore_case = true,
        default_value = "vllm"
    )]
    pub target: TargetArg,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `awq verify --for`: the loader whose rules decide the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetArg {
    /// vLLM (`--quantization awq` / `awq_marlin`): GEMM only.
    Vllm,
    /// Text Generation Inference: GEMM only.
    Tgi,
    /// transformers with the autoawq package (or AutoAWQ): GEMM and GEMV, one rank.
    Transformers,
}

/// `--tp`: a tensor-parallel degree, at least 1 (0 is a usage error, exit 2).
fn parse_tp(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("the tensor-parallel degree must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a number of ranks: {e}")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VersionArg {
    Gemm,
    Gemv,
    /// Detect local NVIDIA GPUs: GEMM without a GPU or for batched serving, GEMV with
    /// --workload single; refuses GPUs older than Turing (sm_75).
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// AutoAWQ's GEMM or GEMV layout (`quant_method: awq`).
    Awq,
    /// compressed-tensors `pack-quantized` (`quant_method: compressed-tensors`).
    CompressedTensors,
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
    /// Calibration file or Hub dataset, repeatable: .txt (documents separated by blank lines), .json (array of strings or objects), .jsonl (one object per line), .parquet, chat records ("messages", rendered with the model's chat template), other extensions sniffed; or org/name[:split] (a Hub dataset's parquet files, default split train). Default: the embedded corpus (offline).
    #[arg(long, help_heading = "Calibration")]
    pub calib: Vec<PathBuf>,
    /// Field holding the text in .json/.jsonl/.parquet calibration records (records without it but with "messages" are conversations).
    #[arg(long, default_value = "text", help_heading = "Calibration")]
    pub text_column: String,
    /// Cut documents longer than --seqlen into pieces instead of dropping them (AutoAWQ drops them).
    #[arg(long, help_heading = "Calibration")]
    pub split_long: bool,
    /// Documents to accept, at least 1 (AutoAWQ's max_calib_samples); longer than --seqlen are skipped.
    #[arg(long, default_value_t = 128, value_parser = at_least(1), help_heading = "Calibration")]
    pub n_samples: usize,
    /// Block length in tokens, at least 1 (AutoAWQ's max_calib_seq_len).
    #[arg(long, default_value_t = 512, value_parser = at_least(1), help_heading = "Calibration")]
    pub seqlen: usize,
    /// Shuffle seed for document selection (portable: same documents on every machine).
    #[arg(long, default_value_t = 42, help_heading = "Calibration")]
    pub seed: u64,
    /// Use at most this many blocks (at least 1). Default: every block the samples fill.
    #[arg(long, value_parser = at_least(1), help_heading = "Calibration")]
    pub max_blocks: Option<usize>,
    /// Bits per weight (only 4 can be packed).
    #[arg(
        long,
        alias = "w_bit",
        default_value_t = 4,
        help_heading = "Quantization"
    )]
    pub w_bit: u8,
    /// Group size along the input dimension: it must divide every linear's in_features. 128 is
    /// AutoAWQ's default; models whose hidden size is not a multiple of 128 need 64 or 32
    /// (smaller groups: better quality, larger files). The error names the sizes that fit.
    #[arg(
        long,
        alias = "q-group-size",
        default_value_t = 128,
        value_parser = at_least(1),
        help_heading = "Quantization"
    )]
    pub group: usize,
    /// What the checkpoint is written as: awq (AutoAWQ's layout, see --version) or
    /// compressed-tensors (pack-quantized W4A16 asymmetric, as llm-compressor writes it, which
    /// vLLM loads with its Marlin/Machete kernels). The search and the weights are the same.
    #[arg(
        long,
        value_enum,
        default_value = "awq",
        value_name = "FORMAT",
        help_heading = "Quantization"
    )]
    pub format: FormatArg,
    /// Packed layout of --format awq. vLLM loads GEMM only; auto picks from the local GPUs.
    #[arg(
        long,
        value_enum,
        ignore_case = true,
        default_value = "gemm",
        help_heading = "Quantization"
    )]
    pub version: VersionArg,
    /// Scale-search candidates.
    #[arg(
        long,
        value_enum,
        ignore_case = true,
        default_value = "robust",
        help_heading = "Quantization"
    )]
    pub grid: GridArg,
    /// Number of ratios in the scale grid, 2 to 1000 (ratio 0 alone is the identity: use
    /// --no-search to skip the search).
    #[arg(long, default_value_t = 20, value_parser = grid_size, help_heading = "Quantization")]
    pub n_grid: usize,
    /// Score scale-search candidates on at most N (≥ 1) evenly spaced calibration blocks
    /// (statistics still use all blocks). Default: all blocks (AutoAWQ's exact objective).
    #[arg(long, value_name = "N", value_parser = at_least(1), help_heading = "Quantization")]
    pub search_blocks: Option<usize>,
    /// Preset: --search-blocks 4. Measured on SmolLM2 with the defaults: 5x faster on the
    /// embedded corpus (278 s against 1410 s), perplexity 0.1-0.5% higher than the exact run's
    /// (docs/quality.md).
    #[arg(long, conflicts_with = "search_blocks", help_heading = "Quantization")]
    pub fast: bool,
    /// Skip the clipping search.
    #[arg(long, help_heading = "Quantization")]
    pub no_clip: bool,
    /// How the clipping search cuts each group's range: symmetric (AutoAWQ's: one shrink of
    /// the abs-max, ±max_val), separate (then the upper and the lower bound refined one at a
    /// time, each kept where it lowers the clip objective), or auto, the default (separate
    /// bounds per row and group only where, searched without the held-out calibration blocks,
    /// they lower the objective on those blocks; symmetric elsewhere).
    #[arg(
        long,
        default_value = "auto",
        value_name = "HOW",
        conflicts_with = "no_clip",
        help_heading = "Quantization"
    )]
    pub clip_sides: awq::quantize::ClipSides,
    /// How the 4-bit codes are chosen once scales and clipping are fixed. auto (the default):
    /// error feedback, kept on a linear only where it lowers the loss on the held-out
    /// calibration blocks (every 4th, left out of its fit); a linear whose input has fewer than
    /// 4 calibration tokens per dimension rounds to nearest. rtn: round to nearest everywhere
    /// (AutoAWQ's codes exactly). gptq: error feedback, kept on a linear where it lowers the
    /// loss on all the calibration blocks (it overfits with few tokens). Error feedback is
    /// GPTQ's column walk through the calibration input's XᵀX, in activation order, onto
    /// round-to-nearest's scales and zero points of the clipped weights. With at least 16384
    /// calibration tokens it walks from the weights before clipping, so the clip's error is fed
    /// back too; with fewer, from the clipped weights. MoE experts round to nearest; under auto,
    /// so does every linear of a MoE layer (docs/quality.md).
    #[arg(
        long,
        default_value = "auto",
        value_name = "METHOD",
        help_heading = "Quantization"
    )]
    pub rounding: awq::quantize::Rounding,
    /// Keep the dense linears whose quantization hurts most unquantized (in the output's float
    /// dtype, listed in modules_to_not_convert) within a budget of PCT percent of the
    /// all-quantized checkpoint's size, e.g. 3%. Ranked by each unit's measured drop of its
    /// layer's output error per extra byte; q/k/v and gate/up count as one unit (vLLM merges
    /// them). vLLM and transformers load the result; TGI and AutoAWQ's loader do not.
    #[arg(long, value_name = "PCT", value_parser = budget_percent, help_heading = "Quantization")]
    pub keep_fp16: Option<f64>,
    /// Skip the layer-output guard, which falls back toward round-to-nearest (dropping a clip
    /// or a group's scales) on a dense layer where AWQ's choice is at least 10 % worse on the
    /// layer's own output, and the end-to-end check after the last layer, which writes the
    /// whole model, or the layers a per-layer choice picks, as scales-only or round-to-nearest
    /// where that comes clearly closer to the float model (docs/quality.md). --no-search
    /// --no-clip --rounding rtn has nothing to guard.
    #[arg(long, help_heading = "Quantization")]
    pub no_guard: bool,
    /// Skip the scale search (identity scales; with --no-clip --rounding rtn, plain RTN).
    #[arg(long, conflicts_with_all = ["n_grid", "grid", "fast", "search_blocks"], help_heading = "Quantization")]
    pub no_search: bool,
    /// What --version auto optimizes for (default batch; only with --version auto).
    #[arg(long, value_enum, ignore_case = true, help_heading = "Quantization")]
    pub workload: Option<WorkloadArg>,
    /// Output directory (written to a staging directory beside it, then renamed).
    #[arg(long, short, help_heading = "Output")]
    pub output: PathBuf,
    /// Maximum shard size (e.g. 5GB, 500MB, 2GiB, bytes).
    #[arg(long, default_value = "5GB", value_parser = parse_size, help_heading = "Output")]
    pub shard_size: u64,
    /// Float dtype of the unquantized tensors and torch_dtype: auto (float16, or bfloat16 when
    /// a weight or a calibration activation exceeds float16's range), float16, bfloat16. AWQ
    /// scales are float16 in every case.
    #[arg(
        long,
        default_value = "auto",
        value_name = "DTYPE",
        help_heading = "Output"
    )]
    pub dtype: awq::quantize::DtypeChoice,
    /// Replace an existing output that is empty or an earlier awq output (anything else is
    /// refused), or discard an interrupted run's staging whose settings differ.
    #[arg(long, help_heading = "Output")]
    pub force: bool,
    /// Insist on continuing an interrupted run: refused (exit 2) when none is found beside -o.
    /// Without it a run with the same model, calibration and options continues from its
    /// finished layers anyway, and a different one is refused.
    #[arg(long, conflicts_with = "force", help_heading = "Output")]
    pub resume: bool,
    /// Resolve the model, calibration, layout and estimates, check the output location's
    /// writability and free space, print the plan and write nothing.
    #[arg(long, help_heading = "Output")]
    pub dry_run: bool,
    /// Quantize one shard of a job split over machines: K/N (0-based; ranges balanced by
    /// estimated cost), or auto / auto/N (the index from SLURM_ARRAY_TASK_ID, Kubernetes'
    /// JOB_COMPLETION_INDEX or AWQ_SHARD_INDEX; the count from SLURM_ARRAY_TASK_COUNT,
    /// AWQ_SHARD_COUNT or /N). -o is then a shard directory for awq merge.
    #[arg(
        long,
        value_name = "K/N|auto[/N]",
        conflicts_with = "layers",
        help_heading = "Many machines"
    )]
    pub shard: Option<String>,
    /// Quantize layers A..B only (0-based, B excluded) into a shard directory for awq merge.
    #[arg(long, value_name = "A..B", value_parser = awq::quantize::shard::parse_layers, help_heading = "Many machines")]
    pub layers: Option<awq::quantize::shard::ShardSpec>,
    /// With --dry-run: plan N shards (each one's layers, estimated seconds and memory); with
    /// --capture: the shard count whose boundaries are written.
    #[arg(long, value_name = "N", value_parser = at_least(1), help_heading = "Many machines")]
    pub shards: Option<usize>,
    /// Capture job J of M (0-based): the float forward of its share of the calibration blocks,
    /// written at every boundary of --shards N into -o (a sub-directory of what the shards get
    /// as --activations), instead of quantizing.
    #[arg(long, value_name = "J/M", value_parser = awq::quantize::parse_part, requires = "shards", conflicts_with_all = ["shard", "layers"], help_heading = "Many machines")]
    pub capture: Option<(usize, usize)>,
    /// With --shard: start from the activations the capture jobs wrote under DIR instead of
    /// running the float forward of every layer before the shard's range.
    #[arg(
        long,
        value_name = "DIR",
        requires = "shard",
        help_heading = "Many machines"
    )]
    pub activations: Option<PathBuf>,
    /// Exit 0 without work when -o already holds an awq output of the same fingerprint (model
    /// contents, calibration tokens, every option that shapes the bytes): for jobs that
    /// regenerate artifacts.
    #[arg(long, conflicts_with = "force", help_heading = "Output")]
    pub skip_existing: bool,
    /// The model card's title (default: the Hub id, else the model directory's name).
    #[arg(long, value_name = "NAME", help_heading = "Output")]
    pub name: Option<String>,
    /// The model card's base_model, a Hub id (default: the Hub id of --model, also read from a
    /// Hub cache snapshot path).
    #[arg(long, value_name = "ORG/NAME", help_heading = "Output")]
    pub base_model: Option<String>,
    /// Quality gate: after writing, measure fp and quantized perplexity on this text.
    #[arg(long, value_name = "FILE", help_heading = "Quality gate")]
    pub eval_text: Option<PathBuf>,
    /// Quality gate: exit 5 when the perplexity rises by more than this (e.g. 5%).
    /// (needs --eval-text).
    #[arg(
        long,
        value_name = "PCT",
        allow_negative_numbers = true,
        value_parser = parse_percent,
        help_heading = "Quality gate"
    )]
    pub max_ppl_increase: Option<f64>,
    /// Quality gate: evaluate the first N (≥ 2) tokens of --eval-text.
    #[arg(long, default_value_t = 8192, value_parser = at_least(2), help_heading = "Quality gate")]
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

/// A clap parser for a count of at least `min` (a usage error naming the flag, exit 2,
/// otherwise).
fn at_least(min: usize) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.trim().parse::<usize>() {
        Ok(v) if v >= min => Ok(v),
        Ok(_) => Err(format!("must be at least {min}")),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// `--n-grid`: 2 to 1000 ratios (ratio 0 alone is the identity, which `--no-search` expresses).
fn grid_size(s: &str) -> Result<usize, String> {
    match at_least(2)(s)? {
        v if v <= 1000 => Ok(v),
        _ => Err("must be at most 1000".into()),
    }
}

/// "5%" or "5" → 5.0 (a non-negative percentage).
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v: f64 = t
        .strip_suffix('%')
        .unwrap_or(t)
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage like 5%"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{s:?} must be a percentage of at least 0"))
    }
}

/// `--keep-fp16`: a percentage above 0 and at most 100.
fn budget_percent(s: &str) -> Result<f64, String> {
    match parse_percent(s) {
        Ok(v) if v > 0.0 && v <= 100.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a budget above 0% and at most 100% (e.g. 3%; 0.03 means 0.03%)"
        )),
    }
}

/// "5GB" → 5_000_000_000; KB/MB/GB are decimal, KiB/MiB/GiB binary; at least one byte.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size like 5GB, 500MB or 2GiB");
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| bad())?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let v = num * mult;
    if v >= 1.0 && v.is_finite() {
        Ok(v as u64)
    } else {
        Err(bad())
    }
}

impl TryFrom<QuantizeArgs> for awq::quantize::QuantizeOptions {
    type Error = awq::error::Error;

    /// The one place where command-line arguments become library options (ranges were
    /// checked by clap; `--version auto` asks the GPUs here).
    fn try_from(args: QuantizeArgs) -> awq::error::Result<Self> {
        use awq::quant::pack::Layout;
        if args.max_ppl_increase.is_some() && args.eval_text.is_none() {
            return Err(awq::error::Error::Usage(
                "--max-ppl-increase needs --eval-text FILE, the text both perplexities are measured on"
                    .into(),
            ));
        }
        if args.workload.is_some() && args.version != VersionArg::Auto {
            return Err(awq::error::Error::Usage(
                "--workload only chooses the layout of --version auto; drop it, or pass --version auto"
                    .into(),
            ));
        }
        if (args.shard.is_some() || args.layers.is_some() || args.capture.is_some())
            && args.eval_text.is_some()
        {
            return Err(awq::error::Error::Usage(
                "--eval-text with --shard, --layers or --capture: a shard is not a checkpoint; \
                 pass the quality gate to awq merge instead"
                    .into(),
            ));
        }
        if args.shards.is_some() && !args.dry_run && args.capture.is_none() {
            return Err(awq::error::Error::Usage(
                "--shards N plans N shards with --dry-run, or sets the boundaries of --capture; \
                 to quantize one shard pass --shard K/N"
                    .into(),
            ));
        }
        if args.format == FormatArg::CompressedTensors && args.version != VersionArg::Gemm {
            return Err(awq::error::Error::Usage(
                "--version chooses AutoAWQ's layout; --format compressed-tensors has one layout \
                 (pack-quantized): drop --version"
                    .into(),
            ));
        }
        let layout_choice = match args.version {
            _ if args.format == FormatArg::CompressedTensors => None,
            VersionArg::Auto => {
                let workload = match args.workload.unwrap_or(WorkloadArg::Batch) {
                    WorkloadArg::Batch => awq::gpu::Workload::Batch,
                    WorkloadArg::Single => awq::gpu::Workload::Single,
                };
                Some(awq::gpu::choose(awq::gpu::detect(), workload)?)
            }
            _ => None,
        };
        let layout = match (&layout_choice, args.version) {
            _ if args.format == FormatArg::CompressedTensors => Layout::PackQuantized,
            (Some(choice), _) => choice.layout,
            (None, VersionArg::Gemv) => Layout::Gemv,
            _ => Layout::Gemm,
        };
        Ok(Self {
            model: args.source.model,
            revision: args.source.revision,
            output: args.output,
            w_bit: args.w_bit,
            group: args.group,
            layout,
            layout_choice,
            shard: match (&args.shard, args.layers) {
                (Some(spec), _) => Some(
                    awq::quantize::shard::ShardSpec::from_env(spec, |k| std::env::var(k).ok())
                        .map_err(|e| awq::error::Error::Usage(format!("--shard {spec}: {e}")))?,
                ),
                (None, layers) => layers,
            },
            plan_shards: args.shards,
            capture: args.capture,
            activations: args.activations,
            dry_run: args.dry_run,
            resume: args.resume,
            skip_existing: args.skip_existing,
            name: args.name,
            base_model: args.base_model,
            quality_gate: args.eval_text.map(|text| awq::quantize::QualityGate {
                text,
                max_increase_pct: args.max_ppl_increase.unwrap_or(f64::INFINITY),
                max_tokens: args.eval_max_tokens,
            }),
            calib: awq::calib::CalibOptions {
                files: args.calib,
                text_column: args.text_column,
                n_samples: args.n_samples,
                seqlen: args.seqlen,
                seed: args.seed,
                max_blocks: args.max_blocks,
                split_long: args.split_long,
            },
            grid: match args.grid {
                GridArg::Robust => awq::quant::search::Grid::Robust,
                GridArg::Autoawq => awq::quant::search::Grid::Autoawq,
            },
            n_grid: args.n_grid,
            clip: !args.no_clip,
            clip_sides: args.clip_sides,
            // Error feedback's codes (`auto`, `gptq`) are checked end to end even without a
            // search or a clip.
            guard: !(args.no_guard
                || awq::quantize::plain_rtn(args.no_search, !args.no_clip, args.rounding)),
            rounding: args.rounding,
            keep_fp16: args.keep_fp16,
            no_search: args.no_search,
            search_blocks: args
                .search_blocks
                .or(args.fast.then_some(awq::quantize::FAST_SEARCH_BLOCKS)),
            shard_size: args.shard_size,
            dtype: args.dtype,
            force: args.force,
        })
    }
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
    /// Window length (≥ 2); windows do not overlap and a partial tail window is dropped.
    #[arg(long, default_value_t = awq::eval::DEFAULT_SEQLEN, value_parser = at_least(2), help_heading = "Evaluation")]
    pub seqlen: usize,
    /// Evaluate only the first N (≥ 2) tokens of the text.
    #[arg(long, value_parser = at_least(2), help_heading = "Evaluation")]
    pub max_tokens: Option<usize>,
    /// Round every activation to this dtype after each op, as a server running in it would:
    /// float32 (exact, default), float16, bfloat16. A model whose activations overflow float16
    /// fails here (exit 5) instead of producing NaN in production.
    #[arg(
        long,
        default_value = "float32",
        value_name = "DTYPE",
        help_heading = "Evaluation"
    )]
    pub dtype: awq::eval::ServeDtype,
    /// Print one JSON object on stdout and nothing else.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long, short, help_heading = "Output")]
    pub quiet: bool,
}
