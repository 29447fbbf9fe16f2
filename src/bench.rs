//! `task-queue bench`: throughput and latency, each with a baseline measured in the same run.

use std::process::ExitCode;

use crate::config::Config;
use crate::error::Result;

/// Arguments of `task-queue bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// `submit`, `noop` or `command`.
    pub scenario: String,
    #[arg(long, default_value_t = 10_000)]
    pub tasks: usize,
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(_args: BenchArgs, _config: Config) -> Result<ExitCode> {
    Ok(ExitCode::from(2))
}
