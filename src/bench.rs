//! `turbosched bench`: placeholder replaced below.
use std::path::PathBuf;
use std::process::ExitCode;

pub(crate) fn run(_tasks: usize, _seconds: u64, _dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bench is not built yet")
}
