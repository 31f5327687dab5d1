//! The benchmark behind `cargo xtask bench`. First [`connect`], the connect() microbenchmark: ns per
//! connect() and per captured TCP connection by wall clock, without capture, with an empty connect4 program,
//! iptables and eBPF (`--only connect` runs only this, into connect.md). Then an app talking through its
//! sidecar (HAProxy by default) to a remote server, in each mode of [`modes::MODES`] (no capture, iptables,
//! eBPF), every mode built the same way ([`topology`]). Workloads ([`workloads`]): short connections,
//! persistent connections (latency percentiles), one bulk transfer; for each, the CPU of the mode's own
//! cgroup ([`cgroups`]); during the short connections, the kernel time of each eBPF program, and after them
//! the pod's conntrack entries. Then [`scaling`]: the connection rate with more excluded CIDRs and more
//! registered namespaces. Last, [`registration`]: how long the node agent takes to register a pod, and
//! [`kubernetes`]: from a pod's Running status in a real API server to its capture, many pods at once. Output
//! ([`report`], [`plot`]): report.md and SVG plots in the output directory.
//!
//! Modes run interleaved (A B C A B C …) so that machine noise hits them alike; each figure is the median
//! over rounds, and ratios are taken between medians of the same run. Everything lives in throwaway
//! namespaces, cgroups made for the run and private bpffs mounts, removed at the end, also on failure;
//! every load loop ends at a deadline.

mod cgroups;
mod connect;
mod empty_program;
mod kubernetes;
mod modes;
mod plot;
mod registration;
mod report;
mod scaling;
mod topology;
mod workloads;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cgroups::Cgroups,
    modes::{Backend, MODES},
    report::{ModeResults, Results, RunInfo},
    topology::{Proxy, Topology},
};

/// Planned seconds to make and register one throwaway namespace (for the time-left estimate only).
pub const NAMESPACE_SECONDS: f64 = 0.02;
/// Planned seconds to apply capture with other flags in every mode (for the time-left estimate only).
pub const APPLY_SECONDS: f64 = 1.5;
/// Planned seconds to build one mode's topology.
const SETUP_SECONDS: f64 = 1.0;
/// Planned bulk rate, MB/s (for the time-left estimate only).
const BULK_MB_PER_SECOND: f64 = 300.0;

/// How much to run: `--quick` or the full run.
struct Plan {
    repeats: usize,
    duration: Duration,
    bulk_bytes: usize,
    scaling_repeats: usize,
    scaling_duration: Duration,
    cidr_points: &'static [usize],
    namespace_points: &'static [usize],
    /// Pods the agent registers one at a time, and as many again in a burst.
    agent_pods: usize,
    /// Pods created at once through the Kubernetes API.
    kube_pods: usize,
    connect: connect::Plan,
}

/// Registered namespaces at each point of the namespace axis (the connect() microbenchmark's large
/// variant has the last).
const QUICK_NAMESPACES: &[usize] = &[1, 100];
const FULL_NAMESPACES: &[usize] = &[1, 100, 1000];

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                repeats: 2,
                duration: Duration::from_secs(1),
                bulk_bytes: 64 << 20,
                scaling_repeats: 1,
                scaling_duration: Duration::from_secs(1),
                cidr_points: &[1, 4096],
                namespace_points: QUICK_NAMESPACES,
                agent_pods: 10,
                kube_pods: 25,
                connect: connect::Plan {
                    repeats: 3,
                    udp_connects: 100_000,
                    tcp_connections: 3_000,
                    namespaces: QUICK_NAMESPACES[QUICK_NAMESPACES.len() - 1],
                },
            }
        } else {
            Plan {
                repeats: 5,
                duration: Duration::from_secs(4),
                bulk_bytes: 256 << 20,
                scaling_repeats: 3,
                scaling_duration: Duration::from_secs(3),
                cidr_points: &[1, 16, 256, 4096],
                namespace_points: FULL_NAMESPACES,
                agent_pods: 40,
                kube_pods: 100,
                connect: connect::Plan {
                    repeats: 5,
                    udp_connects: 500_000,
                    tcp_connections: 10_000,
                    namespaces: FULL_NAMESPACES[FULL_NAMESPACES.len() - 1],
                },
            }
        }
    }

    /// Planned seconds of the whole run, for the time-left estimate.
    fn seconds(&self) -> f64 {
        let modes = MODES.len() as f64;
        let count = |b: Backend| MODES.iter().filter(|m| m.backend == b).count() as f64;
        let ebpf = count(Backend::Ebpf);
        // The floor runs at every scaling point too, as the reference for the machine's drift.
        let floor = count(Backend::None);
        let round = self.duration.as_secs_f64() * 2.0 + self.bulk_bytes as f64 / 1e6 / BULK_MB_PER_SECOND;
        let scaling = self.scaling_repeats as f64 * self.scaling_duration.as_secs_f64();
        let namespaces = self.namespace_points.last().copied().unwrap_or(1).saturating_sub(1) as f64;
        self.connect.seconds()
            + modes * SETUP_SECONDS
            + self.repeats as f64 * modes * round
            + self.cidr_points.len() as f64 * (modes * scaling + self.scaling_repeats as f64 * APPLY_SECONDS)
            + self.namespace_points.len() as f64 * (ebpf + floor) * scaling
            + namespaces * NAMESPACE_SECONDS * ebpf.min(1.0)
            + self.agent_pods as f64 * (registration::PACE.as_secs_f64() + 2.0 * NAMESPACE_SECONDS)
            + kubernetes::START_SECONDS
            + self.kube_pods as f64 * kubernetes::POD_SECONDS
    }
}

