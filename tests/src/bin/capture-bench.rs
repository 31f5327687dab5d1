//! The benchmark behind `cargo xtask bench`: an app talking through its sidecar to a remote server, under
//! three modes built the same way. Workloads: short connections (connect, one byte there and back, close),
//! and persistent connections (one byte there and back, again and again; latency percentiles).
//! Modes:
//!
//! - `floor`: no capture; the app connects to the sidecar directly (the limit of this topology);
//! - `iptables`: istio's rules, injector flags;
//! - `ebpf`: capture's eBPF backend, injector flags.
//!
//! Modes run interleaved (A B C A B C …) so that machine noise hits them alike; each figure is the median
//! over the repeats, and ratios are taken between medians of the same run. Everything lives in throwaway
//! namespaces, a child cgroup and a private bpffs, removed at the end; every load loop is bounded in time.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use hdrhistogram::Histogram;
use tests::{BpfPins, Cgroup, INJECTOR_DEFAULT_FLAGS, Netns, Pod, REMOTE_V4, capture_with_env, sa, sidecar::Sidecar};

const APP: (u32, u32) = (1000, 1000);
const PROXY: (u32, u32) = (1337, 1337);
const REMOTE_PORT: u16 = 8080;
/// App threads making connections at once.
const CLIENTS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Floor,
    Iptables,
    Ebpf,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Floor, Mode::Iptables, Mode::Ebpf];

    fn name(self) -> &'static str {
        match self {
            Mode::Floor => "floor (no capture)",
            Mode::Iptables => "iptables",
            Mode::Ebpf => "ebpf",
        }
    }
}

/// One mode's topology, live for the whole run.
struct Bench {
    mode: Mode,
    pod: Pod,
    _sidecar: Sidecar,
    _server: EchoServer,
    _pins: BpfPins,
}

/// The first byte of a bulk transfer: the server then reads to the end and answers one byte.
const BULK: u8 = b'B';
/// Bytes per bulk transfer.
const BULK_BYTES: usize = 256 << 20;

