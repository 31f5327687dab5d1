//! Test harness for capture's integration tests: throwaway network namespaces joined by veth, processes and
//! sockets inside them as a chosen uid/gid, listeners that report what they accepted, and the `capture`
//! binary run inside a namespace. Everything created here is removed on drop, also when a test fails.
//!
//! Traffic only ever goes to loopback or to addresses inside namespaces made here (TEST-NET-1 and the IPv6
//! documentation prefix), never through the host's namespace.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

pub mod sidecar;

use capture::sockopt::original_dst;

/// How long a test connection may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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
    /// namespace change only for that thread (raw syscalls, not libc's process-wide wrappers).
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

    /// Runs `f` inside this namespace and waits for it.
    pub fn within<T: Send + 'static>(&self, ids: Option<(u32, u32)>, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(ids, f).join().expect("namespace thread panicked")
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

/// TCP listeners inside a namespace that report every accepted connection, answer with one byte, and
/// stop on drop.
pub struct Listeners {
    rx: mpsc::Receiver<Accepted>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Listeners {
    /// Listens on each address (bound inside `ns`).
    pub fn start(ns: &Netns, addrs: &[SocketAddr]) -> Listeners {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let threads = addrs
            .iter()
            .map(|&addr| {
                let (tx, stop, ready) = (tx.clone(), stop.clone(), ready_tx.clone());
                ns.spawn(None, move || {
                    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("listen on {addr}: {e}"));
                    listener.set_nonblocking(true).expect("nonblocking");
                    ready.send(()).expect("ready");
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut conn, peer)) => {
                                conn.set_nonblocking(false).expect("blocking");
                                let original_dst = original_dst(conn.as_fd(), addr.is_ipv6()).ok();
                                let _ = conn.write_all(&[1]);
                                let _ = tx.send(Accepted {
                                    listener: addr.port(),
                                    peer,
                                    original_dst,
                                });
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                })
            })
            .collect();
        for _ in addrs {
            ready_rx.recv_timeout(CONNECT_TIMEOUT).expect("listener did not start");
        }
        Listeners { rx, stop, threads }
    }

    /// The next accepted connection, if one arrives within the timeout.
    pub fn next(&self) -> Option<Accepted> {
        self.rx.recv_timeout(CONNECT_TIMEOUT).ok()
    }

    /// Connections already reported, without waiting.
    pub fn drain(&self) -> Vec<Accepted> {
        self.rx.try_iter().collect()
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Connects from inside `ns` as `(uid, gid)` to `dst`, waits for the listener's byte, closes. Returns the
/// local address the connection used, or the error.
pub fn connect_as(ns: &Netns, ids: (u32, u32), dst: SocketAddr) -> std::io::Result<SocketAddr> {
    ns.within(Some(ids), move || {
        let mut s = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)?;
        s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        let mut byte = [0];
        s.read_exact(&mut byte)?;
        let local = s.local_addr()?;
        let _ = s.shutdown(Shutdown::Both);
        Ok(local)
    })
}

/// The `capture` binary under test: `$CAPTURE_BIN` (set by `cargo xtask test`), else the one cargo built
/// next to this test executable.
pub fn capture_bin() -> PathBuf {
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
    bin
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

/// `addr:port`.
pub fn sa(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

/// The injector's default flags (REFERENCE §1): `-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*'
/// -d 15090,15021,15020`.
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

/// A child cgroup of the cgroup v2 root, made for one test and removed on drop (after its processes exit).
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates it.
    pub fn new(tag: &str) -> Cgroup {
        let root = capture::cgroup::cgroup2_root().expect("cgroup v2 root");
        let path = root.join(unique(tag));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Cgroup { path }
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

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes started in it may take a moment to be reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