/// One line per step on stderr, with the time elapsed and an estimate of the time left (the planned time
/// left, scaled by how the run has kept to plan so far).
pub struct Progress {
    started: Instant,
    planned: f64,
    done: f64,
}

impl Progress {
    fn new(planned: f64) -> Progress {
        Progress {
            started: Instant::now(),
            planned,
            done: 0.0,
        }
    }

    /// Records a step of `planned` seconds, and prints `what`.
    pub fn step(&mut self, planned: f64, what: &str) {
        self.done += planned;
        let elapsed = self.started.elapsed().as_secs_f64();
        let pace = if self.done > 0.0 { elapsed / self.done } else { 1.0 };
        let left = (self.planned - self.done).max(0.0) * pace;
        eprintln!("bench [{} elapsed, ~{} left] {what}", clock(elapsed), clock(left));
    }
}

/// `m:ss`.
fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

struct Args {
    capture: String,
    out_dir: PathBuf,
    quick: bool,
    proxy: Proxy,
    /// `--only SECTION`: only that section, in its own report.
    only: Option<Section>,
}

/// A section that runs alone with `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    /// The connect() microbenchmark, into connect.md.
    Connect,
    /// Pods from the Kubernetes API to capture, into kubernetes.md.
    Kubernetes,
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Kubernetes => "kubernetes",
        }
    }
}

impl Args {
    fn parse() -> Result<Args> {
        const USAGE: &str = "usage: capture-bench CAPTURE_BIN OUT_DIR [--quick] [--proxy haproxy|builtin] [--only connect|kubernetes] \
                             (run it with `cargo xtask bench`)";
        let mut args = std::env::args().skip(1);
        let (Some(capture), Some(out_dir)) = (args.next(), args.next()) else {
            bail!(USAGE);
        };
        let (mut quick, mut proxy, mut only) = (false, Proxy::Haproxy, None);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--only" => match args.next().as_deref() {
                    Some("connect") => only = Some(Section::Connect),
                    Some("kubernetes") => only = Some(Section::Kubernetes),
                    other => bail!("--only: expected connect or kubernetes, got {other:?}\n{USAGE}"),
                },
                "--proxy" => {
                    proxy = match args.next().as_deref() {
                        Some("haproxy") => Proxy::Haproxy,
                        Some("builtin") => Proxy::Builtin,
                        other => bail!("--proxy: expected haproxy or builtin, got {other:?}\n{USAGE}"),
                    }
                }
                other => bail!("unexpected argument {other:?}\n{USAGE}"),
            }
        }
        Ok(Args {
            capture,
            out_dir: out_dir.into(),
            quick,
            proxy,
            only,
        })
    }

    /// The command a reader would type for this run.
    fn command(&self) -> String {
        let mut cmd = "cargo xtask bench".to_owned();
        if self.quick {
            cmd.push_str(" --quick");
        }
        if let Some(section) = self.only {
            cmd.push_str(" --only ");
            cmd.push_str(section.name());
        } else if self.proxy == Proxy::Builtin {
            cmd.push_str(" --proxy builtin");
        }
        cmd
    }
}