/// A one-byte echo server in the remote namespace (one thread per connection); a connection that starts
/// with [`BULK`] is read to its end instead, then answered.
struct EchoServer {
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    fn start(ns: &Netns, addr: SocketAddr) -> EchoServer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        ns.spawn(None, move || {
            let listener = TcpListener::bind(addr).expect("echo server: listen");
            ready_tx.send(()).expect("ready");
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut byte = [0];
                    if conn.read_exact(&mut byte).is_ok() {
                        if byte[0] == BULK {
                            let _ = std::io::copy(&mut conn, &mut std::io::sink());
                        }
                        let _ = conn.write_all(&byte);
                    }
                });
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("echo server did not start");
        EchoServer { stop }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn setup(mode: Mode, cgroup: &Cgroup) -> Result<Bench> {
    let pod = Pod::new("bench");
    // Many short connections: let clients reuse ports in TIME_WAIT, as a busy pod would be tuned.
    for ns in [&pod.pod, &pod.remote] {
        tests::run(ns.command("sysctl").args([
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ]));
    }
    let server = EchoServer::start(&pod.remote, sa(REMOTE_V4, REMOTE_PORT));
    let pins = BpfPins::new("bench");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let mut args: Vec<&str> = match mode {
        Mode::Floor => Vec::new(),
        Mode::Iptables => vec!["--backend", "iptables"],
        Mode::Ebpf => vec!["--backend", "ebpf", "--cgroup", &cg, "--pin-dir", &pin],
    };
    if mode != Mode::Floor {
        args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
        let out = capture_with_env(&pod.pod, &args, &[]);
        if !out.status.success() {
            bail!(
                "{}: capture failed: {}",
                mode.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    // The floor's app connects to the sidecar itself, which then has no original destination to read.
    let fallback = (mode == Mode::Floor).then_some(sa(REMOTE_V4, REMOTE_PORT));
    let (tx, rx) = mpsc::channel();
    drop(rx);
    let sidecar = Sidecar::start_with_fallback(&pod.pod, PROXY, &[15001, 15006], 15006, tx, fallback);
    Ok(Bench {
        mode,
        pod,
        _sidecar: sidecar,
        _server: server,
        _pins: pins,
    })
}

/// The destination the app uses in `mode`.
fn app_destination(mode: Mode) -> SocketAddr {
    match mode {
        Mode::Floor => sa(Ipv4Addr::LOCALHOST, 15001),
        Mode::Iptables | Mode::Ebpf => sa(REMOTE_V4, REMOTE_PORT),
    }
}

/// Round-trip latencies in nanoseconds, and round trips per second.
struct Latency {
    histogram: Histogram<u64>,
    per_second: f64,
}

/// Persistent connections for `duration`: each client keeps one connection and sends one byte at a time,
/// waiting for the echo; every round trip's latency is recorded.
fn persistent(b: &Bench, duration: Duration) -> Latency {
    let dst = app_destination(b.mode);
    let deadline = Instant::now() + duration;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            b.pod.pod.spawn(Some(APP), move || {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(2)) else {
                    return h;
                };
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut byte = [7];
                while Instant::now() < deadline {
                    let start = Instant::now();
                    if s.write_all(&byte).is_err() || s.read_exact(&mut byte).is_err() {
                        break;
                    }
                    let _ = h.record(start.elapsed().as_nanos() as u64);
                }
                h
            })
        })
        .collect();
    let started = Instant::now();
    let mut histogram = Histogram::<u64>::new(3).expect("histogram");
    for c in clients {
        if let Ok(h) = c.join() {
            let _ = histogram.add(h);
        }
    }
    let per_second = histogram.len() as f64 / started.elapsed().as_secs_f64();
    Latency { histogram, per_second }
}

/// One bulk transfer of [`BULK_BYTES`] from the app: MB/s.
fn bulk(b: &Bench) -> f64 {
    let dst = app_destination(b.mode);
    b.pod
        .pod
        .spawn(Some(APP), move || {
            let started = Instant::now();
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
            let chunk = vec![0u8; 64 << 10];
            s.write_all(&[BULK]).ok()?;
            for _ in 0..BULK_BYTES / chunk.len() {
                s.write_all(&chunk).ok()?;
            }
            s.shutdown(Shutdown::Write).ok()?;
            let mut byte = [0];
            s.read_exact(&mut byte).ok()?;
            Some(BULK_BYTES as f64 / 1e6 / started.elapsed().as_secs_f64())
        })
        .join()
        .ok()
        .flatten()
        .unwrap_or(0.0)
}

/// Run time and run count of every loaded capture program, by id (needs `BPF_ENABLE_STATS` on).
fn program_stats() -> std::collections::HashMap<u32, (String, Duration, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            let name = p.name_as_str()?.to_owned();
            name.starts_with("capture_")
                .then(|| (p.id(), (name, p.run_time(), p.run_count())))
        })
        .collect()
}

