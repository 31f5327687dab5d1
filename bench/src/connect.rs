//! The connect() microbenchmark (part of every run; `--only connect` runs it alone): how long a connect()
//! takes in a pod namespace with each kind of capture, by wall clock, and what a captured TCP connection
//! costs end to end. Wall clock, not `BPF_ENABLE_STATS`: the statistics read the clock twice per program
//! run, which inflates small programs, so this section runs before they are turned on.
//!
//! Four pod namespaces of its own (each joined by veth to a remote one, so 192.0.2.2 is routable), each
//! with a listening socket on 0.0.0.0:15001 standing in for the proxy's: one without capture (two cgroups:
//! nothing attached, and the [`EmptyConnect4`] program), one with the iptables backend, and two with the
//! eBPF backend, each attached to its own cgroup: one as the injector configures it, one with capture's
//! configuration at the size of the scaling axes' last points (4096 excluded CIDRs, and more namespaces
//! registered in its maps), so that the redirect path's cost at both ends is compared in the same rounds
//! ([`LARGE`]). Every capture gets the injector's defaults plus DNS capture, so that a UDP connect has a
//! redirect path. Each [`VARIANTS`] entry is a thread in one namespace and cgroup, as
//! one uid; it plays both ends of a TCP connection (connect, then accept on the listening socket), so no
//! wake-up of another thread, and no scheduler, comes into the figures. Variants run interleaved; a round's
//! figure is the median over its connects (UDP: over batches of [`BATCH`]), the report's the median over
//! rounds, and a variant's Δ the median of its difference to no capture in the same round. Every loop stops
//! at its count or after [`LIMIT`].

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use testkit::{BpfPins, Netns, Pod, REMOTE_V4};

use crate::{
    Progress,
    cgroups::{self, Cgroups},
    empty_program::EmptyConnect4,
    modes::Backend,
    report::median,
    scaling::{excluded_cidrs, flags_with_excluded},
    topology::{APP, OUTBOUND_PORT, PROXY, REMOTE_PORT, apply_capture, register_namespaces},
};

/// How much to run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub repeats: usize,
    /// UDP connects per variant and round.
    pub udp_connects: u64,
    /// TCP connections per variant and round.
    pub tcp_connections: u64,
    /// Namespaces registered in the [`LARGE`] variant's capture, its own included.
    pub namespaces: usize,
}

/// Planned seconds to build the namespaces and apply capture (for the time-left estimate only).
const SETUP_SECONDS: f64 = 3.0;
/// Planned seconds per UDP connect and per TCP connection (for the time-left estimate only).
const UDP_SECONDS: f64 = 0.6e-6;
const TCP_SECONDS: f64 = 15e-6;

impl Plan {
    /// Planned seconds of the section.
    pub fn seconds(&self) -> f64 {
        let round = self.udp_connects as f64 * UDP_SECONDS + self.tcp_connections as f64 * TCP_SECONDS;
        SETUP_SECONDS
            + self.namespaces as f64 * crate::NAMESPACE_SECONDS
            + self.repeats as f64 * VARIANTS.len() as f64 * round
    }
}

/// A run stops here however many connects it has made (its figure is then over those it made).
const LIMIT: Duration = Duration::from_secs(10);
/// How long one connect, accept or read may block before the run fails.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// UDP connects between two looks at the clock.
const BATCH: u64 = 1000;
/// Where the UDP socket connects: port 53, so that DNS capture redirects the app's.
const UDP_DST: SocketAddr = SocketAddr::V4(SocketAddrV4::new(REMOTE_V4, 53));
/// Where a redirected UDP socket ends up connected: the DNS proxy's port on localhost.
const DNS_PROXY: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15053));
/// The listener itself, for connections that are not redirected.
const LISTENER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT));
/// A destination capture redirects to the listener (the remote's echo port: nothing listens there in
/// these namespaces, so a connection that was not redirected fails).
const REMOTE: SocketAddr = SocketAddr::V4(SocketAddrV4::new(REMOTE_V4, REMOTE_PORT));

/// Which namespace (and cgroup) a variant runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// No capture; the cgroup with nothing attached.
    Plain,
    /// No capture; the cgroup with the empty connect4 program.
    Empty,
    Iptables,
    Ebpf,
    /// eBPF with [`LARGE_CIDRS`] excluded CIDRs and [`Plan::namespaces`] registered namespaces.
    EbpfLarge,
}

