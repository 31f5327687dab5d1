//! Test harness for capture's integration tests: throwaway network namespaces joined by veth, child cgroups
//! and bpffs pin directories; client and listener processes (`capture-probe`) inside them as a chosen
//! uid/gid, the listeners reporting what they accepted; and the `capture` binary run inside a namespace.
//! Everything created here is removed on drop, also when a test fails.
//!
//! Traffic only ever goes to loopback or to addresses inside namespaces made here (TEST-NET-1 and the IPv6
//! documentation prefix), never through the host's namespace.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

pub mod diff;
pub mod echo;
pub mod hold;
pub mod runnable;
pub mod sidecar;

/// How long a test connection may take before it counts as failed (on this machine; see [`patient`]).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// `CAPTURE_TEST_TIME_SCALE`: how many times slower than this machine the tests run, e.g. in the emulated
/// CPU of `cargo xtask vm` (which sets it). Every wait is that much longer and load tests smaller; unset, 1.
pub const TIME_SCALE_ENV: &str = "CAPTURE_TEST_TIME_SCALE";

/// The time scale ([`TIME_SCALE_ENV`]), at least 1.
pub fn time_scale() -> u32 {
    std::env::var(TIME_SCALE_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// A wait sized for this machine, stretched by [`time_scale`].
pub fn patient(wait: Duration) -> Duration {
    wait * time_scale()
}

/// [`CONNECT_TIMEOUT`], stretched by [`time_scale`].
pub fn connect_timeout() -> Duration {
    patient(CONNECT_TIMEOUT)
}

/// Pod side of the veth pair.
pub const POD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Remote side of the veth pair.
pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Pod side, IPv6.
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Remote side, IPv6.
pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn unique(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "cap-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace with `lo` up.
    pub fn new(tag: &str) -> Netns {
        let ns = Netns { name: unique(tag) };
        run(Command::new("ip").args(["netns", "add", &ns.name]));
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, as `--network-namespace` takes it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    fn file(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()))
    }

    /// A command that runs inside this namespace (only the network namespace changes: bpffs and cgroupfs
    /// stay visible, unlike with `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let ns = self.file();
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; the closure only makes that one system call.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        cmd
    }

    /// Runs `f` on a new thread inside this namespace, as `ids` (uid, gid) if given. Credentials and
    /// namespace change only for that thread (raw syscalls, not libc's process-wide wrappers); the cgroup
    /// does not, so cgroup BPF programs never see its sockets. Only the in-process sidecar uses this: test
    /// clients and servers are `capture-probe` processes ([`Listeners`], [`connect_as`]).
    pub fn spawn<T: Send + 'static>(
        &self,
        ids: Option<(u32, u32)>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let ns = self.file();
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            if let Some((uid, gid)) = ids {
                // SAFETY: raw setresgid/setresuid change only the calling thread's credentials.
                unsafe {
                    assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0, "setresgid");
                    assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0, "setresuid");
                }
            }
            f()
        })
    }

    /// Capture rules and user chains in this namespace, as `iptables-save` shows them (counters and
    /// comments dropped), for both families.
    pub fn iptables_rules(&self) -> Vec<String> {
        ["iptables-save", "ip6tables-save"]
            .iter()
            .flat_map(|bin| {
                let out = run(&mut self.command(bin));
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A ") || (l.starts_with(':') && l.contains(" - ")))
                    .map(|l| format!("{bin}: {l}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A pod namespace joined by a veth pair to a "remote" namespace, both with `eth0`, IPv4 and IPv6.
pub struct Pod {
    /// The pod's namespace (the app and its sidecar run here).
    pub pod: Netns,
    /// The other end of the wire.
    pub remote: Netns,
}

impl Pod {
    /// Builds the topology.
    pub fn new(tag: &str) -> Pod {
        let pod = Netns::new(&format!("{tag}-p"));
        let remote = Netns::new(&format!("{tag}-r"));
        pod.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            remote.name(),
        ]);
        for (ns, v4, v6) in [(&pod, POD_V4, POD_V6), (&remote, REMOTE_V4, REMOTE_V6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        Pod { pod, remote }
    }
}

/// What a listener saw of one accepted connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The port of the listener that accepted it.
    pub listener: u16,
    /// The client's address.
    pub peer: SocketAddr,
    /// `SO_ORIGINAL_DST` on the accepted socket, if the kernel had an answer.
    pub original_dst: Option<SocketAddr>,
}

/// What a UDP listener saw of one datagram (which it echoed back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// The port of the socket that received it.
    pub listener: u16,
    /// The sender's address.
    pub peer: SocketAddr,
}

/// How long a probe listener may take to bind and say `ready`.
const PROBE_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The `capture-probe` binary (the tests crate's client/server process): `$CAPTURE_PROBE_BIN` (set by
/// `cargo xtask test` and `cargo xtask run`), else `capture-probe` next to the `capture` binary; where every
/// user can run it (see [`runnable`]), since it runs as the app and the proxy.
pub fn probe_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CAPTURE_PROBE_BIN") {
        return runnable::runnable_by_all(Path::new(&bin));
    }
    let bin = built_capture().with_file_name("capture-probe");
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo xtask test`, or `cargo build -p tests --bin capture-probe` first",
        bin.display()
    );
    runnable::runnable_by_all(&bin)
}

/// A `capture-probe` command that starts inside `ns`, inside `cgroup` if given, as `ids` (uid, gid) if given.
fn probe_command(ns: &Netns, cgroup: Option<&Cgroup>, ids: Option<(u32, u32)>) -> Command {
    let mut cmd = ns.command(probe_bin());
    // Its own process group: a Ctrl-C meant for the demo or a test run reaches only the parent, which then
    // stops its probes itself (killed on drop; a listener also ends when its stdin closes).
    cmd.process_group(0);
    if let Some(cgroup) = cgroup {
        cgroup.enter(&mut cmd);
    }
    if let Some(ids) = ids {
        run_as(&mut cmd, ids);
    }
    cmd
}

/// Makes `cmd` run as `(uid, gid)` with no supplementary groups. Not `CommandExt::{uid, gid}`: std drops
/// credentials before it runs `pre_exec` closures, and joining a namespace or cgroup needs root. Closures
/// run in the order they were added, so call this after [`Netns::command`] and [`Cgroup::enter`]. The
/// command starts in `/` unless it was given a directory: the test's own (the checkout) may be closed to
/// that user, and some programs (HAProxy) refuse to start where they cannot return to. Panics at once if
/// the program or the directory is a path that user could not reach (see [`runnable`]), rather than failing
/// at spawn.
pub fn run_as(cmd: &mut Command, (uid, gid): (u32, u32)) {
    let program = Path::new(cmd.get_program());
    if program.components().count() > 1
        && let Some(why) = runnable::unreachable_by_others(program)
    {
        panic!("cannot run {} as uid {uid}: {why}", program.display());
    }
    match cmd.get_current_dir() {
        None => {
            cmd.current_dir("/");
        }
        Some(dir) => {
            if let Some(why) = runnable::unreachable_by_others(dir) {
                panic!(
                    "cannot run {} as uid {uid} in {}: {why}",
                    program.display(),
                    dir.display()
                );
            }
        }
    }
    // SAFETY: setgroups/setgid/setuid are async-signal-safe; the closure makes only those calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// TCP listeners (and UDP sockets) in a `capture-probe listen` process inside a namespace: every accepted
/// connection is reported, answered with one byte and closed; every datagram is reported and echoed. The
/// process is killed on drop.
pub struct Listeners {
    child: Child,
    /// The probe runs until its stdin closes: kept open for as long as this lives.
    _stdin: ChildStdin,
    accepted: mpsc::Receiver<Accepted>,
    datagrams: mpsc::Receiver<Datagram>,
    stdout: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
}

impl Listeners {
    /// Listens on each TCP address, inside `ns`, inside `cgroup` if given, as `ids` (uid, gid) if given.
    pub fn start(ns: &Netns, cgroup: Option<&Cgroup>, ids: Option<(u32, u32)>, addrs: &[SocketAddr]) -> Listeners {
        Listeners::start_with_udp(ns, cgroup, ids, addrs, &[])
    }

    /// As [`Listeners::start`], plus UDP echo sockets on `udp`.
    pub fn start_with_udp(
        ns: &Netns,
        cgroup: Option<&Cgroup>,
        ids: Option<(u32, u32)>,
        tcp: &[SocketAddr],
        udp: &[SocketAddr],
    ) -> Listeners {
        Self::spawn(ns, cgroup, ids, tcp, udp, false)
    }

    /// As [`Listeners::start_with_udp`], with `IP_TRANSPARENT` on the TCP listeners (a TPROXY-mode proxy).
    pub fn start_transparent(ns: &Netns, cgroup: Option<&Cgroup>, tcp: &[SocketAddr], udp: &[SocketAddr]) -> Listeners {
        Self::spawn(ns, cgroup, None, tcp, udp, true)
    }

    fn spawn(
        ns: &Netns,
        cgroup: Option<&Cgroup>,
        ids: Option<(u32, u32)>,
        tcp: &[SocketAddr],
        udp: &[SocketAddr],
        transparent: bool,
    ) -> Listeners {
        let mut cmd = probe_command(ns, cgroup, ids);
        cmd.arg("listen").args(tcp.iter().map(|a| a.to_string()));
        if transparent {
            cmd.arg("--transparent");
        }
        for a in udp {
            cmd.arg("--udp").arg(a.to_string());
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let (stdin, stdout, stderr) = (
            child.stdin.take().expect("piped stdin"),
            child.stdout.take().expect("piped stdout"),
            child.stderr.take().expect("piped stderr"),
        );
        let (ready_tx, ready_rx) = mpsc::channel();
        let (accepted_tx, accepted) = mpsc::channel();
        let (datagram_tx, datagrams) = mpsc::channel();
        let stdout = std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match (line.split_whitespace().collect::<Vec<_>>().as_slice(), &ready) {
                    (["ready"], Some(tx)) => {
                        let _ = tx.send(Ok(()));
                        ready = None;
                    }
                    (_, Some(tx)) => {
                        let _ = tx.send(Err(line.clone()));
                    }
                    (["accepted", port, peer, dst], None) => {
                        let _ = accepted_tx.send(Accepted {
                            listener: parse_field(port, &line),
                            peer: parse_field(peer, &line),
                            original_dst: (*dst != "-").then(|| parse_field(dst, &line)),
                        });
                    }
                    (["udp", port, peer], None) => {
                        let _ = datagram_tx.send(Datagram {
                            listener: parse_field(port, &line),
                            peer: parse_field(peer, &line),
                        });
                    }
                    _ => eprintln!("capture-probe listen: unexpected line {line:?}"),
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).take(64 * 1024).read_to_string(&mut text);
            text
        });
        let mut listeners = Listeners {
            child,
            _stdin: stdin,
            accepted,
            datagrams,
            stdout: Some(stdout),
            stderr: Some(stderr),
        };
        let problem = match ready_rx.recv_timeout(patient(PROBE_READY_TIMEOUT)) {
            Ok(Ok(())) => return listeners,
            Ok(Err(line)) => format!("said {line:?}"),
            Err(mpsc::RecvTimeoutError::Timeout) => format!("was not ready within {PROBE_READY_TIMEOUT:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => "exited without saying ready".to_owned(),
        };
        let stderr = listeners.stop();
        panic!(
            "capture-probe listen {tcp:?} --udp {udp:?} in {}: {problem}; stderr: {stderr}",
            ns.name()
        );
    }

    /// The next accepted connection, if one arrives within the timeout.
    pub fn next(&self) -> Option<Accepted> {
        self.accepted.recv_timeout(connect_timeout()).ok()
    }

    /// Connections already reported, without waiting.
    pub fn drain(&self) -> Vec<Accepted> {
        self.accepted.try_iter().collect()
    }

    /// The next datagram, if one arrives within the timeout.
    pub fn next_datagram(&self) -> Option<Datagram> {
        self.datagrams.recv_timeout(connect_timeout()).ok()
    }

    /// Datagrams already reported, without waiting.
    pub fn drain_datagrams(&self) -> Vec<Datagram> {
        self.datagrams.try_iter().collect()
    }

    /// Kills the probe, waits for it and its output; returns what it wrote on stderr.
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.stdout.take() {
            let _ = t.join();
        }
        self.stderr.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse_field<T: std::str::FromStr>(field: &str, line: &str) -> T {
    field
        .parse()
        .unwrap_or_else(|_| panic!("capture-probe listen: cannot parse {field:?} in {line:?}"))
}

/// How [`connect_with`] connects; the default is a plain TCP connect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connect {
    /// Bind the socket to this address first (port chosen by the kernel).
    pub bind: Option<IpAddr>,
    /// TCP Fast Open: `sendto` with `MSG_FASTOPEN` and one byte instead of `connect`.
    pub fastopen: bool,
    /// UDP: connect, send `ping`, wait for the echo.
    pub udp: bool,
    /// UDP without connect: `sendto`, then the echo (implies `udp`).
    pub sendto: bool,
    /// TCP: first a connect here on the same socket, which must fail (a closed port).
    pub first: Option<SocketAddr>,
    /// TCP: bind this local port with SO_REUSEPORT before connecting.
    pub reuseport: Option<u16>,
    /// Load: this many connections one after the other (0 and 1 both mean one).
    pub count: u32,
}

/// Connects from inside `ns` (inside `cgroup` if given) as `(uid, gid)` to `dst`, waits for the listener's
/// byte, closes. Returns the local address the connection used, or the error.
pub fn connect_as(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    ids: (u32, u32),
    dst: SocketAddr,
) -> std::io::Result<SocketAddr> {
    connect_with(ns, cgroup, ids, dst, Connect::default())
}

/// As [`connect_as`], the way `how` says; returns the local address. See [`exchange`].
pub fn connect_with(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    ids: (u32, u32),
    dst: SocketAddr,
    how: Connect,
) -> std::io::Result<SocketAddr> {
    exchange(ns, cgroup, ids, dst, how).map(|e| e.local)
}

/// What a probe connection saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// Its local address.
    pub local: SocketAddr,
    /// For UDP, where the reply came from (as `recvfrom` reported it).
    pub reply_from: Option<SocketAddr>,
}

/// Connects (or exchanges a datagram) the way `how` says. The error carries the probe's text (which names
/// the step that failed and the OS error) and the matching [`std::io::ErrorKind`]. Panics if the probe
/// itself cannot run or answers nonsense, so that a broken harness never passes for a refused connection.
pub fn exchange(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    ids: (u32, u32),
    dst: SocketAddr,
    how: Connect,
) -> std::io::Result<Exchange> {
    let mut cmd = probe_command(ns, cgroup, Some(ids));
    cmd.arg("connect")
        .arg(dst.to_string())
        .arg("--timeout-ms")
        .arg(connect_timeout().as_millis().to_string());
    if let Some(ip) = how.bind {
        cmd.arg("--bind").arg(ip.to_string());
    }
    if how.fastopen {
        cmd.arg("--fastopen");
    }
    if how.udp {
        cmd.arg("--udp");
    }
    if how.sendto {
        cmd.arg("--sendto");
    }
    if let Some(first) = how.first {
        cmd.arg("--first").arg(first.to_string());
    }
    if let Some(port) = how.reuseport {
        cmd.arg("--reuseport").arg(port.to_string());
    }
    if how.count > 1 {
        cmd.arg("--count").arg(how.count.to_string());
    }
    cmd.stdin(Stdio::null());
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().next().unwrap_or_default();
    if out.status.success()
        && let Some(rest) = line.strip_prefix("ok ")
    {
        let mut words = rest.split_whitespace();
        let local = words.next().and_then(|w| w.parse().ok());
        let reply_from = match (words.next(), words.next()) {
            (Some("from"), Some(from)) => from.parse().ok(),
            _ => None,
        };
        if let Some(local) = local {
            return Ok(Exchange { local, reply_from });
        }
    }
    match line.strip_prefix("err ") {
        Some(text) if out.status.code() == Some(1) => Err(probe_error(text)),
        _ => panic!(
            "{cmd:?}: {}, stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// An error with the probe's text, and the kind of the OS error it ends with (`... (os error N)`).
fn probe_error(text: &str) -> std::io::Error {
    let kind = text
        .rsplit_once("(os error ")
        .and_then(|(_, n)| n.strip_suffix(')')?.parse().ok())
        .map_or(std::io::ErrorKind::Other, |n| {
            std::io::Error::from_raw_os_error(n).kind()
        });
    std::io::Error::new(kind, text.to_owned())
}

/// The `capture` binary under test: `$CAPTURE_BIN` (set by `cargo xtask test`), else the one cargo built
/// next to this test executable; where every user can run it (see [`runnable`]), since validation runs it
/// as the app and the proxy.
pub fn capture_bin() -> PathBuf {
    runnable::runnable_by_all(&built_capture())
}

/// `$CAPTURE_BIN`, else the `capture` cargo built next to this test executable: where it was built.
fn built_capture() -> PathBuf {
    if let Some(bin) = std::env::var_os("CAPTURE_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/capture
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("capture"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo xtask test`, or `cargo build -p capture-userspace` first",
        bin.display()
    );
    // `cargo test -p tests` builds the tests, not the `capture` binary they run: one older than its sources
    // would test old code and pass or fail for the wrong reason. Checked once per test process.
    static FRESH: std::sync::Once = std::sync::Once::new();
    FRESH.call_once(|| {
        let built = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .expect("mtime of capture");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for crate_dir in ["capture-userspace/src", "capture-ebpf/src", "capture-common/src"] {
            if let Some(newer) = newer_file(&workspace.join(crate_dir), built) {
                panic!(
                    "{} is older than {}: run `cargo xtask test`, or `cargo build` first",
                    bin.display(),
                    newer.display()
                );
            }
        }
    });
    bin
}

/// A file under `dir` modified after `than`, if any.
fn newer_file(dir: &Path, than: std::time::SystemTime) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            if let Some(newer) = newer_file(&path, than) {
                return Some(newer);
            }
        } else if meta.modified().is_ok_and(|m| m > than) {
            return Some(path);
        }
    }
    None
}

