//! One mode's topology, built alike for every mode: a pod namespace joined by veth to a remote namespace,
//! an echo server there, the mode's cgroup and bpffs, capture applied with the injector's default flags,
//! and the sidecar (HAProxy, or the bench's builtin proxy) as the proxy user.

use std::{
    collections::{HashMap, HashSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::links::PinnedLink;
use testkit::{
    BpfPins, INJECTOR_DEFAULT_FLAGS, Netns, Pod, REMOTE_V4, capture_with_env, sa,
    sidecar::{Forwarded, Sidecar},
};

use crate::{
    cgroups::{self, Cgroups},
    modes::{Backend, Mode},
};

/// The app's uid and gid (captured).
pub const APP: (u32, u32) = (1000, 1000);
/// The proxy's uid and gid (never captured: `-u 1337`).
pub const PROXY: (u32, u32) = (1337, 1337);
/// The echo server's port in the remote namespace.
pub const REMOTE_PORT: u16 = 8080;
/// The sidecar's outbound capture port (`-p`).
pub const OUTBOUND_PORT: u16 = 15001;
/// The first byte of a bulk transfer: the echo server then reads to the end and answers one byte.
pub const BULK: u8 = b'B';

/// Which proxy forwards the app's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    /// Debian's HAProxy: `server 0.0.0.0` forwards to the original destination (`SO_ORIGINAL_DST`). The
    /// default: a real event-driven proxy, so a mode's rate is not capped by the bench's own sidecar.
    Haproxy,
    /// The harness's forwarding proxy (`testkit/src/sidecar.rs`): a thread per connection, `SO_ORIGINAL_DST`;
    /// it reports every connection it forwarded, so a run with it checks each one.
    Builtin,
}

impl Proxy {
    pub fn about(self) -> &'static str {
        match self {
            Proxy::Builtin => "the bench's builtin forwarding proxy (a thread per connection, reads SO_ORIGINAL_DST)",
            Proxy::Haproxy => "HAProxy (Debian), `server 0.0.0.0`: forwards to SO_ORIGINAL_DST",
        }
    }
}

/// One mode's topology, live for the whole run; torn down on drop, also on failure.
pub struct Topology {
    // Dropped in declaration order: the sidecar and the server, then the capture state, then the namespaces.
    _sidecar: Forwarder,
    _server: EchoServer,
    pins: BpfPins,
    pub pod: Pod,
    pub mode: Mode,
    /// The mode's cgroup: the app's and the sidecar's CPU, and the eBPF attachment.
    pub cgroup: PathBuf,
    /// What our sidecar forwarded (not HAProxy, which does not tell).
    forwarded: Option<mpsc::Receiver<Forwarded>>,
}

impl Topology {
    pub fn new(mode: Mode, proxy: Proxy, cgroups: &mut Cgroups) -> Result<Topology> {
        let pod = Pod::new("bench");
        // Many short connections: let clients reuse ports in TIME_WAIT, as a busy pod would be tuned.
        for ns in [&pod.pod, &pod.remote] {
            testkit::run(ns.command("sysctl").args([
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65000",
            ]));
        }
        let server = EchoServer::start(&pod.remote, sa(REMOTE_V4, REMOTE_PORT))?;
        let cgroup = cgroups.child(&mode.name.replace(|c: char| !c.is_ascii_alphanumeric(), "-"))?;
        let pins = BpfPins::new("bench");
        let floor = mode.backend == Backend::None;
        let sidecar = Forwarder::Pending;
        let mut topology = Topology {
            mode,
            pod,
            cgroup,
            _sidecar: sidecar,
            _server: server,
            pins,
            forwarded: None,
        };
        topology.apply(&default_flags())?;
        let _in = cgroups::enter(&topology.cgroup)?;
        topology._sidecar = match proxy {
            Proxy::Builtin => {
                // The floor's app connects to the sidecar itself, which then has no original destination.
                let fallback = floor.then_some(sa(REMOTE_V4, REMOTE_PORT));
                let (tx, rx) = mpsc::channel();
                topology.forwarded = Some(rx);
                Forwarder::Builtin(Sidecar::start_with_fallback(
                    &topology.pod.pod,
                    PROXY,
                    &[OUTBOUND_PORT, 15006],
                    15006,
                    tx,
                    fallback,
                ))
            }
            Proxy::Haproxy => Forwarder::Haproxy(Haproxy::start(&topology.pod.pod, floor)?),
        };
        Ok(topology)
    }

