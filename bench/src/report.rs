//! What a run measured, and the Markdown report: medians over rounds with their range, ratios against
//! the goals (and by how much a missed one is missed), kernel time per program, scaling.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use hdrhistogram::Histogram;

use crate::{
    connect::{self, ConnectResults, Figure},
    modes::{Backend, EBPF_ACCEL, FLOOR, IPTABLES, Mode},
    registration::{PACE, Registration},
    scaling::Point,
    topology::Proxy,
    workloads::{self, Bulk, CLIENTS, Persistent, Short},
};

/// A curve per mode.
#[derive(Clone, Debug)]
pub struct Series<P> {
    pub mode: &'static str,
    pub points: Vec<P>,
}

/// Everything measured in one mode.
pub struct ModeResults {
    pub mode: Mode,
    pub short: Vec<Short>,
    /// Per round: p50, p99, p99.9 (µs), requests/s, CPU µs per request.
    pub persistent: Vec<[f64; 5]>,
    /// Every round's latencies together (for the plot).
    pub latencies: Histogram<u64>,
    pub bulk: Vec<Bulk>,
    /// Per program name: run time and runs during the short connections (eBPF modes).
    pub kernel: BTreeMap<String, (Duration, u64)>,
    /// Entries in the pod's conntrack table after the last short-connection run; `Some(None)`: the table
    /// does not exist there (nf_conntrack not loaded).
    pub conntrack: Option<Option<u64>>,
}

impl ModeResults {
    pub fn new(mode: Mode) -> ModeResults {
        ModeResults {
            mode,
            short: Vec::new(),
            persistent: Vec::new(),
            latencies: workloads::histogram(),
            bulk: Vec::new(),
            kernel: BTreeMap::new(),
            conntrack: None,
        }
    }

    pub fn add_persistent(&mut self, p: &Persistent) {
        self.persistent.push([
            p.micros(0.5),
            p.micros(0.99),
            p.micros(0.999),
            p.per_second(),
            p.cpu_per_request(),
        ]);
        let _ = self.latencies.add(&p.histogram);
    }

    pub fn short_rates(&self) -> Vec<f64> {
        self.short.iter().map(Short::per_second).collect()
    }

    fn short_rate(&self) -> f64 {
        median(self.short_rates())
    }

    fn persistent_median(&self, i: usize) -> f64 {
        median(self.persistent.iter().map(|p| p[i]).collect())
    }

    /// Connections made during the short workload, all rounds.
    fn connections(&self) -> u64 {
        self.short.iter().map(|s| s.connections).sum()
    }

    /// BPF ns per short connection, all programs (`BPF_ENABLE_STATS`).
    fn kernel_per_connection(&self) -> f64 {
        self.kernel.values().map(|(t, _)| t.as_nanos() as f64).sum::<f64>() / self.connections().max(1) as f64
    }

    /// The connect4 program's ns per run and runs per short connection.
    fn connect4(&self) -> Option<(f64, f64)> {
        let (time, runs) = self.kernel.get("capture_connect4").filter(|(_, runs)| *runs > 0)?;
        Some((
            time.as_nanos() as f64 / *runs as f64,
            *runs as f64 / self.connections().max(1) as f64,
        ))
    }
}

/// How the run was set up, for the report's first lines.
pub struct RunInfo {
    pub command: String,
    pub proxy: Proxy,
    pub repeats: usize,
    pub duration: Duration,
    pub bulk_bytes: usize,
    pub scaling_repeats: usize,
    pub scaling_duration: Duration,
    pub quick: bool,
    pub took: Duration,
}

