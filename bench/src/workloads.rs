//! The load the app puts through its sidecar, the same in every mode; each workload also reads the CPU
//! the mode's cgroup (app and sidecar) spent meanwhile. Every loop ends at a deadline.

use std::{
    collections::{HashMap, HashSet},
    io::{Read as _, Write as _},
    net::{Shutdown, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use hdrhistogram::Histogram;

use crate::topology::{BULK, Topology};

/// App threads making connections at once.
pub const CLIENTS: usize = 4;
/// How long a connect or a read may block before the attempt counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Short connections: connect, one byte there and back, close.
pub struct Short {
    pub connections: u64,
    pub elapsed: Duration,
    /// CPU of the mode's cgroup meanwhile.
    pub cpu: Duration,
}

impl Short {
    pub fn per_second(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU µs per connection.
    pub fn cpu_per_connection(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.connections.max(1) as f64
    }
}

/// Short connections from [`CLIENTS`] app threads for `duration`; checks that capture redirected them
/// (any sidecar) and, with the builtin one, that they went through it as the mode means them to.
pub fn short(t: &Topology, duration: Duration) -> Result<Short> {
    let dst = t.app_destination();
    let done = Arc::new(AtomicU64::new(0));
    t.forget_forwarded();
    let redirected = t.redirected()?;
    let deadline = Instant::now() + duration;
    let cpu = t.cpu()?;
    let started = Instant::now();
    let clients = (0..CLIENTS)
        .map(|_| {
            let done = done.clone();
            t.spawn_app(move || {
                while Instant::now() < deadline {
                    let Ok(mut s) = TcpStream::connect_timeout(&dst, IO_TIMEOUT) else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                    let mut byte = [7];
                    if s.write_all(&byte).is_ok() && s.read_exact(&mut byte).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = s.shutdown(Shutdown::Both);
                }
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for c in clients {
        let _ = c.join();
    }
    let short = Short {
        connections: done.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        cpu: t.cpu()?.saturating_sub(cpu),
    };
    t.check_forwarded(short.connections)?;
    t.check_redirected(redirected, short.connections)?;
    Ok(short)
}

/// Persistent connections: round-trip latencies (ns) of every request.
pub struct Persistent {
    pub histogram: Histogram<u64>,
    pub elapsed: Duration,
    pub cpu: Duration,
}

impl Persistent {
    pub fn per_second(&self) -> f64 {
        self.histogram.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The latency at quantile `q`, in µs.
    pub fn micros(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }

    /// CPU µs per request.
    pub fn cpu_per_request(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.histogram.len().max(1) as f64
    }
}

/// A new latency histogram: 1 µs to 10 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 10_000_000_000, 3).expect("valid histogram bounds")
}

/// Each of [`CLIENTS`] app threads keeps one connection and sends one byte at a time, waiting for the echo,
/// for `duration`.
pub fn persistent(t: &Topology, duration: Duration) -> Result<Persistent> {
    let dst = t.app_destination();
    let deadline = Instant::now() + duration;
    let cpu = t.cpu()?;
    let started = Instant::now();
    let clients = (0..CLIENTS)
        .map(|_| {
            t.spawn_app(move || {
                let mut h = histogram();
                let Ok(mut s) = TcpStream::connect_timeout(&dst, IO_TIMEOUT) else {
                    return h;
                };
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
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
        .collect::<Result<Vec<_>>>()?;
    let mut histogram = histogram();
    for c in clients {
        if let Ok(h) = c.join() {
            let _ = histogram.add(h);
        }
    }
    Ok(Persistent {
        histogram,
        elapsed: started.elapsed(),
        cpu: t.cpu()?.saturating_sub(cpu),
    })
}

/// One bulk transfer: MB/s and the CPU it took.
pub struct Bulk {
    pub mb_per_second: f64,
    /// CPU µs of the mode's cgroup per MB sent.
    pub cpu_per_mb: f64,
}

/// One connection from the app sending `bytes` (after the [`BULK`] marker) and waiting for the answer.
pub fn bulk(t: &Topology, bytes: usize) -> Result<Bulk> {
    let dst = t.app_destination();
    let cpu = t.cpu()?;
    let rate = t
        .spawn_app(move || {
            let started = Instant::now();
            let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
            let chunk = vec![0u8; 64 << 10];
            s.write_all(&[BULK]).ok()?;
            for _ in 0..bytes / chunk.len() {
                s.write_all(&chunk).ok()?;
            }
            s.shutdown(Shutdown::Write).ok()?;
            let mut byte = [0];
            s.read_exact(&mut byte).ok()?;
            Some(bytes as f64 / 1e6 / started.elapsed().as_secs_f64())
        })?
        .join()
        .ok()
        .flatten()
        .unwrap_or(0.0);
    Ok(Bulk {
        mb_per_second: rate,
        cpu_per_mb: t.cpu()?.saturating_sub(cpu).as_secs_f64() * 1e6 / (bytes as f64 / 1e6),
    })
}

/// Run time and run count of the loaded programs that use one of `maps` (a mode's pinned maps), by program
/// id (`BPF_ENABLE_STATS` must be on), each named as `names` says (else by the kernel's 15 characters).
/// Filtering by map keeps out every other capture program on the machine: another mode's, or another test
/// run's.
pub fn program_stats(maps: &HashSet<u32>, names: &HashMap<u32, String>) -> HashMap<u32, (String, Duration, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.iter().any(|id| maps.contains(id)))
        })
        .filter_map(|p| {
            let name = names
                .get(&p.id())
                .cloned()
                .or_else(|| Some(p.name_as_str()?.to_owned()))?;
            Some((p.id(), (name, p.run_time(), p.run_count())))
        })
        .collect()
}

/// What each program name spent between two [`program_stats`] snapshots: (time, runs).
pub fn stats_delta(
    before: &HashMap<u32, (String, Duration, u64)>,
    after: &HashMap<u32, (String, Duration, u64)>,
) -> HashMap<String, (Duration, u64)> {
    let mut delta: HashMap<String, (Duration, u64)> = HashMap::new();
    for (id, (name, time, count)) in after {
        let (t0, c0) = before.get(id).map_or((Duration::ZERO, 0), |(_, t, c)| (*t, *c));
        let e = delta.entry(name.clone()).or_default();
        e.0 += time.saturating_sub(t0);
        e.1 += count.saturating_sub(c0);
    }
    delta
}