    /// Applies capture in the pod with `flags` (the injector's defaults, or a variation), replacing what
    /// was applied before; nothing for the floor.
    pub fn apply(&self, flags: &[String]) -> Result<()> {
        let mut args = self.mode.extra_args.to_vec();
        args.extend(flags.iter().map(String::as_str));
        apply_capture(
            self.mode.name,
            self.mode.backend,
            &self.pod.pod,
            &self.cgroup,
            &self.pins,
            &args,
        )
    }

    /// Registers `namespaces` with this mode's eBPF capture ([`register_namespaces`]).
    pub fn register(&self, namespaces: &[Netns]) -> Result<()> {
        ensure!(
            self.mode.backend == Backend::Ebpf,
            "{}: only eBPF modes register namespaces",
            self.mode.name
        );
        register_namespaces(self.pins.path(), namespaces)
    }

    /// Forgets what the sidecar forwarded so far (before a workload that [`Topology::check_forwarded`]).
    pub fn forget_forwarded(&self) {
        if let Some(rx) = &self.forwarded {
            rx.try_iter().for_each(drop);
        }
    }

    /// Checks that `connections` connections went through our sidecar since [`Topology::forget_forwarded`],
    /// with the remote server as their original destination when captured (none for the floor): a
    /// connection that bypassed capture would still reach the echo server, and make the mode look faster.
    pub fn check_forwarded(&self, connections: u64) -> Result<()> {
        let Some(rx) = &self.forwarded else {
            return Ok(());
        };
        let expected = (self.mode.backend != Backend::None).then_some(sa(REMOTE_V4, REMOTE_PORT));
        // The sidecar reports a connection when it has finished with it: wait a little for the last ones.
        let deadline = Instant::now() + Duration::from_secs(2);
        let (mut right, mut wrong) = (0u64, 0u64);
        while right < connections {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(f) if f.original_dst == expected => right += 1,
                Ok(_) => wrong += 1,
                Err(_) => break,
            }
        }
        ensure!(
            right >= connections && wrong == 0,
            "{}: of {connections} connections, {right} went through the sidecar with original destination \
             {expected:?} and {wrong} with another: capture does not work as set up, so the figures would mean nothing",
            self.mode.name
        );
        Ok(())
    }

    /// Connections capture has redirected in this mode's pod so far: under eBPF the `redirected` counters of
    /// the namespaces registered in the mode's pins (only the pod makes connections), under iptables the
    /// packets of `ISTIO_REDIRECT`'s REDIRECT rule (the nat table sees only a connection's first packet);
    /// none for the floor, which has no capture.
    pub fn redirected(&self) -> Result<Option<u64>> {
        match self.mode.backend {
            Backend::None => Ok(None),
            Backend::Ebpf => {
                let registered = capture::ebpf::registered(self.pins.path())?;
                let counters = registered.iter().flat_map(|r| &r.counters);
                Ok(Some(
                    counters.filter(|(name, _)| *name == "redirected").map(|(_, n)| n).sum(),
                ))
            }
            Backend::Iptables => {
                let out = testkit::run(self.pod.pod.command("iptables-save").args(["-c", "-t", "nat"]));
                Ok(Some(redirect_packets(&String::from_utf8_lossy(&out.stdout))))
            }
        }
    }

    /// Checks, after a workload that completed `connections` connections, that capture redirected at least
    /// as many since `before` (what [`Topology::redirected`] said then): a connection that bypassed capture
    /// would still reach the echo server, and make the mode look faster. Works with any sidecar.
    pub fn check_redirected(&self, before: Option<u64>, connections: u64) -> Result<()> {
        let (Some(before), Some(after)) = (before, self.redirected()?) else {
            return Ok(());
        };
        let redirected = after.saturating_sub(before);
        ensure!(
            redirected >= connections,
            "{}: {connections} connections went through, but capture redirected only {redirected}: capture does \
             not work as set up, so the figures would mean nothing",
            self.mode.name
        );
        Ok(())
    }

    /// The number of entries in the pod namespace's conntrack table (`nf_conntrack_count`, read from inside
    /// it), or `None` where the file is absent: nf_conntrack is not loaded.
    pub fn conntrack_entries(&self) -> Result<Option<u64>> {
        const COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";
        // /proc/sys/net shows the network namespace of the thread that reads it.
        let read = self.pod.pod.spawn(None, || std::fs::read_to_string(COUNT));
        match read.join().map_err(|_| anyhow::anyhow!("reading {COUNT} panicked"))? {
            Ok(text) => Ok(Some(text.trim().parse().with_context(|| format!("{COUNT}: {text:?}"))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {COUNT}")),
        }
    }

    /// The full name of each capture program attached through a link pinned in this mode's bpffs, by program
    /// id: the kernel keeps only 15 characters of a program's name, so `capture_connect4` and
    /// `capture_connect6` would both read `capture_connect`. A link pinned as `link_<hook>` holds
    /// `capture_<hook>` (the sk_lookup copies: `link_sk_lookup_<cookie>`).
    pub fn program_names(&self) -> HashMap<u32, String> {
        std::fs::read_dir(self.pins.path())
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let hook = name.strip_prefix("link_")?;
                let hook = if hook.starts_with("sk_lookup") {
                    "sk_lookup"
                } else {
                    hook
                };
                let link = aya::programs::links::FdLink::from(PinnedLink::from_pin(e.path()).ok()?);
                Some((link.info().ok()?.program_id(), format!("capture_{hook}")))
            })
            .collect()
    }

    /// The ids of the maps pinned in this mode's bpffs (none without the eBPF backend).
    pub fn map_ids(&self) -> HashSet<u32> {
        std::fs::read_dir(self.pins.path())
            .into_iter()
            .flatten()
            .filter_map(|e| aya::maps::MapInfo::from_pin(e.ok()?.path()).ok())
            .map(|info| info.id())
            .collect()
    }

    /// Capture rules in the pod (iptables: `-A` lines of both families).
    pub fn rule_count(&self) -> usize {
        self.pod
            .pod
            .iptables_rules()
            .iter()
            .filter(|l| l.contains(": -A "))
            .count()
    }

    /// The destination the app uses.
    pub fn app_destination(&self) -> SocketAddr {
        match self.mode.backend {
            Backend::None => sa(Ipv4Addr::LOCALHOST, OUTBOUND_PORT),
            Backend::Iptables | Backend::Ebpf => sa(REMOTE_V4, REMOTE_PORT),
        }
    }

    /// Runs `f` as the app: a thread in the pod namespace and the mode's cgroup, with the app's ids.
    pub fn spawn_app<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<JoinHandle<T>> {
        let _in = cgroups::enter(&self.cgroup)?;
        Ok(self.pod.pod.spawn(Some(APP), f))
    }

    /// CPU used by the mode's cgroup (app and sidecar) so far.
    pub fn cpu(&self) -> Result<Duration> {
        cgroups::cpu_usage(&self.cgroup)
    }
}