/// Runs `capture ARGS` inside `ns` with a clean environment (only PATH), returning its output.
pub fn capture(ns: &Netns, args: &[&str]) -> Output {
    capture_with_env(ns, args, &[])
}

/// As [`capture`], with extra environment variables.
pub fn capture_with_env(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = ns.command(capture_bin());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run capture")
}

/// istio's CNI-mode validation: `capture <applied> --run-validation --skip-rule-apply` inside `ns` (and
/// `cgroup`, for the eBPF backend) as `ids`; asserts exit 0 for the proxy user and 126 (istio's code) for
/// the app user.
pub fn assert_validation(ns: &Netns, cgroup: Option<&Cgroup>, applied: &[&str], proxy: (u32, u32), app: (u32, u32)) {
    let validate = |ids| {
        let mut cmd = ns.command(capture_bin());
        cmd.args(applied)
            .args(["--run-validation", "--skip-rule-apply", "--probe-timeout", "2s"])
            .env_clear();
        if let Some(cgroup) = cgroup {
            cgroup.enter(&mut cmd);
        }
        run_as(&mut cmd, ids);
        cmd.output().expect("run capture --run-validation")
    };
    for (ids, code, who) in [(proxy, 0, "the proxy user"), (app, 126, "the app user")] {
        let out = validate(ids);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "validation as {who}: {stderr}");
        if code != 0 {
            assert!(stderr.contains("validation failed"), "{stderr}");
        }
    }
}