/// Short connections for `duration`: returns completed connections per second.
fn short_connections(b: &Bench, duration: Duration) -> f64 {
    let dst = app_destination(b.mode);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let done = done.clone();
            b.pod.pod.spawn(Some(APP), move || {
                while Instant::now() < deadline {
                    let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(2)) else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut byte = [7];
                    if s.write_all(&byte).is_ok() && s.read_exact(&mut byte).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = s.shutdown(Shutdown::Both);
                }
            })
        })
        .collect();
    let started = Instant::now();
    for c in clients {
        let _ = c.join();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, capture, out_dir, quick] = args.as_slice() else {
        bail!("usage: capture-bench CAPTURE_BIN OUT_DIR QUICK(true|false) (run it with `cargo xtask bench`)");
    };
    // SAFETY: set before any thread that reads the environment is started.
    unsafe { std::env::set_var("CAPTURE_BIN", capture) };
    let quick = quick == "true";
    let (repeats, duration) = if quick {
        (3, Duration::from_secs(2))
    } else {
        (7, Duration::from_secs(5))
    };

    // The sidecar (threads of this process) must create its sockets inside the cgroup the eBPF backend
    // attaches to; the app threads too.
    let cgroup = Cgroup::new("bench");
    let inside = cgroup.enter_self();
    let benches: Vec<Bench> = Mode::ALL.iter().map(|&m| setup(m, &cgroup)).collect::<Result<_>>()?;
    // Per-program run time while the eBPF mode runs short connections (statistics on only while this lives).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS (Linux 5.8)")?;
    let mut kernel: std::collections::BTreeMap<String, (Duration, u64)> = Default::default();
    let mut bulk_rates: Vec<Vec<f64>> = vec![Vec::new(); benches.len()];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); benches.len()];
    // Per mode: p50, p99, p99.9 (µs) and round trips per second, one entry per round.
    let mut latencies: Vec<[Vec<f64>; 4]> = vec![Default::default(); benches.len()];
    for round in 1..=repeats {
        for (i, b) in benches.iter().enumerate() {
            let before = program_stats();
            let r = short_connections(b, duration);
            if b.mode == Mode::Ebpf {
                for (id, (name, time, count)) in program_stats() {
                    let (t0, c0) = before.get(&id).map_or((Duration::ZERO, 0), |(_, t, c)| (*t, *c));
                    let e = kernel.entry(name).or_default();
                    e.0 += time.saturating_sub(t0);
                    e.1 += count.saturating_sub(c0);
                }
            }
            let l = persistent(b, duration);
            bulk_rates[i].push(bulk(b));
            let q = |p: f64| l.histogram.value_at_quantile(p) as f64 / 1000.0;
            let (p50, p99, p999) = (q(0.5), q(0.99), q(0.999));
            eprintln!(
                "bench: round {round}/{repeats} {:<20} {r:>7.0} conn/s | persistent p50 {p50:.0} µs, p99 {p99:.0} µs, \
                 p99.9 {p999:.0} µs, {:.0} req/s",
                b.mode.name(),
                l.per_second
            );
            rates[i].push(r);
            for (slot, v) in latencies[i].iter_mut().zip([p50, p99, p999, l.per_second]) {
                slot.push(v);
            }
        }
    }
    drop(benches);
    drop(inside);

    let medians: Vec<f64> = rates.into_iter().map(median).collect();
    let bulk_medians: Vec<f64> = bulk_rates.into_iter().map(median).collect();
    let lat: Vec<[f64; 4]> = latencies.into_iter().map(|l| l.map(median)).collect();
    let (floor, ipt, bpf) = (medians[0], medians[1], medians[2]);
    let mut report = format!(
        "# capture benchmark\n\n{CLIENTS} client threads, {repeats} interleaved rounds of {}s per mode and workload; \
         medians over the rounds. Short: connect, 1 byte each way through the sidecar, close. Persistent: one \
         connection per client, 1 byte each way, again and again.\n\n\
         | mode | short connections/s | persistent p50 µs | p99 µs | p99.9 µs | requests/s |\n|---|---|---|---|---|---|\n",
        duration.as_secs()
    );
    for ((m, r), l) in Mode::ALL.iter().zip(&medians).zip(&lat) {
        report.push_str(&format!(
            "| {} | {r:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            m.name(),
            l[0],
            l[1],
            l[2],
            l[3]
        ));
    }
    report.push_str(&format!(
        "\n| ratio | value |\n|---|---|\n| short connections/s, ebpf / iptables | {:.2} |\n\
         | short connections/s, ebpf / floor | {:.2} |\n| persistent p50, ebpf / iptables | {:.2} |\n\
         | persistent p99, ebpf / iptables | {:.2} |\n",
        bpf / ipt,
        bpf / floor,
        lat[2][0] / lat[1][0],
        lat[2][1] / lat[1][1]
    ));
    report.push_str(&format!(
        "\n| mode | bulk MB/s ({} MiB, one connection) |\n|---|---|\n",
        BULK_BYTES >> 20
    ));
    for (m, r) in Mode::ALL.iter().zip(&bulk_medians) {
        report.push_str(&format!("| {} | {r:.0} |\n", m.name()));
    }
    report.push_str("\n| kernel program (eBPF mode, short connections) | runs | ns per run |\n|---|---|---|\n");
    for (name, (time, count)) in &kernel {
        if *count > 0 {
            report.push_str(&format!(
                "| {name} | {count} | {:.0} |\n",
                time.as_nanos() as f64 / *count as f64
            ));
        }
    }
    print!("{report}");
    let dir = PathBuf::from(out_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path: &Path = &dir.join("report.md");
    std::fs::write(path, &report).with_context(|| format!("write {}", path.display()))?;
    eprintln!("bench: report written to {}", path.display());
    Ok(())
}
