//! The `capture-probe` process from the harness's side: where its binary is, starting it in a namespace and
//! cgroup as a given user ([`run_as`]), listeners that report what they accepted ([`Listeners`]), and one
//! connection or datagram exchange ([`exchange`] and its shorthands).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    Cgroup, Netns,
    capture::built_capture,
    connect_timeout, patient,
    protocol::{Accepted, Datagram, Line},
    runnable,
};

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
        "{} does not exist: run `cargo xtask test`, or `cargo build -p capture-testkit --bin capture-probe` first",
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
                match (line.parse::<Line>(), &ready) {
                    (Ok(Line::Ready), Some(tx)) => {
                        let _ = tx.send(Ok(()));
                        ready = None;
                    }
                    (_, Some(tx)) => {
                        let _ = tx.send(Err(line.clone()));
                    }
                    (Ok(Line::Accepted(accepted)), None) => {
                        let _ = accepted_tx.send(accepted);
                    }
                    (Ok(Line::Udp(datagram)), None) => {
                        let _ = datagram_tx.send(datagram);
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
    match line.parse::<Line>() {
        Ok(Line::Ok { local, from }) if out.status.success() => Ok(Exchange {
            local,
            reply_from: from,
        }),
        Ok(Line::Err(text)) if out.status.code() == Some(1) => Err(probe_error(&text)),
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