/// One variant: where it runs, as whom, and what it connects to.
#[derive(Debug)]
pub struct Variant {
    pub name: &'static str,
    /// What it measures, for the report.
    pub about: &'static str,
    place: Place,
    ids: (u32, u32),
    /// Where the UDP socket is connected after its connects (the rewritten address when redirected).
    udp_peer: SocketAddr,
    tcp: SocketAddr,
    /// Whether the listener sees the TCP connections with [`REMOTE`] as their original destination.
    tcp_redirected: bool,
}

/// The name of the variant every Δ is taken against.
pub const NO_CAPTURE: &str = "no capture";
/// The variant of the per-connect and per-connection goals.
pub const REDIRECT: &str = "ebpf redirect";
/// The redirect path with capture's configuration at the scaling axes' far ends: compared with
/// [`REDIRECT`] round by round, it bounds how much the per-connection cost grows with the configuration,
/// by wall clock and far more precisely than the short-connection rates of the scaling section can.
pub const LARGE: &str = "ebpf redirect, large";
/// Excluded CIDRs (`-x`) of the [`LARGE`] variant's capture: the CIDR axis' last point.
pub const LARGE_CIDRS: usize = 4096;

/// Every variant, in the order they run in each round.
pub const VARIANTS: &[Variant] = &[
    Variant {
        name: NO_CAPTURE,
        about: "nothing attached, no rules: UDP to 192.0.2.2:53; TCP to the listener, 127.0.0.1:15001",
        place: Place::Plain,
        ids: APP,
        udp_peer: UDP_DST,
        tcp: LISTENER,
        tcp_redirected: false,
    },
    Variant {
        name: "empty program",
        about: "the same, in a cgroup with a connect4 program that only lets the connect proceed (`r0 = 1; \
                exit`): the hook's own cost, the floor for any connect4 program",
        place: Place::Empty,
        ids: APP,
        udp_peer: UDP_DST,
        tcp: LISTENER,
        tcp_redirected: false,
    },
    Variant {
        name: "iptables",
        about: "istio's rules, as the app: a UDP connect() sends nothing, so no rule runs (NAT happens to the \
                first packet); TCP to 192.0.2.2:8080 is REDIRECTed to 15001 (nat OUTPUT and conntrack on the \
                SYN, conntrack answers `SO_ORIGINAL_DST`)",
        place: Place::Iptables,
        ids: APP,
        udp_peer: UDP_DST,
        tcp: REMOTE,
        tcp_redirected: true,
    },
    Variant {
        name: "ebpf pass",
        about: "capture's programs, as the proxy's uid 1337, whose connects pass (rule c), as a proxy's every \
                upstream connect does: UDP to 192.0.2.2:53, TCP to 127.0.0.1:15001 (the listener's side \
                still runs sockops, sk_lookup and getsockopt)",
        place: Place::Ebpf,
        ids: PROXY,
        udp_peer: UDP_DST,
        tcp: LISTENER,
        tcp_redirected: false,
    },
    Variant {
        name: REDIRECT,
        about: "capture's programs, as the app: UDP to 192.0.2.2:53 redirected to the DNS proxy's \
                127.0.0.1:15053 (rule f), its server kept with the socket; TCP to 192.0.2.2:8080 redirected \
                to 127.0.0.1:15001 (rule j), then sockops, sk_lookup and getsockopt",
        place: Place::Ebpf,
        ids: APP,
        udp_peer: DNS_PROXY,
        tcp: REMOTE,
        tcp_redirected: true,
    },
    Variant {
        name: LARGE,
        about: "the same as *ebpf redirect*, in a namespace whose capture excludes 4096 CIDRs (`-x`, disjoint \
                /27s of 198.18.0.0/15, as the scaling section's last point) and whose maps hold as many \
                registered namespaces as that section's last point (the others throwaway, registered through \
                the loader's `Maps::register`)",
        place: Place::EbpfLarge,
        ids: APP,
        udp_peer: DNS_PROXY,
        tcp: REMOTE,
        tcp_redirected: true,
    },
];

/// One variant's figures, one per round.
pub struct VariantResults {
    pub variant: &'static Variant,
    /// ns per UDP connect().
    pub udp: Vec<f64>,
    /// ns per TCP connect() (the time inside the call).
    pub tcp_connect: Vec<f64>,
    /// ns per TCP connection, end to end (one loop iteration).
    pub tcp_connection: Vec<f64>,
}

