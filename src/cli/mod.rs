//! Argument parsing and dispatch of the `svft` subcommands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use svft::{Pattern, Plan, Result};

mod bench;
mod decompose;
mod demo;
mod files;
mod merge;

#[derive(Parser)]
#[command(
    name = "svft",
    version,
    about = "SVFT fine-tuning layers: decompose a checkpoint, make and merge adapters, compare with LoRA",
    long_about = "SVFT fine-tuning layers. A bare `svft` runs the demo: SVFT (plain and banded) and LoRA \
                  train on a transformer-shaped stack (on the GPU when one is usable, else the CPU) and the \
                  costs are compared.\n\n\
                  Real models: `svft decompose MODEL.safetensors -o F` (once), `svft init-adapter --factors F -o A` \
                  (or an adapter trained elsewhere), `svft merge --factors F --adapter A -o MERGED.safetensors`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Where the work runs.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Backend {
    /// The best backend present (CUDA when built and a GPU is present, else the CPU).
    Auto,
    /// faer GEMMs and hand-written sparse passes on the CPU threads.
    Cpu,
    /// The CUDA backend (cuBLAS, cuSOLVER and the hand-written kernels).
    Cuda,
}

/// A resolved backend.
pub enum Device {
    /// The CPU threads.
    Cpu,
    /// A CUDA device with the kernels loaded.
    Cuda(std::sync::Arc<svft::cuda::Gpu>),
}

impl Device {
    /// `cpu` or `cuda`.
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }
}