/// Registers `namespaces` in the eBPF capture pinned at `pins` with the injector's flags, as `capture`
/// would once its programs are attached: the same `Maps::register` (CONFIG keyed by the namespace's cookie,
/// its sets and CIDRs), without loading the programs again for each (`capture` itself takes about a second
/// a namespace here, mostly the verifier). No sk_lookup program is attached in them: it would only run for
/// connections arriving there.
pub fn register_namespaces(pins: &Path, namespaces: &[Netns]) -> Result<()> {
    let args = std::iter::once("capture".to_owned()).chain(default_flags());
    let inv = capture::flags::parse(args, &|_| None)?;
    let pins = pins.to_owned();
    let files = namespaces
        .iter()
        .map(|ns| std::fs::File::open(ns.path()).with_context(|| format!("open {}", ns.path().display())))
        .collect::<Result<Vec<_>>>()?;
    // A thread of its own: it changes network namespace (only its own) for each registration.
    std::thread::spawn(move || -> Result<()> {
        let mut maps = capture::ebpf::maps::Maps::open(&pins)?;
        for file in files {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            let env = capture::namespace::detect(&inv.config, std::path::Path::new("/etc/resolv.conf"))?;
            let cookie = capture::namespace::cookie()?;
            let slot = capture::ebpf::maps::NO_SLOT;
            maps.register(cookie, slot, &inv.config, &env, "capture-bench: injector defaults")?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("registering namespaces panicked"))?
}

/// Runs `capture` in `ns` with `backend`'s own arguments (eBPF: attached to `cgroup`, pinned in `pins`), then
/// `args`; nothing for [`Backend::None`]. `what` names the setup in the error.
pub fn apply_capture(
    what: &str,
    backend: Backend,
    ns: &Netns,
    cgroup: &Path,
    pins: &BpfPins,
    args: &[&str],
) -> Result<()> {
    let (cg, pin) = (cgroup.display().to_string(), pins.path().display().to_string());
    let mut all: Vec<&str> = match backend {
        Backend::None => return Ok(()),
        Backend::Iptables => vec!["--backend", "iptables"],
        Backend::Ebpf => vec!["--backend", "ebpf", "--cgroup", &cg, "--pin-dir", &pin],
    };
    all.extend_from_slice(args);
    let out = capture_with_env(ns, &all, &[]);
    if !out.status.success() {
        bail!(
            "{what}: capture failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The packets counted on `ISTIO_REDIRECT`'s REDIRECT rules in `iptables-save -c` output
/// (`[packets:bytes] -A ISTIO_REDIRECT … -j REDIRECT …`).
fn redirect_packets(save: &str) -> u64 {
    save.lines()
        .filter(|l| l.contains("-A ISTIO_REDIRECT ") && l.contains("-j REDIRECT"))
        .filter_map(|l| l.strip_prefix('[')?.split_once(':')?.0.parse::<u64>().ok())
        .sum()
}

/// The injector's default flags, owned (the scaling runs vary `-x`).
pub fn default_flags() -> Vec<String> {
    INJECTOR_DEFAULT_FLAGS.iter().map(|s| s.to_string()).collect()
}

/// The sidecar of a topology.
enum Forwarder {
    /// Not started yet (capture is applied first).
    Pending,
    Builtin(#[expect(dead_code, reason = "held for its drop, which stops it")] Sidecar),
    Haproxy(#[expect(dead_code, reason = "held for its drop, which stops it")] Haproxy),
}

/// HAProxy as the sidecar: a process in the pod namespace and the mode's cgroup (it starts in the cgroup
/// of the thread that spawns it), as the proxy user; killed on drop.
struct Haproxy {
    child: Child,
    dir: PathBuf,
}

impl Haproxy {
    fn start(ns: &Netns, floor: bool) -> Result<Haproxy> {
        // The floor has no capture, so no original destination: a fixed server there instead.
        let server = if floor {
            format!("{REMOTE_V4}:{REMOTE_PORT}")
        } else {
            "0.0.0.0".to_owned()
        };
        let cfg = format!(
            "global\n    maxconn 4096\ndefaults\n    mode tcp\n    timeout connect 3s\n    timeout client 30s\n    \
             timeout server 30s\nfrontend capture_outbound\n    bind 0.0.0.0:{OUTBOUND_PORT}\n    maxconn 4096\n    \
             default_backend original_destination\nbackend original_destination\n    server original {server}\n"
        );
        let dir = std::env::temp_dir().join(format!("capture-bench-haproxy-{}-{}", std::process::id(), ns.name()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).with_context(|| format!("write {}", path.display()))?;
        let log = dir.join("haproxy.log");
        let mut cmd = ns.command("haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?)
            .process_group(0);
        testkit::run_as(&mut cmd, PROXY);
        let child = cmd
            .spawn()
            .context("start haproxy (installed by `cargo xtask setup`)")?;
        let mut haproxy = Haproxy { child, dir };
        // Ready once it listens (asked of `ss`, not by connecting: a connection from here would have
        // no original destination, and HAProxy would forward it to itself).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = ns
                .command("ss")
                .args(["-Hltn", &format!("sport = :{OUTBOUND_PORT}")])
                .output()
                .context("run ss")?;
            if !out.stdout.is_empty() {
                return Ok(haproxy);
            }
            let exited = haproxy.child.try_wait()?;
            ensure!(
                exited.is_none() && Instant::now() < deadline,
                "HAProxy {} listening on {OUTBOUND_PORT}: {}",
                exited.map_or("took over 10 s to start".to_owned(), |s| format!("exited ({s}) before")),
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A one-byte echo server in the remote namespace (a thread per connection); a connection that starts
/// with [`BULK`] is read to its end instead, then answered. A thread of this process in the cgroup domain,
/// so no mode's CPU includes it.
struct EchoServer {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    ns: PathBuf,
}

impl EchoServer {
    fn start(ns: &Netns, addr: SocketAddr) -> Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        ns.spawn(None, move || {
            let listener = match TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut byte = [0];
                    while conn.read_exact(&mut byte).is_ok() {
                        if byte[0] == BULK {
                            let _ = std::io::copy(&mut conn, &mut std::io::sink());
                            let _ = conn.write_all(&byte);
                            return;
                        }
                        if conn.write_all(&byte).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("echo server did not start")?
            .context("echo server: listen")?;
        Ok(EchoServer {
            stop,
            addr,
            ns: ns.path(),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // One connection wakes the blocked accept, which then sees the flag.
        let (addr, ns) = (self.addr, self.ns.clone());
        let _ = std::thread::spawn(move || {
            let ns = std::fs::File::open(ns).ok()?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::redirect_packets;

    #[test]
    fn redirect_packets_counts_only_istio_redirect() {
        let save = "*nat\n:ISTIO_REDIRECT - [0:0]\n[12:720] -A ISTIO_OUTPUT -j ISTIO_REDIRECT\n\
                    [12:720] -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
                    [3:180] -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\nCOMMIT\n";
        assert_eq!(redirect_packets(save), 12);
        assert_eq!(redirect_packets(""), 0);
    }
}