/// The section's results.
pub struct ConnectResults {
    pub plan: Plan,
    /// Whether `kernel.bpf_stats_enabled` was on during the section (someone else turned the statistics
    /// on): the figures with programs then include their clock reads.
    pub stats_enabled: bool,
    pub variants: Vec<VariantResults>,
}

/// Which figure of a variant.
#[derive(Clone, Copy, Debug)]
pub enum Figure {
    Udp,
    TcpConnect,
    TcpConnection,
}

impl VariantResults {
    pub fn rounds(&self, f: Figure) -> &[f64] {
        match f {
            Figure::Udp => &self.udp,
            Figure::TcpConnect => &self.tcp_connect,
            Figure::TcpConnection => &self.tcp_connection,
        }
    }
}

impl ConnectResults {
    pub fn find(&self, name: &str) -> Option<&VariantResults> {
        self.variants.iter().find(|v| v.variant.name == name)
    }

    /// The median over rounds of `v`'s figure minus no capture's in the same round.
    pub fn delta(&self, v: &VariantResults, f: Figure) -> f64 {
        match self.find(NO_CAPTURE) {
            Some(base) => difference(v, base, f),
            None => f64::NAN,
        }
    }
}

/// The median over rounds of `a`'s figure minus `b`'s in the same round.
pub fn difference(a: &VariantResults, b: &VariantResults, f: Figure) -> f64 {
    median(a.rounds(f).iter().zip(b.rounds(f)).map(|(a, b)| a - b).collect())
}

/// One pod namespace of the section, its cgroup, its capture and its listening socket; torn down on drop.
struct Bed {
    // Dropped in declaration order: the socket, the pins (which detach the programs), the namespaces.
    listener: TcpListener,
    pins: BpfPins,
    pod: Pod,
    cgroup: PathBuf,
}

impl Bed {
    /// A bed whose capture (if any) excludes `excluded` CIDRs.
    fn new(cgroups: &mut Cgroups, backend: Backend, name: &str, excluded: usize) -> Result<Bed> {
        let pod = Pod::new("bench-c");
        let cgroup = cgroups.child(name)?;
        let pins = BpfPins::new("bench-c");
        let mut flags = flags_with_excluded(excluded_cidrs(excluded));
        flags.extend(["--redirect-dns", "--capture-all-dns"].map(String::from));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        apply_capture(name, backend, &pod.pod, &cgroup, &pins, &flags)?;
        // Made by a thread in the namespace and cgroup, as the proxy's uid: accepted sockets belong to the
        // listening socket's cgroup, so the proxy-side programs (sockops, getsockopt) run as in a pod.
        let _in = cgroups::enter(&cgroup)?;
        let listener = pod
            .pod
            .spawn(Some(PROXY), || -> std::io::Result<TcpListener> {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, OUTBOUND_PORT))?;
                set_timeout(l.as_raw_fd(), libc::SO_RCVTIMEO, IO_TIMEOUT)?;
                Ok(l)
            })
            .join()
            .map_err(|_| anyhow!("{name}: listen panicked"))?
            .with_context(|| format!("{name}: listen on {OUTBOUND_PORT}"))?;
        Ok(Bed {
            listener,
            pins,
            pod,
            cgroup,
        })
    }
}

/// Every namespace and cgroup the variants run in.
struct Beds {
    // The empty program's link closes first.
    _empty: EmptyConnect4,
    empty_cgroup: PathBuf,
    plain: Bed,
    iptables: Bed,
    ebpf: Bed,
    large: Bed,
    /// The namespaces registered in `large`'s maps besides its own (removed on drop).
    _registered: Vec<Netns>,
}

impl Beds {
    fn new(cgroups: &mut Cgroups, plan: &Plan) -> Result<Beds> {
        let plain = Bed::new(cgroups, Backend::None, "connect-none", 0)?;
        let empty_cgroup = cgroups.child("connect-empty")?;
        let empty = EmptyConnect4::attach(cgroups, &empty_cgroup)?;
        let large = Bed::new(cgroups, Backend::Ebpf, "connect-ebpf-large", LARGE_CIDRS)?;
        let registered: Vec<Netns> = (1..plan.namespaces).map(|_| Netns::new("bench-c-ns")).collect();
        register_namespaces(large.pins.path(), &registered)?;
        Ok(Beds {
            _empty: empty,
            empty_cgroup,
            plain,
            iptables: Bed::new(cgroups, Backend::Iptables, "connect-iptables", 0)?,
            ebpf: Bed::new(cgroups, Backend::Ebpf, "connect-ebpf", 0)?,
            large,
            _registered: registered,
        })
    }

