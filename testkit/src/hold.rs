//! Many captured connections held open at once: the harness side of `capture-probe hold` (app and sidecar
//! in one process, inside a pod's namespace and cgroup; see that command's documentation). A process may
//! hold only so many sockets (`RLIMIT_NOFILE`, which this machine's root cannot raise), so one pod's
//! connections are spread over as many processes as they need, all listening on the sidecar port with
//! `SO_REUSEPORT`, as a proxy's worker threads do.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    process::{Child, ChildStdin, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::{Cgroup, Netns, patient, probe_bin, run_as};

/// How long a command may take per connection (on this machine; see [`patient`]).
const PER_CONNECTION: Duration = Duration::from_millis(2);
/// And at least this long.
const AT_LEAST: Duration = Duration::from_secs(20);
/// Descriptors a process keeps for itself, beyond two a connection.
const SPARE_FILES: u64 = 256;

/// What `accept` or `recheck` found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Connections checked.
    pub checked: u32,
    /// Whose `SO_ORIGINAL_DST` was where that connection was going.
    pub right: u32,
    /// Whose `SO_ORIGINAL_DST` was somewhere else.
    pub wrong: u32,
    /// That had no `SO_ORIGINAL_DST`.
    pub none: u32,
}

impl Checked {
    fn add(self, other: Checked) -> Checked {
        Checked {
            checked: self.checked + other.checked,
            right: self.right + other.right,
            wrong: self.wrong + other.wrong,
            none: self.none + other.none,
        }
    }
}

/// The most connections one process is given: its open-file limit (which it inherits from this one) holds
/// two descriptors each, with room left since the kernel spreads accepted connections over the pod's
/// processes only about evenly.
fn per_process() -> u32 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the kernel to fill.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0,
        "getrlimit"
    );
    let per = limit.rlim_max.saturating_sub(SPARE_FILES) / 2 * 7 / 10;
    assert!(
        per >= 1000,
        "RLIMIT_NOFILE {} is too low to hold many connections",
        limit.rlim_max
    );
    u32::try_from(per).unwrap_or(u32::MAX)
}

/// The app and sidecar of one pod, holding up to the capacity it was started with.
pub struct HeldPod {
    processes: Vec<Process>,
    /// Connections made so far (the next one's index).
    connected: u32,
}

impl HeldPod {
    /// Starts enough `capture-probe hold` processes in `ns` and `cgroup`, as `ids`, to hold `capacity`
    /// connections, their sidecar on `sidecar`; connection `i` will go to `first`'s address plus `i`.
    pub fn start(
        ns: &Netns,
        cgroup: &Cgroup,
        ids: (u32, u32),
        sidecar: SocketAddr,
        first: SocketAddr,
        capacity: u32,
    ) -> HeldPod {
        let count = capacity.div_ceil(per_process()).max(1);
        let processes = (0..count)
            .map(|_| Process::start(ns, cgroup, ids, sidecar, first))
            .collect();
        HeldPod {
            processes,
            connected: 0,
        }
    }

    /// Makes `n` more connections, spread over the processes, none accepted yet; panics if any fails.
    pub fn connect(&mut self, n: u32) {
        let share = n.div_ceil(self.processes.len() as u32);
        let mut left = n;
        for p in &mut self.processes {
            let mine = share.min(left);
            p.send(&format!("connect {} {mine}", self.connected));
            let line = p.line(budget(mine));
            assert_eq!(line, format!("connected {mine}"), "capture-probe hold: connect {mine}");
            self.connected += mine;
            left -= mine;
        }
    }

    /// Accepts every connection not accepted yet, in whichever process the kernel gave it to, and checks each
    /// one's original destination; the first wrong one, if any, is printed. Panics unless all are accepted.
    pub fn accept(&mut self) -> Checked {
        let expected = self.connected - self.accepted();
        let deadline = Instant::now() + budget(expected);
        let mut total = Checked::default();
        // A connection whose handshake the kernel is still finishing shows in a later round.
        while total.checked < expected && Instant::now() < deadline {
            for p in &mut self.processes {
                let round = p.check("accept", expected);
                p.accepted += round.checked;
                total = total.add(round);
            }
        }
        assert_eq!(total.checked, expected, "connections accepted");
        total
    }

    /// Checks the original destination of every connection accepted so far, again.
    pub fn recheck(&mut self) -> Checked {
        self.processes.iter_mut().fold(Checked::default(), |total, p| {
            let n = p.accepted;
            total.add(p.check("recheck", n))
        })
    }

    fn accepted(&self) -> u32 {
        self.processes.iter().map(|p| p.accepted).sum()
    }

    /// Closes every connection: ends the processes and waits for them.
    pub fn close(self) {
        for mut p in self.processes {
            p.close();
        }
    }
}

/// The time a command about `n` connections may take.
fn budget(n: u32) -> Duration {
    patient(AT_LEAST + PER_CONNECTION * n)
}

/// One `capture-probe hold` process; killed (and so every socket it holds closed) on drop.
struct Process {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Connections it accepted so far.
    accepted: u32,
}

impl Process {
    fn start(ns: &Netns, cgroup: &Cgroup, ids: (u32, u32), sidecar: SocketAddr, first: SocketAddr) -> Process {
        let mut cmd = ns.command(probe_bin());
        cmd.process_group(0);
        cgroup.enter(&mut cmd);
        run_as(&mut cmd, ids);
        cmd.args(["hold", &sidecar.to_string(), &first.to_string()]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = Process {
            child,
            stdin,
            lines,
            accepted: 0,
        };
        let ready = process.line(patient(AT_LEAST));
        assert_eq!(ready, "ready", "capture-probe hold in {}", ns.name());
        process
    }

    /// The next line; panics if none comes within `wait`.
    fn line(&mut self, wait: Duration) -> String {
        self.lines
            .recv_timeout(wait)
            .unwrap_or_else(|e| panic!("capture-probe hold: no answer within {wait:?} ({e})"))
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open until close");
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("capture-probe hold: {command}: {e}"));
    }

    /// `accept` or `recheck` of up to `n` connections, and what it found.
    fn check(&mut self, command: &str, n: u32) -> Checked {
        self.send(command);
        let mut line = self.line(budget(n));
        if line.starts_with("first-wrong") {
            eprintln!("capture-probe hold: {line}");
            line = self.line(budget(0));
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |s: &str| s.parse().unwrap_or_else(|_| panic!("capture-probe hold said {line:?}"));
        match words.as_slice() {
            ["checked", n, "right", r, "wrong", w, "none", m] => Checked {
                checked: number(n),
                right: number(r),
                wrong: number(w),
                none: number(m),
            },
            _ => panic!("capture-probe hold: {command}: said {line:?}"),
        }
    }

    /// Ends the process by closing its stdin and waits for it to exit.
    fn close(&mut self) {
        self.stdin = None;
        let deadline = Instant::now() + patient(AT_LEAST);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("capture-probe hold did not exit after its stdin closed");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
