//! One `capture` invocation: enter the target namespace, detect its facts, hand over to the backend.

use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::{
    config::{Action, Backend, Invocation},
    ebpf, iptables, namespace, validation,
};

/// istio-iptables' exit code when `--run-validation` fails.
pub const EXIT_VALIDATION_FAILED: u8 = 126;

/// A backend that runs: what `--backend` asked for, `auto` resolved.
enum Chosen {
    Iptables,
    Ebpf,
}

/// The backend to use: `auto` becomes eBPF if the kernel has every feature it needs and capture's state
/// would outlive this process where it runs (see [`ebpf::placement`]), else iptables, and says which and
/// why in one line on stderr. The same kernel and place always give the same answer, so `clean` and
/// `status` find what `apply` chose.
fn chosen_backend(requested: Backend, pin_dir: &std::path::Path) -> Chosen {
    match requested {
        Backend::Iptables => return Chosen::Iptables,
        Backend::Ebpf => return Chosen::Ebpf,
        Backend::Auto => {}
    }
    if let Err(missing) = ebpf::features::check() {
        eprintln!("capture: --backend auto: iptables ({missing})");
        return Chosen::Iptables;
    }
    if let Some(why) = ebpf::placement::vanishing(pin_dir) {
        eprintln!("capture: --backend auto: iptables ({why})");
        return Chosen::Iptables;
    }
    eprintln!("capture: --backend auto: ebpf (the kernel has every feature it needs)");
    Chosen::Ebpf
}

/// Runs `inv` and says how the process should exit.
pub fn run(inv: &Invocation) -> Result<ExitCode> {
    let opts = &inv.options;
    if let Some(ns) = &opts.network_namespace {
        namespace::enter(ns)?;
    }
    let mut env = namespace::detect(&inv.config, &opts.resolv_conf)?;
    if inv.config.redirect_dns && !env.dns_effective(&inv.config) {
        eprintln!(
            "capture: warning: --redirect-dns is on but {} lists no nameserver and --capture-all-dns is off: DNS is not captured",
            opts.resolv_conf.display()
        );
    }
    let output = match chosen_backend(opts.backend, &opts.pin_dir) {
        Chosen::Iptables => iptables::run(inv, &mut env)?,
        Chosen::Ebpf => ebpf::run(inv, &mut env)?,
    };
    match &opts.dry_run_file {
        Some(path) if opts.dry_run => {
            std::fs::write(path, &output).with_context(|| format!("write {}", path.display()))?
        }
        _ => print!("{output}"),
    }
    if opts.action == Action::Apply && opts.run_validation {
        let ports = [inv.config.proxy_port, inv.config.inbound_capture_port];
        let v6 = env.ipv6 && !inv.config.dual_stack;
        if !validation::run(ports, opts.probe_port, v6, opts.probe_timeout)? {
            eprintln!(
                "capture: validation failed: a connection to the probe port was not redirected to the proxy; workload is not ready for capture"
            );
            return Ok(ExitCode::from(EXIT_VALIDATION_FAILED));
        }
    }
    Ok(ExitCode::SUCCESS)
}