fn main() -> Result<()> {
    let args = Args::parse()?;
    // SAFETY: set before any thread that reads the environment is started.
    unsafe { std::env::set_var("CAPTURE_BIN", &args.capture) };
    let plan = Plan::new(args.quick);
    if let Some(section) = args.only {
        return only(section, &args, &plan);
    }
    let mut progress = Progress::new(plan.seconds());
    eprintln!(
        "bench: the connect() microbenchmark, then {} modes, {} rounds of {} s, then scaling; planned about {}",
        MODES.len(),
        plan.repeats,
        plan.duration.as_secs_f64(),
        clock(plan.seconds())
    );

    // Declared before the topologies, so dropped after them: their threads leave the cgroups first.
    let mut cgroups = Cgroups::new("bench")?;
    // First, while BPF statistics are off (they would inflate small programs).
    let connect = connect::measure(&mut cgroups, plan.connect, &mut progress)?;
    let mut topologies = Vec::new();
    for mode in MODES {
        topologies.push(Topology::new(*mode, args.proxy, &mut cgroups)?);
        progress.step(
            SETUP_SECONDS,
            &format!("{}: topology built, capture applied", mode.name),
        );
    }
    // Per-program run time (statistics on only while this lives).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS (Linux 5.8)")?;
    let mut results: Vec<ModeResults> = MODES.iter().map(|m| ModeResults::new(*m)).collect();
    let round_seconds = plan.duration.as_secs_f64() * 2.0 + plan.bulk_bytes as f64 / 1e6 / BULK_MB_PER_SECOND;
    for round in 1..=plan.repeats {
        for (t, r) in topologies.iter().zip(&mut results) {
            let (maps, names) = (t.map_ids(), t.program_names());
            let before = workloads::program_stats(&maps, &names);
            let short = workloads::short(t, plan.duration)?;
            r.conntrack = Some(t.conntrack_entries()?);
            if t.mode.backend == Backend::Ebpf {
                for (name, (time, runs)) in workloads::stats_delta(&before, &workloads::program_stats(&maps, &names)) {
                    let e = r.kernel.entry(name).or_default();
                    e.0 += time;
                    e.1 += runs;
                }
            }
            let persistent = workloads::persistent(t, plan.duration)?;
            let bulk = workloads::bulk(t, plan.bulk_bytes)?;
            progress.step(
                round_seconds,
                &format!(
                    "round {round}/{}: {:<10} short {:>6.0} conn/s | persistent p50 {:>5.0} µs p99 {:>5.0} µs \
                     {:>6.0} req/s | bulk {:>5.0} MB/s | CPU {:.0} µs/conn",
                    plan.repeats,
                    t.mode.name,
                    short.per_second(),
                    persistent.micros(0.5),
                    persistent.micros(0.99),
                    persistent.per_second(),
                    bulk.mb_per_second,
                    short.cpu_per_connection()
                ),
            );
            r.short.push(short);
            r.add_persistent(&persistent);
            r.bulk.push(bulk);
        }
    }
    let sweep = |points| scaling::Sweep {
        points,
        repeats: plan.scaling_repeats,
        duration: plan.scaling_duration,
    };
    let cidrs = scaling::cidrs(&topologies, sweep(plan.cidr_points), &mut progress)?;
    let namespaces = scaling::namespaces(&topologies, sweep(plan.namespace_points), &mut progress)?;
    drop(topologies);
    drop(cgroups);
    let registration = registration::measure(plan.agent_pods, &mut progress)?;
    let kubernetes = kubernetes::measure(plan.kube_pods, &mut progress)?;

    let results = Results {
        info: run_info(&args, &plan, &progress),
        modes: results,
        cidrs,
        namespaces,
        registration,
        kubernetes,
        connect,
    };
    let report = results.markdown();
    print!("{report}");
    let dir = &args.out_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("report.md");
    std::fs::write(&path, &report).with_context(|| format!("write {}", path.display()))?;
    plot::write_all(&results, dir)?;
    for m in &results.modes {
        eprintln!("bench: {}", report::summary_line(m));
    }
    eprintln!(
        "bench: report and plots (latency.svg, connections.svg, scaling.svg) written to {} in {}",
        dir.display(),
        clock(progress.started.elapsed().as_secs_f64())
    );
    Ok(())
}

fn run_info(args: &Args, plan: &Plan, progress: &Progress) -> RunInfo {
    RunInfo {
        command: args.command(),
        proxy: args.proxy,
        repeats: plan.repeats,
        duration: plan.duration,
        bulk_bytes: plan.bulk_bytes,
        scaling_repeats: plan.scaling_repeats,
        scaling_duration: plan.scaling_duration,
        quick: args.quick,
        took: progress.started.elapsed(),
    }
}

/// `--only SECTION`: that section alone, its report in `<section>.md` (report.md, a whole run's, stays).
fn only(section: Section, args: &Args, plan: &Plan) -> Result<()> {
    let planned = match section {
        Section::Connect => plan.connect.seconds(),
        Section::Kubernetes => kubernetes::START_SECONDS + plan.kube_pods as f64 * kubernetes::POD_SECONDS,
    };
    let mut progress = Progress::new(planned);
    eprintln!(
        "bench: the {} section only; planned about {}",
        section.name(),
        clock(planned)
    );
    let report = match section {
        Section::Connect => {
            let mut cgroups = Cgroups::new("bench")?;
            let connect = connect::measure(&mut cgroups, plan.connect, &mut progress)?;
            drop(cgroups);
            report::connect_report(&run_info(args, plan, &progress), &connect)
        }
        Section::Kubernetes => {
            let times = kubernetes::measure(plan.kube_pods, &mut progress)?;
            report::kubernetes_report(&run_info(args, plan, &progress), &times)
        }
    };
    print!("{report}");
    let dir = &args.out_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{}.md", section.name()));
    std::fs::write(&path, &report).with_context(|| format!("write {}", path.display()))?;
    eprintln!(
        "bench: {} written in {}",
        path.display(),
        clock(progress.started.elapsed().as_secs_f64())
    );
    Ok(())
}