/// All of a run.
pub struct Results {
    pub info: RunInfo,
    pub modes: Vec<ModeResults>,
    pub cidrs: Vec<Series<Point>>,
    pub namespaces: Vec<Series<Point>>,
    pub registration: Registration,
    /// Pods created at once through the Kubernetes API: Running to captured, ms, in pod order.
    pub kubernetes: Vec<f64>,
    /// The connect() microbenchmark.
    pub connect: ConnectResults,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile (nearest rank) of `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n => v[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(*x), hi.max(*x))
    })
}

/// `median (min–max)`, rounded.
pub fn with_range(v: &[f64]) -> String {
    let (lo, hi) = min_max(v);
    format!("{:.0} ({lo:.0}–{hi:.0})", median(v.to_vec()))
}

/// A goal and its verdict: met, or missed by how much.
pub fn verdict(measured: f64, target: f64, at_least: bool) -> String {
    if measured.is_nan() {
        "not measured".to_owned()
    } else if at_least && measured < target {
        format!("**missed** by {:.0}%", (1.0 - measured / target) * 100.0)
    } else if !at_least && measured > target {
        format!("**missed** by {:.0}%", (measured / target - 1.0) * 100.0)
    } else {
        "met".to_owned()
    }
}

/// Per point, the median over rounds of `points`' rate divided by `floor`'s in the same round (the machine's
/// drift taken out), or the plain median without a floor series.
pub fn relative(points: &[Point], floor: Option<&Series<Point>>) -> Vec<f64> {
    points
        .iter()
        .enumerate()
        .map(|(k, p)| match floor.and_then(|f| f.points.get(k)) {
            Some(f) => median(p.rates.iter().zip(&f.rates).map(|(r, f)| r / f).collect()),
            None => p.median(),
        })
        .collect()
}

/// The largest relative deviation of a curve from its first point.
pub fn flatness(values: &[f64]) -> f64 {
    let Some(first) = values.first() else {
        return f64::NAN;
    };
    values.iter().map(|v| (v / first - 1.0).abs()).fold(0.0, f64::max)
}

pub fn machine() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("Linux {}, {cpus} CPUs ({model}), {date}", release.trim())
}

impl Results {
    fn find(&self, name: &str) -> Option<&ModeResults> {
        self.modes.iter().find(|m| m.mode.name == name)
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let i = &self.info;
        header(i, &mut out);
        let _ = writeln!(
            out,
            "Sidecar: {}. {CLIENTS} app threads. Modes run interleaved (A B C A B C …), {} rounds of {} s per \
             workload; each figure is the median over rounds, with the range (min–max) where shown. *Short*: \
             connect, one byte each way through the sidecar, close. *Persistent*: one connection per app thread, \
             one byte each way, again and again. *Bulk*: one connection sending {} MiB.\n",
            i.proxy.about(),
            i.repeats,
            i.duration.as_secs_f64(),
            i.bulk_bytes >> 20
        );
        let _ = writeln!(out, "| mode | what |\n|---|---|");
        for m in &self.modes {
            let _ = writeln!(out, "| {} | {} |", m.mode.name, m.mode.about);
        }
        let _ = writeln!(
            out,
            "\n## Results\n\n| mode | short connections/s | persistent p50 µs | p99 µs | p99.9 µs | requests/s | \
             bulk MB/s | CPU µs per short connection | CPU µs per persistent request | CPU µs per bulk MB |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for m in &self.modes {
            let cpu_short = median(m.short.iter().map(Short::cpu_per_connection).collect());
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {cpu_short:.1} | {:.1} | {:.0} |",
                m.mode.name,
                with_range(&m.short_rates()),
                m.persistent_median(0),
                m.persistent_median(1),
                m.persistent_median(2),
                m.persistent_median(3),
                median(m.bulk.iter().map(|b| b.mb_per_second).collect()),
                m.persistent_median(4),
                median(m.bulk.iter().map(|b| b.cpu_per_mb).collect()),
            );
        }
        let _ = writeln!(
            out,
            "\nCPU is the `usage_usec` of the mode's own cgroup (cgroup v2 `cpu.stat`) over the workload, divided by \
             the connections or requests: the app's threads and the sidecar (its threads, or the HAProxy process) \
             and the kernel work done on their behalf while they run. The echo server (remote namespace) and the \
             bench's own main thread are in another cgroup and not counted; softirq work is charged to whichever \
             task it interrupts.\n"
        );
        let _ = writeln!(
            out,
            "Checked after every short-connection run: capture redirected at least as many connections as \
             completed (eBPF: its `redirected` counters; iptables: the packets of `ISTIO_REDIRECT`'s REDIRECT \
             rule), so none bypassed the sidecar. {}\n",
            match i.proxy {
                Proxy::Builtin =>
                    "And each went through the sidecar with the remote server as its original \
                                   destination (none in the floor), as the builtin sidecar reports.",
                Proxy::Haproxy =>
                    "That each one's original destination was the remote server is checked only \
                                   with `--proxy builtin`, which reports its connections (HAProxy does not).",
            }
        );
        self.cost(&mut out);
        self.goals(&mut out);
        connect_section(&self.connect, &mut out);
        self.kernel(&mut out);
        self.scaling(&mut out);
        self.registration(&mut out);
        let _ = writeln!(
            out,
            "## Plots\n\n![latency percentiles per mode](latency.svg)\n\n![short connections/s per mode](connections.svg)\n\n\
             ![scaling with excluded CIDRs and registered namespaces](scaling.svg)"
        );
        out
    }

    /// Capture's own cost per mode: conntrack entries, BPF time per connect() and per captured connection.
    fn cost(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "## Capture's own cost per mode\n\n| mode | conntrack entries in the pod | BPF ns per connect() \
             (connect4) | connect4 runs per connection | BPF ns per captured connection (all programs) |\n\
             |---|---|---|---|---|"
        );
        for m in &self.modes {
            let conntrack = match m.conntrack {
                None => "not read".to_owned(),
                Some(None) => "0 (not loaded)".to_owned(),
                Some(Some(n)) => n.to_string(),
            };
            let (per_run, runs, all) = match (m.mode.backend, m.connect4()) {
                (Backend::Ebpf, Some((ns, runs))) => (
                    format!("{ns:.0}"),
                    format!("{runs:.1}"),
                    format!("{:.0}", m.kernel_per_connection()),
                ),
                _ => ("—".to_owned(), "—".to_owned(), "—".to_owned()),
            };
            let _ = writeln!(out, "| {} | {conntrack} | {per_run} | {runs} | {all} |", m.mode.name);
        }
        let _ = writeln!(
            out,
            "\n*conntrack entries*: `nf_conntrack_count` read inside the mode's pod namespace after the last \
             short-connection run (an entry outlives its connection: TIME_WAIT keeps it 120 s); *not loaded*: \
             the file is absent, no nf_conntrack at all. Capture without iptables should leave it at 0. The BPF \
             figures are `BPF_ENABLE_STATS` run time during the short connections: connect4's `run_time_ns / \
             run_cnt` (its runs are the app's connect, redirected, and the sidecar's upstream connect, passed: the \
             mean of the two paths), and every program's time ÷ connections. The statistics read the clock twice \
             a run, which weighs on small programs; the connect() microbenchmark below measures by wall clock.\n"
        );
    }

    fn goals(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "## Goals (issue 16, *Capture at the floor*)\n\n| goal | target | measured | verdict |\n|---|---|---|---|"
        );
        let (floor, ipt) = (self.find(FLOOR), self.find(IPTABLES));
        let ebpf_modes: Vec<&ModeResults> = self.modes.iter().filter(|m| m.mode.backend == Backend::Ebpf).collect();
        let ratio = |a: Option<&ModeResults>, b: Option<&ModeResults>, f: &dyn Fn(&ModeResults) -> f64| match (a, b) {
            (Some(a), Some(b)) => f(a) / f(b),
            _ => f64::NAN,
        };
        let with = if self.info.proxy == Proxy::Haproxy {
            ""
        } else {
            " (the goal is with HAProxy)"
        };
        for m in &ebpf_modes {
            let name = m.mode.name;
            goal_row(
                out,
                &format!("short connections/s, {name} / floor{with}"),
                "≥ 0.97",
                ratio(Some(m), floor, &ModeResults::short_rate),
                0.97,
                true,
            );
            goal_row(
                out,
                &format!("short connections/s, {name} / iptables{with}"),
                "≥ 1.25",
                ratio(Some(m), ipt, &ModeResults::short_rate),
                1.25,
                true,
            );
            // Without loopback acceleration no worse than iptables; with it, 0.8× iptables.
            let (target, t) = if m.mode.extra_args.contains(&"--loopback-accel") {
                ("≤ 0.80", 0.8)
            } else {
                ("≤ 1.00", 1.0)
            };
            for (i, p) in [(0, "p50"), (1, "p99")] {
                goal_row(
                    out,
                    &format!("persistent {p}, {name} / iptables"),
                    target,
                    ratio(Some(m), ipt, &|r: &ModeResults| r.persistent_median(i)),
                    t,
                    false,
                );
            }
            goal_row(
                out,
                &format!("BPF ns per captured connection, {name} (all programs, `BPF_ENABLE_STATS`)"),
                "< 2000",
                m.kernel_per_connection(),
                2000.0,
                false,
            );
        }
        if !self.modes.iter().any(|m| m.mode.name == EBPF_ACCEL) {
            let _ = writeln!(
                out,
                "| persistent p50/p99, eBPF with loopback acceleration / iptables | ≤ 0.80 | — | not measured: no \
                 such mode yet (`MODES` in bench/src/modes.rs) |"
            );
        }
        connect_goals(&self.connect, out);
        for (axis, series) in [
            ("excluded CIDRs", &self.cidrs),
            ("registered namespaces (pods)", &self.namespaces),
        ] {
            let floor = series.iter().find(|s| s.mode == FLOOR);
            for s in series.iter().filter(|s| s.mode != IPTABLES && s.mode != FLOOR) {
                let (first, last) = match (s.points.first(), s.points.last()) {
                    (Some(f), Some(l)) => (f.x, l.x),
                    _ => continue,
                };
                let dev = flatness(&relative(&s.points, floor));
                let _ = writeln!(
                    out,
                    "| short connections/s flat from {first} to {last} {axis}, {} (÷ floor of the same round) | ±5% | \
                     {:.1}% | {} |",
                    s.mode,
                    dev * 100.0,
                    flat_verdict(dev)
                );
            }
        }
        let r = &self.registration;
        for (series, times, q, what) in [
            ("one pod at a time", &r.paced, 0.5, "median"),
            ("a burst", &r.burst, 0.9, "p90"),
        ] {
            let _ = writeln!(
                out,
                "| registering a pod through the agent, {series}, {what} | < 10 ms | {:.1} ms | {} |",
                quantile(times, q),
                verdict(quantile(times, q), 10.0, false)
            );
        }
        let _ = writeln!(out);
    }

    fn registration(&self, out: &mut String) {
        let r = &self.registration;
        let _ = writeln!(
            out,
            "## Pod registration (node agent)\n\n`capture agent` in a cgroup and a bpffs mount of its own, pods \
             added over its control socket with the injector's flags, each pod a throwaway namespace. The time is \
             the agent's own log line (`registered … micros=`): flags checked, the pod's namespace entered, its \
             map entries written, its sk_lookup copy (loaded ahead) attached, the record saved.\n\n\
             | series | pods | median ms | p90 ms | max ms |\n|---|---|---|---|---|"
        );
        for (series, times) in [
            (format!("one at a time, {} ms apart", PACE.as_millis()), &r.paced),
            ("a burst, back to back".to_owned(), &r.burst),
        ] {
            let _ = writeln!(
                out,
                "| {series} | {} | {:.1} | {:.1} | {:.1} |",
                times.len(),
                quantile(times, 0.5),
                quantile(times, 0.9),
                quantile(times, 1.0)
            );
        }
        let _ = writeln!(
            out,
            "\nThe agent's resident memory after {} pods: {:.1} MiB.\n",
            r.paced.len() + r.burst.len(),
            r.rss_kib as f64 / 1024.0
        );
        kubernetes_section(&self.kubernetes, out);
    }

    fn kernel(&self, out: &mut String) {
        for m in self.modes.iter().filter(|m| !m.kernel.is_empty()) {
            let connections = m.connections().max(1) as f64;
            let _ = writeln!(
                out,
                "## Kernel time per program: {} (during the short connections, `BPF_ENABLE_STATS`)\n\n\
                 | program | runs per connection | ns per run | ns per connection |\n|---|---|---|---|",
                m.mode.name
            );
            let mut total = 0.0;
            for (name, (time, runs)) in m.kernel.iter().filter(|(_, (_, r))| *r > 0) {
                let ns = time.as_nanos() as f64;
                total += ns;
                let _ = writeln!(
                    out,
                    "| {name} | {:.1} | {:.0} | {:.0} |",
                    *runs as f64 / connections,
                    ns / *runs as f64,
                    ns / connections
                );
            }
            let _ = writeln!(out, "| **all** | | | **{:.0}** |\n", total / connections);
        }
    }

    fn scaling(&self, out: &mut String) {
        let i = &self.info;
        let note = format!(
            "Short connections/s, median of {} rounds of {} s per point, rounds interleaved between modes.",
            i.scaling_repeats,
            i.scaling_duration.as_secs_f64()
        );
        if !self.cidrs.is_empty() {
            let _ = writeln!(
                out,
                "## Scaling with excluded CIDRs (`-x`)\n\n{note} The CIDRs are disjoint /27s of 198.18.0.0/15, none \
                 covering the remote server. iptables: one `RETURN` rule per CIDR in `ISTIO_OUTPUT`, walked by \
                 every new connection; eBPF: one LPM-trie lookup. *÷ floor*: the median of each round's rate divided \
                 by the floor's in the same round (the floor has no capture, so this takes the machine's drift out).\n"
            );
            scaling_table(out, "excluded CIDRs", &self.cidrs, None);
        }
        if let Some(first) = self.namespaces.first() {
            let _ = writeln!(
                out,
                "## Scaling with registered namespaces (eBPF)\n\n{note} Each point registers more throwaway \
                 namespaces with the same capture (same cgroup and pins, injector flags, through the loader's \
                 `Maps::register`: running `capture` in each reloads the programs, about a second each here); the pod \
                 is one of them. \
                 iptables has no such axis: its rules live in each namespace, and another namespace's rules never \
                 touch this pod's connections.\n"
            );
            let setup: Vec<String> = first
                .points
                .iter()
                .map(|p| format!("{:.1} s", p.setup.map_or(0.0, |d| d.as_secs_f64())))
                .collect();
            scaling_table(
                out,
                "registered namespaces",
                &self.namespaces,
                Some(("time to make and register the added namespaces", &setup)),
            );
        }
    }
}

/// One scaling table: a row per point; per mode its rate (median and range), its rate ÷ the floor's
/// (eBPF and iptables), iptables' rule count; then `extra`, a column of its own.
fn scaling_table(out: &mut String, axis: &str, series: &[Series<Point>], extra: Option<(&str, &[String])>) {
    let Some(first) = series.first() else { return };
    let floor = series.iter().find(|s| s.mode == FLOOR);
    let mut header = format!("| {axis} |");
    for s in series {
        let _ = write!(header, " {} conn/s |", s.mode);
        if s.mode != FLOOR && floor.is_some() {
            let _ = write!(header, " {} ÷ floor |", s.mode);
        }
        if s.mode == IPTABLES {
            header.push_str(" iptables rules |");
        }
    }
    if let Some((title, _)) = extra {
        let _ = write!(header, " {title} |");
    }
    let _ = writeln!(out, "{header}\n|{}", "---|".repeat(header.matches('|').count() - 1));
    let relatives: Vec<Vec<f64>> = series.iter().map(|s| relative(&s.points, floor)).collect();
    for k in 0..first.points.len() {
        let mut line = format!("| {} |", first.points[k].x);
        for (s, rel) in series.iter().zip(&relatives) {
            let q = &s.points[k];
            let _ = write!(line, " {} |", with_range(&q.rates));
            if s.mode != FLOOR && floor.is_some() {
                let _ = write!(line, " {:.2} |", rel[k]);
            }
            if s.mode == IPTABLES {
                let _ = write!(line, " {} |", q.rules.unwrap_or(0));
            }
        }
        if let Some((_, column)) = extra {
            let _ = write!(line, " {} |", column.get(k).map_or("", String::as_str));
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out);
}

/// How far a scaling curve may stray from its first point (issue 16: ±5%).
const FLAT: f64 = 0.05;

/// One row of the goals table: ratios with two decimals, nanoseconds whole.
fn goal_row(out: &mut String, goal: &str, target: &str, measured: f64, t: f64, at_least: bool) {
    let digits = if t >= 10.0 { 0 } else { 2 };
    let _ = writeln!(
        out,
        "| {goal} | {target} | {measured:.digits$} | {} |",
        verdict(measured, t, at_least)
    );
}

/// The report's first lines: the command, the machine, how long it took.
fn header(i: &RunInfo, out: &mut String) {
    let _ = writeln!(out, "# capture benchmark\n");
    let _ = writeln!(
        out,
        "`{}` on {}; the run took {:.0} s.{}\n",
        i.command,
        machine(),
        i.took.as_secs_f64(),
        if i.quick {
            " **Quick run**: fewer and shorter rounds, fewer scaling points; for a sanity check, not for figures."
        } else {
            ""
        }
    );
}

/// The goal rows the connect() microbenchmark answers (wall clock, ebpf redirect − no capture).
fn connect_goals(c: &ConnectResults, out: &mut String) {
    let Some(v) = c.find(connect::REDIRECT) else {
        return;
    };
    goal_row(
        out,
        "ns per UDP connect() on the redirect path, ebpf redirect − no capture (connect() microbenchmark, wall clock)",
        "< 300",
        c.delta(v, Figure::Udp),
        300.0,
        false,
    );
    goal_row(
        out,
        "ns per captured TCP connection end to end, ebpf redirect − no capture (connect() microbenchmark, wall \
         clock)",
        "< 2000",
        c.delta(v, Figure::TcpConnection),
        2000.0,
        false,
    );
    let (Some(large), Some(base)) = (c.find(connect::LARGE), c.find(connect::NO_CAPTURE)) else {
        return;
    };
    // What the large configuration adds to a captured connection, against a whole connection with no
    // capture: a connection through a proxy costs more than that one leg, so this bounds the rate's change.
    let added = connect::difference(large, v, Figure::TcpConnection);
    let dev = added / median(base.tcp_connection.clone());
    let _ = writeln!(
        out,
        "| captured TCP connection end to end flat from 1 to {} excluded CIDRs and from 1 to {} registered \
         namespaces, ebpf (connect() microbenchmark: *{}* − *{}* in the same round, ÷ a connection with no \
         capture) | ±5% | {:+.1}% ({added:+.0} ns) | {} |",
        connect::LARGE_CIDRS,
        c.plan.namespaces,
        connect::LARGE,
        connect::REDIRECT,
        dev * 100.0,
        flat_verdict(dev.abs()),
    );
}

/// The verdict of a flatness goal, from a curve's largest deviation.
fn flat_verdict(dev: f64) -> String {
    if dev <= FLAT {
        "met".to_owned()
    } else {
        format!("**missed** by {:.1} points", (dev - FLAT) * 100.0)
    }
}

/// The connect() microbenchmark's section: what it measures and a row per variant.
fn connect_section(c: &ConnectResults, out: &mut String) {
    let p = &c.plan;
    let _ = writeln!(
        out,
        "## connect() microbenchmark\n\n\
         Wall clock, with `BPF_ENABLE_STATS` off{}. Four pod namespaces of this section's own, each joined by \
         veth to a remote one, each with a listening socket on 0.0.0.0:15001 (made in the namespace's cgroup as \
         uid 1337) standing in for the proxy's; iptables and eBPF get the injector's flags plus `--redirect-dns \
         --capture-all-dns`, so that a UDP connect has a redirect path; the fourth namespace's eBPF capture \
         also excludes {} CIDRs, and {} namespaces are registered in its maps (*{}*). Each variant is one thread in its \
         namespace and cgroup, as the variant's uid, playing both ends of its connections, so no wake-up of \
         another thread is measured. Variants run interleaved, each round starting one further on, {} rounds; \
         each figure is the median over rounds with the range, and Δ is the median of the variant's difference \
         to *no capture* in the same round.\n\n\
         - *UDP connect()*: one UDP socket connected to 192.0.2.2:53 again and again, {} times a round in \
         batches of 1,000 (a round's figure: the median batch): each call runs the cgroup connect4 hook and a \
         route lookup, no packet, no handshake.\n\
         - *TCP connect()*: the time inside a blocking connect(), {} connections a round (a round's figure: the \
         median connection). Over loopback the whole handshake runs inside the call, so this includes the \
         SYN's path: sockops callbacks, sk_lookup, iptables' nat and conntrack.\n\
         - *TCP connection end to end*: one iteration of socket, connect, accept on the listening socket, \
         `SO_ORIGINAL_DST` on the accepted one (a proxy asks for every connection), its close, and the \
         client's close with a reset (`SO_LINGER` 0, so no TIME_WAIT piles up). Its Δ is what capture adds to \
         the app's leg of a captured connection, every program included (connect4, sockops, sk_lookup, \
         getsockopt); the proxy's upstream connect, which capture passes, is not in it (its connect4 cost is \
         about *ebpf pass*'s UDP Δ).\n\n\
         Checked in every round: a redirected UDP socket ends connected to 127.0.0.1:15053 and any other to \
         192.0.2.2:53; `SO_ORIGINAL_DST` gave 192.0.2.2:8080 for every redirected TCP connection and for no \
         other. Once any cgroup on the machine has a connect4 program (here, at least this section's eBPF \
         namespace), every connect() enters the hook (a node-wide static key), locks the socket and looks for \
         programs in its cgroup; so *no capture* includes that, as any pod on a node with capture does.\n\n\
         | variant | what it measures | UDP connect() ns | Δ | TCP connect() ns | Δ | TCP connection end to end \
         ns | Δ |\n|---|---|---|---|---|---|---|---|",
        if c.stats_enabled {
            " (**but something else had turned the statistics on** during it, so every figure with a program \
             includes their clock reads)"
        } else {
            ""
        },
        connect::LARGE_CIDRS,
        p.namespaces,
        connect::LARGE,
        p.repeats,
        grouped(p.udp_connects),
        grouped(p.tcp_connections),
    );
    for v in &c.variants {
        let mut line = format!("| {} | {} |", v.variant.name, v.variant.about);
        for f in [Figure::Udp, Figure::TcpConnect, Figure::TcpConnection] {
            let delta = if v.variant.name == connect::NO_CAPTURE {
                "—".to_owned()
            } else {
                format!("{:+.0}", c.delta(v, f))
            };
            let _ = write!(line, " {} | {delta} |", with_range(v.rounds(f)));
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out);
}

/// `n` with its thousands separated by commas: 100,000.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// The report of `--only connect`: the header, the microbenchmark and its goals.
pub fn connect_report(info: &RunInfo, c: &ConnectResults) -> String {
    let mut out = String::new();
    header(info, &mut out);
    connect_section(c, &mut out);
    let _ = writeln!(
        out,
        "## Goals (issue 16, *Capture at the floor*), those this section answers\n\n\
         | goal | target | measured | verdict |\n|---|---|---|---|"
    );
    connect_goals(c, &mut out);
    out
}

/// `--only kubernetes`: the run's header and the Kubernetes section.
pub fn kubernetes_report(info: &RunInfo, times: &[f64]) -> String {
    let mut out = String::new();
    header(info, &mut out);
    kubernetes_section(times, &mut out);
    out
}

/// Pods created at once through the Kubernetes API: `k`, Running to captured, ms.
fn kubernetes_section(k: &[f64], out: &mut String) {
    let _ = writeln!(
        out,
        "## Pods from the Kubernetes API to capture\n\n{} injected pods created at once on the agent's node in a real \
         kube-apiserver (v1.20.2), then run one after another by the test kubelet (namespace, sandbox in the \
         kubelet's cgroup, Running status). The time is from the Running status written to the agent's \
         `registered` line for the pod: the watch event, the /proc scan that finds the namespace, the \
         registration. Negative: the agent found the sandbox before the status said Running.\n\n\
         | pods | median ms | p99 ms | max ms |\n|---|---|---|---|\n| {} | {:.1} | {:.1} | {:.1} |\n",
        k.len(),
        k.len(),
        quantile(k, 0.5),
        quantile(k, 0.99),
        quantile(k, 1.0)
    );
}

/// One line per mode for the terminal, besides the report.
pub fn summary_line(m: &ModeResults) -> String {
    format!(
        "{:<10} short {:>7.0} conn/s, persistent p50 {:.0} µs p99 {:.0} µs",
        m.mode.name,
        m.short_rate(),
        m.persistent_median(0),
        m.persistent_median(1)
    )
}

#[cfg(test)]
mod tests {
    use super::{grouped, quantile};

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(3_000), "3,000");
        assert_eq!(grouped(100_000), "100,000");
        assert_eq!(grouped(1_000_000), "1,000,000");
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(quantile(&v, 0.5), 5.0);
        assert_eq!(quantile(&v, 0.9), 9.0);
        assert_eq!(quantile(&v, 1.0), 10.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