/// The backend a command runs on: `cuda` opens device 0 (or says why it cannot: no kernels in
/// this build, no driver, no device); `auto` takes CUDA when a device is usable, else the CPU.
pub fn resolve_backend(b: Backend) -> Result<Device> {
    match b {
        Backend::Cpu => Ok(Device::Cpu),
        Backend::Cuda => Ok(Device::Cuda(svft::cuda::Gpu::new(0)?)),
        Backend::Auto => Ok(match svft::cuda::device_count() {
            Ok(_) => svft::cuda::Gpu::new(0).map(Device::Cuda).unwrap_or(Device::Cpu),
            Err(_) => Device::Cpu,
        }),
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Train SVFT (plain, banded) and LoRA against a hidden teacher; print what each costs (the default).
    Demo(DemoArgs),
    /// Thin SVD of every targeted 2-D weight of a checkpoint, into a factor file.
    Decompose(DecomposeArgs),
    /// A fresh adapter (pattern, initial coefficients, gate) for every module of a factor file.
    InitAdapter(InitAdapterArgs),
    /// Dense adapted weights from factors and an adapter, in the model's dtype.
    Merge(MergeArgs),
    /// Describe a factor file, an adapter or a checkpoint.
    Inspect(InspectArgs),
    /// Time SVFT forward+backward against its GEMM floor, LoRA r=16 and the official order.
    Bench(BenchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the students train: auto takes a CUDA device when one is usable (f32 layers on the
    /// device, the stack's glue and Adam on the host), else the CPU; cuda without a device is an error.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// Take the stack's modules from this checkpoint (.safetensors, sharded index JSON, or directory).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Regex of the weights to adapt (with --model).
    #[arg(long)]
    pub targets: Option<String>,
    /// How many targeted modules of --model to stack (from the first).
    #[arg(long, default_value_t = 6)]
    pub layers: usize,
    /// Training steps per method.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Tokens per step.
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Distinct training batches, cycled (0: a fresh batch every step).
    #[arg(long, default_value_t = 0)]
    pub batches: usize,
    /// Half-width d of the banded SVFT pattern.
    #[arg(long, default_value_t = 2)]
    pub banded: usize,
    /// LoRA rank (default: the rank whose parameter count is closest to banded SVFT's).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// Adam learning rate of SVFT's coefficients.
    #[arg(long, default_value_t = 2e-2)]
    pub lr: f32,
    /// Adam learning rate of LoRA's A and B.
    #[arg(long, default_value_t = 1e-2)]
    pub lora_lr: f32,
    /// Seed of the data and the teacher's hidden update.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the loss plot (PNG).
    #[arg(long, default_value = "svft-demo-loss.png")]
    pub plot: PathBuf,
    /// Do not write the plot.
    #[arg(long)]
    pub no_plot: bool,
    /// Print one JSON object (with the loss curves) instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Which dtype a factor file stores.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum FactorDtype {
    /// f32 always.
    F32,
    /// The weight's own dtype (bf16 or f16 halves the file; checksums cover the rounded values).
    Model,
}

#[derive(Args, Debug, Clone)]
pub struct DecomposeArgs {
    /// The checkpoint: a .safetensors file, a sharded checkpoint's index JSON, or a directory.
    pub model: PathBuf,
    /// Regex of the 2-D weights to decompose (default: attention and MLP projections).
    #[arg(long)]
    pub targets: Option<String>,
    /// Output factor file (default: next to the model, `<name>.svft-factors.safetensors`).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Keep only the first R singular triplets (default: all, r = min(d_out, d_in)).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Storage dtype of the factors.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: FactorDtype,
    /// Fail when a module's relative reconstruction residual (of the f32 SVD, before rounding to
    /// --dtype) exceeds this (untruncated only).
    #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true)]
    pub max_residual: f64,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct InitAdapterArgs {
    /// The factor file the adapter is for.
    #[arg(long)]
    pub factors: PathBuf,
    /// Output adapter file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// plain, banded:D, random:D[:seed=S], topk:D[:official]. A random pattern differs per module:
    /// module `name` draws with seed module_seed(S, name) (S: the spec's seed, else --seed).
    #[arg(long, default_value = "banded:2", value_parser = pattern_spec)]
    pub pattern: String,
    /// zero (the adapted model equals the base) or official (Kaiming-normal M, gate at 0.5).
    #[arg(long, default_value = "zero")]
    pub init: svft::Init,
    /// Use the gate g = sigmoid(gamma): true or false (default: on with --init official, off with zero).
    #[arg(long)]
    pub gate: Option<bool>,
    /// Seed of the official init: module `name` uses module_seed(seed, name) =
    /// splitmix64(seed ^ fnv1a64(name)) (`svft::adapter::module_seed`, as the Python package).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Regex of the modules to adapt (default: every module of the factor file).
    #[arg(long)]
    pub modules: Option<String>,
}

/// A pattern spec checked at parsing but kept as written (whether it names a seed matters).
fn pattern_spec(spec: &str) -> std::result::Result<String, String> {
    spec.parse::<Pattern>().map(|_| spec.to_string()).map_err(|e| e.to_string())
}

#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// The factor file the adapter was made on.
    #[arg(long)]
    pub factors: PathBuf,
    /// The adapter.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output safetensors file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also copy every other tensor of this checkpoint, for a complete drop-in model; |W - W0|
    /// is then measured against its original weights.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// A factor file, an adapter or a checkpoint.
    pub file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    #[arg(long, default_value_t = 1024)]
    pub d_out: usize,
    #[arg(long, default_value_t = 1024)]
    pub d_in: usize,
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// plain, banded:D, random:D[:seed=S], topk:D[:official]
    #[arg(long, default_value = "banded:2")]
    pub pattern: Pattern,
    /// auto, factored or merged
    #[arg(long, default_value = "auto")]
    pub plan: Plan,
    /// Seconds of measuring per timed quantity.
    #[arg(long, default_value_t = 1.5)]
    pub seconds: f64,
    /// Bench every distinct adapted shape of this checkpoint (instead of --d-out/--d-in).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Regex of the adapted weights (with --model).
    #[arg(long)]
    pub targets: Option<String>,
    /// Element type of the CUDA bench (f32, bf16, f16); the CPU bench is f32 only.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Bench a whole grid in this process instead of one shape: `llama3-8b` (4096x4096,
    /// 14336x4096, 4096x14336 x n in 1, 16, 512, 2048, 8192 x plain, banded:2, banded:16,
    /// random:16), `llama3-8b-subset` (4096x4096 x n in 1, 16, 2048 x banded:2) or `tiny`
    /// (384x384, 1536x384 x n in 1, 16, 256 x plain, banded:2; CPU-sized). Every row times each
    /// fixed plan (`plan_ms`, `best_fixed_plan`); --d-out, --d-in, --tokens, --pattern and
    /// --plan are ignored. Progress goes to stderr.
    #[arg(long, value_name = "NAME", conflicts_with = "model")]
    pub grid: Option<String>,
    /// With --grid: also draw time vs n (log-log) for SVFT (best fixed plan, per pattern),
    /// LoRA r=16 and the official order, one PNG per shape (FILE itself for a one-shape grid,
    /// else FILE's stem + `-<d_out>x<d_in>.png`).
    #[arg(long, value_name = "FILE.png", requires = "grid")]
    pub plot: Option<PathBuf>,
    /// With --grid: print the grid's memory table (markdown, MiB per layer and step, SVFT on
    /// the plan the FLOP model picks, --dtype activations) and time nothing.
    #[arg(long, requires = "grid")]
    pub memory: bool,
    /// Print JSON instead of a table (with --grid: one JSON line per row, as each is measured).
    #[arg(long)]
    pub json: bool,
    /// Many adapters in one batch (inference; CPU in f32, or CUDA in --dtype with --backend
    /// cuda, or auto with a device): time a bank serving each of these
    /// counts of distinct adapters in equal segments against one adapter, merged dense weights
    /// and LoRA r=16, on --adapter-shapes x --adapter-tokens, SVFT with --pattern (e.g.
    /// `--adapters 1,8,64,512`). --d-out, --d-in and --tokens are ignored.
    #[arg(long, value_name = "N,...", value_delimiter = ',', conflicts_with_all = ["grid", "model"])]
    pub adapters: Option<Vec<usize>>,
    /// With --adapters: the layer shapes, `D_OUTxD_IN,...`.
    #[arg(
        long,
        value_name = "OxI,...",
        value_delimiter = ',',
        default_value = "1024x1024,4096x1024",
        requires = "adapters"
    )]
    pub adapter_shapes: Vec<String>,
    /// With --adapters: the token counts per batch.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_value = "512,2048", requires = "adapters")]
    pub adapter_tokens: Vec<usize>,
}

/// Runs one subcommand.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo(a) => demo::run(a),
        Command::Decompose(a) => decompose::run(a),
        Command::InitAdapter(a) => files::init_adapter(a),
        Command::Merge(a) => merge::run(a),
        Command::Inspect(a) => files::inspect(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what} [{{bar:30.cyan/blue}}] {{pos}}/{{len}} {{elapsed_precise}} eta {{eta}} {{msg}}"
    ))
    .expect("valid template")
    .progress_chars("=> ");
    pb.set_style(style);
    pb
}
