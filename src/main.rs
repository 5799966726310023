//! The `svft` command line.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use svft::bench::{run_cpu, BenchCase};
use svft::{Pattern, Plan};

#[derive(Parser)]
#[command(name = "svft", version, about = "SVFT fine-tuning layers: benchmarks and tools")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Cpu,
}

#[derive(Subcommand)]
enum Command {
    /// Time SVFT forward+backward against its GEMM floor, LoRA r=16 and the official order.
    Bench {
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        #[arg(long, default_value_t = 1024)]
        d_out: usize,
        #[arg(long, default_value_t = 1024)]
        d_in: usize,
        #[arg(long, default_value_t = 512)]
        tokens: usize,
        /// plain, banded:D, random:D[:seed=S], topk:D[:official]
        #[arg(long, default_value = "banded:2")]
        pattern: Pattern,
        /// auto, factored or merged
        #[arg(long, default_value = "auto")]
        plan: Plan,
        /// Seconds of measuring per timed quantity.
        #[arg(long, default_value_t = 1.5)]
        seconds: f64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Bench {
        backend: Backend::Cpu,
        d_out: 1024,
        d_in: 1024,
        tokens: 512,
        pattern: Pattern::Banded { d: 2 },
        plan: Plan::Auto,
        seconds: 1.5,
        json: false,
    });
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svft: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> svft::Result<()> {
    match command {
        Command::Bench { backend: Backend::Cpu, d_out, d_in, tokens, pattern, plan, seconds, json } => {
            if !(seconds.is_finite() && seconds > 0.0) {
                return Err(svft::Error::InvalidArgument("--seconds must be positive".into()));
            }
            let case = BenchCase { d_out, d_in, tokens, pattern, plan, budget: Duration::from_secs_f64(seconds) };
            if d_out == 0 || d_in == 0 || tokens == 0 {
                return Err(svft::Error::InvalidArgument("--d-out, --d-in and --tokens must be positive".into()));
            }
            let report = run_cpu(&case)?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            Ok(())
        }
    }
}
