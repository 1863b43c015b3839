//! `kiln map` before it is wired into the kiln binary: compiles crates/kiln-cli/src/map.rs
//! unchanged, with the two items of the CLI's crate root it uses.
//!
//!     cargo run --release -p kiln-hw --example map_cli -- --preset gpt-s --compare all

#[path = "../../kiln-cli/src/map.rs"]
mod map;

use clap::Parser;

/// The CLI's usage error (exit code 2), as in kiln-cli's main.rs.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: map::MapArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match map::run(&cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(if e.downcast_ref::<UsageError>().is_some() { 2 } else { 1 })
        }
    }
}