    /// The bed of `v` (its namespace and listener) and its cgroup.
    fn place(&self, v: &Variant) -> (&Bed, &Path) {
        match v.place {
            Place::Plain => (&self.plain, &self.plain.cgroup),
            Place::Empty => (&self.plain, &self.empty_cgroup),
            Place::Iptables => (&self.iptables, &self.iptables.cgroup),
            Place::Ebpf => (&self.ebpf, &self.ebpf.cgroup),
            Place::EbpfLarge => (&self.large, &self.large.cgroup),
        }
    }

    /// Runs `f` as `v`: a thread in its namespace and cgroup (checked from inside), with its ids.
    fn run<T: Send + 'static>(&self, v: &Variant, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let (bed, cgroup) = self.place(v);
        let name = cgroup.file_name().context("a cgroup has a name")?.to_owned();
        let _in = cgroups::enter(cgroup)?;
        bed.pod
            .pod
            .spawn(Some(v.ids), move || {
                let own = std::fs::read_to_string("/proc/thread-self/cgroup")?;
                ensure!(
                    own.lines()
                        .any(|l| l.starts_with("0::") && Path::new(&l[3..]).ends_with(&name)),
                    "the connect thread is not in cgroup {name:?}: {own}"
                );
                f()
            })
            .join()
            .map_err(|_| anyhow!("{}: the connect thread panicked", v.name))?
    }

    /// One TCP run of `v`: (ns per connect(), ns per connection), medians over its connections.
    fn tcp(&self, v: &'static Variant, n: u64) -> Result<(f64, f64)> {
        let listener = self
            .place(v)
            .0
            .listener
            .try_clone()
            .context("clone the listening socket")?;
        self.run(v, move || tcp(v, &listener, n))
    }
}

/// Sets a socket timeout option (`SO_RCVTIMEO`, `SO_SNDTIMEO`: they bound accept and connect too).
fn set_timeout(fd: i32, option: libc::c_int, t: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    setsockopt(fd, option, &tv)
}