/// `addr:port`.
pub fn sa(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

/// The injector's default flags (`docs/istio-rules.md#how-istio-iptables-is-invoked`): `-p 15001 -z 15006 -u 1337
/// -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020`.
pub const INJECTOR_DEFAULT_FLAGS: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

/// A child cgroup of the cgroup v2 root, made for one test and removed on drop (after its processes exit);
/// or a cgroup nested under such a one ([`Cgroup::child`]).
pub struct Cgroup {
    path: PathBuf,
    /// Directories made above `path` for it (a nested child's), innermost first: removed after it.
    parents: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates it.
    pub fn new(tag: &str) -> Cgroup {
        let root = capture::cgroup::cgroup2_root().expect("cgroup v2 root");
        let path = root.join(unique(tag));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Cgroup {
            path,
            parents: Vec::new(),
        }
    }

    /// A cgroup nested under this one at the relative path `rel` (e.g. the kubelet's
    /// `kubepods/besteffort/pod<UID>/<container>`), made with the directories it needs. Programs attached
    /// to this cgroup apply inside it too. On drop its processes are killed and it is removed, then the
    /// directories made for it (innermost first); drop it before this one.
    pub fn child(&self, rel: impl AsRef<Path>) -> Cgroup {
        let rel = rel.as_ref();
        assert!(
            rel.components().count() > 0 && rel.components().all(|c| matches!(c, std::path::Component::Normal(_))),
            "not a relative path of plain names: {}",
            rel.display()
        );
        let mut path = self.path.clone();
        let mut made = Vec::new();
        for part in rel.components() {
            path.push(part);
            match std::fs::create_dir(&path) {
                Ok(()) => made.push(path.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("create {}: {e}", path.display()),
            }
        }
        // The innermost is the cgroup itself; the rest, innermost first, go after it.
        made.retain(|dir| *dir != path);
        made.reverse();
        Cgroup { path, parents: made }
    }

    /// Its directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Makes `cmd` start inside this cgroup.
    pub fn enter(&self, cmd: &mut Command) {
        let procs = File::options()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        // SAFETY: write(2) is async-signal-safe; "0" means the writing process itself.
        unsafe {
            cmd.pre_exec(move || {
                let n = libc::write(std::os::fd::AsRawFd::as_raw_fd(&procs), b"0".as_ptr().cast(), 1);
                if n == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
}

impl Cgroup {
    /// Moves this whole process into the cgroup until the guard drops, for code that must run in it on
    /// threads (the demo's in-process sidecar). Drop the guard before the cgroup.
    pub fn enter_self(&self) -> InCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("this process is in a cgroup v2 hierarchy");
        let root = capture::cgroup::cgroup2_root().expect("cgroup v2 root");
        let back = root.join(rel.trim_start_matches('/'));
        std::fs::write(self.path.join("cgroup.procs"), std::process::id().to_string()).expect("join the cgroup");
        InCgroup { back }
    }
}

/// While it lives, this process is in a test cgroup; on drop it returns where it was.
pub struct InCgroup {
    back: PathBuf,
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.back.join("cgroup.procs"), std::process::id().to_string());
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Whatever still runs in it is a leftover of a failed test: end it (cgroup.kill, Linux 5.14+).
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        // Processes started in it may take a moment to be reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for dir in &self.parents {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A private bpffs for one test's `capture --backend ebpf --pin-dir`: mounted on a fresh directory under
/// /run, so tests neither share nor disturb /sys/fs/bpf (nor leave a bpffs mounted there). On drop,
/// whatever is still pinned is unpinned (links too, which detaches the programs) and the bpffs unmounted.
pub struct BpfPins {
    mount: PathBuf,
    dir: PathBuf,
}

impl BpfPins {
    /// Mounts the bpffs; the pin directory inside it does not exist yet (capture creates it).
    pub fn new(tag: &str) -> BpfPins {
        let mount = PathBuf::from("/run/capture-tests").join(unique(tag));
        std::fs::create_dir_all(&mount).unwrap_or_else(|e| panic!("create {}: {e}", mount.display()));
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&mount));
        let dir = mount.join("capture");
        BpfPins { mount, dir }
    }

    /// The pin directory to give capture.
    pub fn path(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for BpfPins {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        // The kernel may still be releasing what was pinned: retry, then detach lazily as a last resort.
        let unmounted = (0..20).any(|_| {
            let ok = Command::new("umount")
                .arg(&self.mount)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                std::thread::sleep(Duration::from_millis(50));
            }
            ok
        });
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = std::fs::remove_dir(&self.mount);
    }
}
