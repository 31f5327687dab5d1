//! `cargo xtask`: set-up, build, run, test.
//!
//! - `cargo xtask run` — a self-contained demo in throwaway namespaces; `cargo xtask run -- <flags>` runs
//!   `capture <flags>` for real in the current network namespace.
//! - `cargo xtask test` — installs what is missing, builds, runs every test.
//! - `cargo xtask fuzz [--seconds N]` — the input fuzz tests (flags, env, control socket), N seconds each.
//! - `cargo xtask bench [--quick] [--proxy builtin] [--only connect|kubernetes]` — eBPF vs iptables vs no capture, side
//!   by side, with HAProxy as the sidecar (or the bench's own); report and plots in target/bench/.
//!   `--only connect`: the connect() microbenchmark alone, into target/bench/connect.md; `--only kubernetes`:
//!   pods from a real API server to capture, into target/bench/kubernetes.md.
//! - `cargo xtask vm [--kernel K] [-- <filter>]` — the tests on another kernel (Debian 12's by default) in QEMU.
//! - `cargo xtask image` — the container image (a static `capture`, `FROM scratch`) with podman; prints its size.
//! - `cargo xtask setup` — only the installation step.

mod apiserver;
mod image;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

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
        #[arg(long, default_value = "ebpf")]
        backend: String,
        /// Flags for `capture` (after `--`).
        #[arg(last = true)]
        flags: Vec<String>,
    },
    /// Benchmark the eBPF backend against the iptables backend and no capture, side by side; writes
    /// target/bench/report.md and its plots (SVG).
    Bench {
        /// A run of under a minute (fewer, shorter rounds; fewer scaling points) instead of the full run.
        #[arg(long)]
        quick: bool,
        /// The sidecar: `haproxy` (Debian's HAProxy) or `builtin` (the bench's own thread-per-connection
        /// proxy, which reports each connection it forwarded, so every one is checked).
        #[arg(long, default_value = "haproxy")]
        proxy: String,
        /// Only one section: `connect` (the connect() microbenchmark, a few seconds with --quick), written
        /// to target/bench/connect.md; or `kubernetes` (100 pods created at once in a real API server, the
        /// time from Running to captured), written to target/bench/kubernetes.md.
        #[arg(long)]
        only: Option<String>,
    },
    /// Build the container image (deploy/Dockerfile: a static `capture`, nothing else) with podman, into
    /// the project's podman storage under target/podman, and print its size.
    Image,
    /// Build and run every test (unit, golden, integration in throwaway namespaces).
    Test {
        /// Only the integration test file `tests/tests/<FILTER>.rs` if there is one (e.g. `iptables_backend`),
        /// else only tests whose name contains this.
        filter: Option<String>,
    },
    /// Fuzz the inputs for longer than `cargo xtask test`'s smoke run: the flag parser (argv and env) and
    /// the control socket's requests, mutated from Istio's golden flag sets and at random.
    Fuzz {
        /// How long each property runs (they run two at a time).
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// Boot another kernel in QEMU (virtme-ng, no KVM needed) and run the tests in it; prints their result
    /// and exits with their status. Installs QEMU, virtme-ng and the kernel on first use.
    Vm {
        /// A Debian kernel package (fetched with apt-get download) or the path of a bzImage [default: Debian
        /// 12's newest linux-image-6.1.0-*-amd64-unsigned].
        #[arg(long)]
        kernel: Option<String>,
        /// Stop the VM after this many minutes.
        #[arg(long, default_value_t = 60)]
        timeout_min: u64,
        /// As for `cargo xtask test` (after `--`).
        #[arg(last = true)]
        filter: Option<String>,
    },
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.env("PATH", setup::path_with_llvm());
    cmd
}

/// The workspace's target directory.
pub(crate) fn target_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    dir.canonicalize().unwrap_or(dir)
}

/// Runs `cmd`; an error unless it exits 0.
fn checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// What [`build`] made.
struct Built {
    /// The `capture` binary.
    capture: PathBuf,
    /// The tests' client/server process, `capture-probe` (package `capture-testkit`), handed to the tests and
    /// the demo as `$CAPTURE_PROBE_BIN`.
    probe: PathBuf,
}

/// Builds the `capture` binary and the tests' `capture-probe`, and returns their paths. Only through cargo:
/// xtask itself depends on neither crate, so that it builds before set-up.
fn build() -> Result<Built> {
    checked(cargo().args([
        "build",
        "--quiet",
        "--package",
        "capture-userspace",
        "--bin",
        "capture",
        "--package",
        "capture-testkit",
        "--bin",
        "capture-probe",
    ]))?;
    let target = target_dir();
    Ok(Built {
        capture: target.join("debug/capture"),
        probe: target.join("debug/capture-probe"),
    })
}

