//! `cargo xtask`: set-up, build, run, test.
//!
//! - `cargo xtask run` — a self-contained demo in throwaway namespaces; `cargo xtask run -- <flags>` runs
//!   `capture <flags>` for real in the current network namespace.
//! - `cargo xtask test` — installs what is missing, builds, runs every test.
//! - `cargo xtask setup` — only the installation step.

mod setup;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing needs (apt packages, rust-src, bpf-linker), if missing.
    Setup,
    /// Without arguments: the demo. With `-- <flags>`: run `capture <flags>` here, for real.
    Run {
        /// Demo: stop after this many seconds (Ctrl-C stops earlier).
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Demo: the backend to show.
        #[arg(long, default_value = "iptables")]
        backend: String,
        /// Flags for `capture` (after `--`).
        #[arg(last = true)]
        flags: Vec<String>,
    },
    /// Build and run every test (unit, golden, integration in throwaway namespaces).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.env("PATH", setup::path_with_llvm());
    cmd
}

fn checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Builds the `capture` binary and returns its path.
fn build_capture() -> Result<std::path::PathBuf> {
    checked(cargo().args(["build", "--quiet", "--package", "capture-userspace", "--bin", "capture"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    );
    Ok(target.join("debug/capture"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::ensure(),
        Cmd::Run {
            seconds,
            backend,
            flags,
        } => {
            setup::ensure()?;
            let capture = build_capture()?;
            if flags.is_empty() {
                // The demo lives in the tests crate, next to the harness it uses; it is built only after
                // set-up, since building it builds the kernel programs.
                return checked(
                    cargo()
                        .args(["run", "--quiet", "--package", "tests", "--bin", "capture-demo", "--"])
                        .arg(&capture)
                        .args([&backend, &seconds.to_string()]),
                );
            }
            let status = Command::new(&capture).args(&flags).status().context("run capture")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Test { filter } => {
            setup::ensure()?;
            let capture = build_capture()?;
            let mut cmd = cargo();
            cmd.args(["test", "--all-targets"]).env("CAPTURE_BIN", &capture);
            if let Some(f) = filter {
                cmd.args(["--", &f]);
            }
            checked(&mut cmd)
        }
    }
}