fn setsockopt<T>(fd: i32, option: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: the pointer and length describe `value`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One UDP socket connected to [`UDP_DST`] `n` times (and once before, which binds its port): the median
/// over batches of [`BATCH`] of ns per connect(); checks where the socket ends up connected.
fn udp(v: &Variant, n: u64) -> Result<f64> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("UDP socket")?;
    s.connect(UDP_DST).context("UDP connect")?;
    let started = Instant::now();
    let mut batches = Vec::new();
    while (batches.len() as u64) * BATCH < n && started.elapsed() < LIMIT {
        let t = Instant::now();
        for _ in 0..BATCH {
            s.connect(UDP_DST).context("UDP connect")?;
        }
        batches.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    let peer = s.peer_addr().context("UDP peer address")?;
    ensure!(
        peer == v.udp_peer,
        "{}: the UDP socket is connected to {peer}, not {}: capture does not work as set up",
        v.name,
        v.udp_peer
    );
    Ok(median(batches))
}

/// `n` TCP connections of `v`, one after the other, both ends in this thread: socket, connect (timed), the
/// accept of the connection on `listener`, its `SO_ORIGINAL_DST`, its close, then the client's close with a
/// reset (`SO_LINGER` 0, so that no TIME_WAIT piles up). Checks that `SO_ORIGINAL_DST` gave [`REMOTE`]
/// exactly when `v` is redirected. (ns inside connect(), ns per iteration), medians over the connections.
fn tcp(v: &Variant, listener: &TcpListener, n: u64) -> Result<(f64, f64)> {
    let SocketAddr::V4(dst) = v.tcp else {
        bail!("IPv4 only");
    };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dst.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let (mut connects, mut loops, mut redirected) = (Vec::new(), Vec::new(), 0u64);
    let started = Instant::now();
    while (loops.len() as u64) < n && started.elapsed() < LIMIT {
        let t0 = Instant::now();
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        ensure!(fd >= 0, "TCP socket: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor that nothing else owns.
        let client = unsafe { OwnedFd::from_raw_fd(fd) };
        set_timeout(fd, libc::SO_SNDTIMEO, IO_TIMEOUT)?;
        let t1 = Instant::now();
        // SAFETY: `addr` is a valid sockaddr_in of the length passed.
        let rc = unsafe {
            libc::connect(
                fd,
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let t2 = Instant::now();
        ensure!(
            rc == 0,
            "{}: TCP connect to {dst}: {}",
            v.name,
            std::io::Error::last_os_error()
        );
        let (conn, _) = listener.accept().with_context(|| format!("{}: accept", v.name))?;
        if capture::sockopt::original_dst(conn.as_fd(), false).is_ok_and(|d| d == REMOTE) {
            redirected += 1;
        }
        drop(conn);
        setsockopt(fd, libc::SO_LINGER, &linger)?;
        drop(client);
        connects.push((t2 - t1).as_nanos() as f64);
        loops.push(t0.elapsed().as_nanos() as f64);
    }
    let expected = if v.tcp_redirected { loops.len() as u64 } else { 0 };
    ensure!(
        redirected == expected,
        "{}: of {} TCP connections, {redirected} had original destination {REMOTE} (expected {expected}): \
         capture does not work as set up",
        v.name,
        loops.len()
    );
    Ok((median(connects), median(loops)))
}

/// Whether the kernel's BPF run-time statistics are on (someone holds `BPF_ENABLE_STATS`, or the sysctl).
fn stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// The section: builds its namespaces, runs every variant `plan.repeats` times interleaved, tears down.
pub fn measure(cgroups: &mut Cgroups, plan: Plan, progress: &mut Progress) -> Result<ConnectResults> {
    let beds = Beds::new(cgroups, &plan)?;
    progress.step(
        SETUP_SECONDS + plan.namespaces as f64 * crate::NAMESPACE_SECONDS,
        &format!(
            "connect: namespaces built, capture applied ({} namespaces registered in the large one), empty \
             program attached",
            plan.namespaces
        ),
    );
    let mut stats = stats_enabled();
    let mut results: Vec<VariantResults> = VARIANTS
        .iter()
        .map(|variant| VariantResults {
            variant,
            udp: Vec::new(),
            tcp_connect: Vec::new(),
            tcp_connection: Vec::new(),
        })
        .collect();
    let round_seconds = (plan.seconds() - SETUP_SECONDS) / plan.repeats as f64;
    for round in 1..=plan.repeats {
        // Each round starts one variant further on, so that none always runs first.
        let order: Vec<usize> = (0..results.len()).map(|k| (k + round - 1) % results.len()).collect();
        for &k in &order {
            let r = &mut results[k];
            let v = r.variant;
            r.udp.push(beds.run(v, move || udp(v, plan.udp_connects))?);
        }
        for &k in &order {
            let r = &mut results[k];
            let (connect, connection) = beds.tcp(r.variant, plan.tcp_connections)?;
            r.tcp_connect.push(connect);
            r.tcp_connection.push(connection);
        }
        stats |= stats_enabled();
        let line: Vec<String> = results
            .iter()
            .map(|r| {
                format!(
                    "{} {:.0}/{:.0}/{:.0}",
                    r.variant.name,
                    r.udp[round - 1],
                    r.tcp_connect[round - 1],
                    r.tcp_connection[round - 1]
                )
            })
            .collect();
        progress.step(
            round_seconds,
            &format!(
                "connect round {round}/{}: ns per UDP connect / TCP connect / TCP connection: {}",
                plan.repeats,
                line.join(" | ")
            ),
        );
    }
    Ok(ConnectResults {
        plan,
        stats_enabled: stats,
        variants: results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_goals_variants_exist_and_deltas_pair_rounds() {
        let names: Vec<&str> = VARIANTS.iter().map(|v| v.name).collect();
        assert!(names.contains(&NO_CAPTURE) && names.contains(&REDIRECT));
        let results = |name: &str| VARIANTS.iter().find(|v| v.name == name).unwrap();
        let c = ConnectResults {
            plan: Plan {
                repeats: 3,
                udp_connects: 0,
                tcp_connections: 0,
                namespaces: 1,
            },
            stats_enabled: false,
            variants: [(NO_CAPTURE, [400.0, 500.0, 450.0]), (REDIRECT, [600.0, 690.0, 660.0])]
                .into_iter()
                .map(|(name, udp)| VariantResults {
                    variant: results(name),
                    udp: udp.to_vec(),
                    tcp_connect: Vec::new(),
                    tcp_connection: Vec::new(),
                })
                .collect(),
        };
        // Round by round: 200, 190, 210; the median of those, not the difference of the medians (210).
        assert_eq!(c.delta(c.find(REDIRECT).unwrap(), Figure::Udp), 200.0);
    }
}