/// Runs `cargo test`, passing its output through, and closes with one line totalling every test binary's
/// `test result:` line, so a reader (or CI) sees the whole run's count at the end.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};

    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let lines = BufReader::new(child.stdout.take().expect("stdout is piped"))
        .lines()
        .map_while(Result::ok)
        .inspect(|line| println!("{line}"));
    let (passed, failed) = count_results(lines);
    let status = child.wait().context("wait for cargo test")?;
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Totals the `test result:` lines of cargo test's output: (passed, failed).
fn count_results<S: AsRef<str>>(lines: impl Iterator<Item = S>) -> (u64, u64) {
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in lines {
        if let Some(result) = line.as_ref().strip_prefix("test result: ") {
            let count = |what: &str| {
                result
                    .split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(what)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    (passed, failed)
}

/// Whether `filter` names an integration test file, `tests/tests/<filter>.rs`.
fn is_test_file(filter: &str) -> bool {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../tests/tests/{filter}.rs"))
        .is_file()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::ensure_test_tools().map(drop),
        Cmd::Bench { quick, proxy, only } => {
            let apiserver = setup::ensure_test_tools()?;
            let built = build()?;
            let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
            // Release build: a benchmark measures the kernel and the proxy, not debug assertions.
            checked(
                cargo()
                    .args([
                        "run",
                        "--quiet",
                        "--release",
                        "--package",
                        "capture-bench",
                        "--bin",
                        "capture-bench",
                        "--",
                    ])
                    .arg(&built.capture)
                    .arg(&out)
                    .args(quick.then_some("--quick"))
                    .args(["--proxy", &proxy])
                    .args(only.iter().flat_map(|o| ["--only", o]))
                    .env("CAPTURE_KUBE_APISERVER", &apiserver.kube_apiserver)
                    .env("CAPTURE_ETCD", &apiserver.etcd),
            )
        }
        Cmd::Run {
            seconds,
            backend,
            flags,
        } => {
            setup::ensure()?;
            let built = build()?;
            if flags.is_empty() {
                // The demo lives in the test kit, next to the harness it uses; it is built only after
                // set-up, since building it builds the kernel programs.
                return checked(
                    cargo()
                        .args([
                            "run",
                            "--quiet",
                            "--package",
                            "capture-testkit",
                            "--bin",
                            "capture-demo",
                            "--",
                        ])
                        .arg(&built.capture)
                        .args([&backend, &seconds.to_string()])
                        .env("CAPTURE_PROBE_BIN", &built.probe),
                );
            }
            let status = Command::new(&built.capture)
                .args(&flags)
                .status()
                .context("run capture")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Vm {
            kernel,
            timeout_min,
            filter,
        } => {
            setup::ensure_test_tools()?;
            let built = build()?;
            vm::run(
                &built,
                kernel.as_deref(),
                filter.as_deref(),
                Duration::from_secs(timeout_min * 60),
            )
        }
        Cmd::Fuzz { seconds } => {
            // The fuzz test reads its budget from this variable (capture-userspace/tests/fuzz.rs).
            setup::ensure()?;
            run_tests(
                cargo()
                    .args(["test", "--package", "capture-userspace", "--test", "fuzz"])
                    .env("CAPTURE_FUZZ_SECONDS", seconds.to_string()),
            )
        }
        Cmd::Image => {
            setup::ensure()?;
            setup::ensure_image_tools()?;
            let image = image::build()?;
            image::release_storage()?;
            println!("{}", image::describe(&image));
            Ok(())
        }
        Cmd::Test { filter } => {
            let apiserver = setup::ensure_test_tools()?;
            let built = build()?;
            // The image test runs the agent from the image as the DaemonSet does: built the same way as by
            // `cargo xtask image`, every time, so it is never older than the sources.
            let image = image::build()?;
            println!("{}", image::describe(&image));
            let mut cmd = cargo();
            // Every test binary runs even after one fails, so the closing count covers the whole suite.
            cmd.args(["test", "--no-fail-fast"])
                .env("CAPTURE_BIN", &built.capture)
                .env("CAPTURE_PROBE_BIN", &built.probe)
                .env("CAPTURE_HELM", setup::helm())
                .env("CAPTURE_KUBE_APISERVER", &apiserver.kube_apiserver)
                .env("CAPTURE_ETCD", &apiserver.etcd)
                .env("CAPTURE_IMAGE", image::IMAGE)
                .envs(image::podman_env()?);
            match filter {
                Some(f) if is_test_file(&f) => cmd.args(["--package", "tests", "--test", &f]),
                Some(f) => cmd.args(["--all-targets", "--", &f]),
                None => cmd.arg("--all-targets"),
            };
            let tested = run_tests(&mut cmd);
            // Also after a failure: the checkout must stay removable.
            if let Err(e) = image::release_storage() {
                eprintln!("warning: {e:#}");
            }
            tested
        }
    }
}
