//! A `capture agent` process for a test ([`Agent`]): its own pins, cgroup, records, control socket and HTTP
//! port; killed on drop. A pod's [`Sandbox`] process. [`wait_until`], for what the agent does in its own time, and [`lands`]: where a
//! pod's connection goes.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{BpfPins, Cgroup, Listeners, Netns, Pod, REMOTE_V4, capture_bin, connect_as, sa};

/// How long the agent may take to attach and come up (on this machine; see [`crate::patient`]).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `capture agent` with its own pins, cgroup, records and socket; killed (SIGKILL) on drop.
pub struct Agent {
    child: Option<Child>,
    /// The control socket.
    pub socket: PathBuf,
    http: SocketAddr,
    /// Its arguments (`agent …`).
    pub args: Vec<String>,
    /// Environment variables the agent gets beside the test's own.
    env: Vec<(String, String)>,
    /// Its records (`state/`), log and kubeconfig; removed on drop.
    pub dir: PathBuf,
}

impl Agent {
    pub fn start(tag: &str, pins: &BpfPins, cgroup: &Cgroup) -> Agent {
        let mut agent = Agent::new(tag, pins, cgroup);
        agent.restart();
        agent
    }

    /// An agent with `--kubernetes`, watching node `node`'s pods through `kubeconfig` (written beside its
    /// records).
    pub fn start_kubernetes(tag: &str, pins: &BpfPins, cgroup: &Cgroup, node: &str, kubeconfig: &str) -> Agent {
        let mut agent = Agent::new(tag, pins, cgroup);
        let path = agent.dir.join("kubeconfig");
        std::fs::write(&path, kubeconfig).expect("write the kubeconfig");
        agent.args.push("--kubernetes".into());
        agent.env = vec![
            ("NODE_NAME".into(), node.into()),
            ("KUBECONFIG".into(), path.display().to_string()),
        ];
        agent.restart();
        agent
    }

    /// The agent's arguments and directory; not started yet.
    pub fn new(tag: &str, pins: &BpfPins, cgroup: &Cgroup) -> Agent {
        let dir = std::env::temp_dir().join(format!("capture-agent-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("agent dir");
        let socket = dir.join("agent.sock");
        // A free port for the HTTP endpoints.
        let http = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let args = vec![
            "agent".to_owned(),
            "--socket".into(),
            socket.display().to_string(),
            "--pin-dir".into(),
            pins.path().display().to_string(),
            "--cgroup".into(),
            cgroup.path().display().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--listen".into(),
            http.to_string(),
        ];
        Agent {
            child: None,
            socket,
            http,
            args,
            env: Vec::new(),
            dir,
        }
    }

    /// Starts the agent process (again) and waits until it answers on its socket.
    pub fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.join("agent.log")).expect("agent log");
        let child = Command::new(capture_bin())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start capture agent");
        self.child = Some(child);
        let deadline = Instant::now() + crate::patient(READY_TIMEOUT);
        while self.http_get("/readyz").is_none_or(|r| !r.starts_with("HTTP/1.1 200")) {
            assert!(Instant::now() < deadline, "the agent did not get ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its PID (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent runs").id()
    }

    /// SIGKILL: no chance to clean up, as when a node agent crashes or is OOM-killed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// `capture pod <args>`.
    pub fn pod(&self, args: &[&str]) -> Output {
        Command::new(capture_bin())
            .arg("pod")
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run capture pod")
    }

    pub fn add(&self, id: &str, netns: &Path, flags: &[&str]) -> Output {
        let netns = netns.display().to_string();
        let mut args = vec!["add", id, &netns, "--"];
        args.extend_from_slice(flags);
        self.pod(&args)
    }

    pub fn list(&self) -> String {
        let out = self.pod(&["list"]);
        assert!(
            out.status.success(),
            "pod list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A plain HTTP/1.1 GET of the agent's endpoints: the whole response, or None if it does not answer.
    pub fn http_get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.http, Duration::from_millis(200)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `done` holds, at most `wait` (stretched by the time scale); panics naming `what` if not.
pub fn wait_until(what: &str, wait: Duration, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + crate::patient(wait);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {wait:?}: {}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The uid and gid of an app in a pod (not the proxy's 1337).
pub const APP: (u32, u32) = (1000, 1000);

/// The pod's sidecar on 15001 (in `cgroup`) and the remote's server on 8080, for [`lands`].
pub fn listening(pod: &Pod, cgroup: &Cgroup) -> (Listeners, Listeners) {
    (
        Listeners::start(&pod.pod, Some(cgroup), None, &[sa(Ipv4Addr::UNSPECIFIED, 15001)]),
        Listeners::start(&pod.remote, None, None, &[sa(REMOTE_V4, 8080)]),
    )
}

/// Where an app connection to the remote service lands: the sidecar (with the original destination) or
/// the remote server itself.
pub fn lands(pod: &Pod, cgroup: &Cgroup, sidecar: &Listeners, remote: &Listeners) -> &'static str {
    let dst = sa(REMOTE_V4, 8080);
    connect_as(&pod.pod, Some(cgroup), APP, dst).unwrap_or_else(|e| panic!("connect: {e}"));
    accepted_by(dst, ("sidecar", sidecar), ("remote", remote))
}

/// Which of two listeners accepted the connection to `dst` just made; a captured one (`proxy`) must have
/// seen `dst` as its original destination.
pub fn accepted_by(
    dst: SocketAddr,
    proxy: (&'static str, &Listeners),
    plain: (&'static str, &Listeners),
) -> &'static str {
    let deadline = Instant::now() + crate::patient(Duration::from_secs(5));
    while Instant::now() < deadline {
        if let Some(a) = proxy.1.drain().pop() {
            assert_eq!(a.original_dst, Some(dst));
            return proxy.0;
        }
        if !plain.1.drain().is_empty() {
            return plain.0;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the connection was accepted nowhere");
}

/// A sandbox process (`sleep`) in `ns`, killed on drop; with `pid`, only with exactly that PID (set up
/// through `ns_last_pid`; None if other processes kept taking it).
pub struct Sandbox(Child);

impl Sandbox {
    pub fn start(ns: &Netns) -> Sandbox {
        Sandbox(ns.command("sleep").arg("600").spawn().expect("start a sandbox process"))
    }

    /// As [`Sandbox::start`], inside `cgroup`.
    pub fn start_in(ns: &Netns, cgroup: &Cgroup) -> Sandbox {
        let mut cmd = ns.command("sleep");
        cgroup.enter(&mut cmd);
        Sandbox(cmd.arg("600").spawn().expect("start a sandbox process"))
    }

    pub fn with_pid(ns: &Netns, pid: u32) -> Option<Sandbox> {
        /// Tries before giving up: other processes of the machine fork too.
        const TRIES: usize = 50;
        for _ in 0..TRIES {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).expect("write ns_last_pid");
            let sandbox = Sandbox::start(ns);
            if sandbox.0.id() == pid {
                return Some(sandbox);
            }
        }
        None
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its network namespace, as `/proc/PID/ns/net`.
    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.0.id()))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
