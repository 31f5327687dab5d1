//! `capture agent`: one long-running process per node that keeps pods captured, instead of an init
//! container per pod. Pod sources (the local control socket, Kubernetes) tell it which pods exist; it
//! registers each pod's network namespace with the eBPF backend and unregisters it when the pod goes.

pub mod annotations;
pub mod cli;
pub mod control;
mod http;
pub mod kube;
pub mod registry;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use self::registry::{PodRecord, Registry, Settings, Source};
use crate::{config::LogLevel, ebpf};

/// A pod to capture, as a source describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodSpec {
    /// Stable identity: `namespace/name` for a Kubernetes pod; any unique name over the control socket.
    pub id: String,
    /// The pod's network namespace: a path such as `/proc/PID/ns/net` or `/run/netns/NAME`.
    pub netns: PathBuf,
    /// The istio-iptables flags for this pod, as `capture` takes them (`["-p", "15001", "-u", "1337", …]`).
    pub flags: Vec<String>,
}

/// What a pod source tells the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// Capture this pod (new, or with changed flags or namespace).
    Upsert(PodSpec),
    /// This pod is gone: release it.
    Remove(String),
    /// After a (re)list: every pod the source knows now. The agent releases the pods of this source that
    /// are not listed.
    Synced(Vec<String>),
}

/// The running agent's state, shared by its sources and endpoints.
pub struct Agent {
    registry: Mutex<Registry>,
    /// Set once the programs are attached and the records reconciled.
    ready: AtomicBool,
    stats: Mutex<Stats>,
}

/// The agent's own figures, for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// How long the reconcile at start took.
    pub reconcile: Duration,
    /// How long the last registration took in the kernel (flags checked, namespace entered, maps written).
    pub last_registration: Duration,
    /// Requests from sources that failed.
    pub errors: u64,
    /// Failed registrations, by pod.
    pub failures: std::collections::BTreeMap<String, u64>,
}

impl Agent {
    /// Applies one event of `source`; returns whether anything changed.
    pub fn apply(&self, event: SourceEvent, source: Source) -> Result<bool> {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut failed_pod = None;
        let result = match event {
            SourceEvent::Upsert(spec) => {
                let id = spec.id.clone();
                failed_pod = Some(id.clone());
                registry.upsert(spec, source).map(|took| {
                    if !took.is_zero() {
                        tracing::info!(pod = %id, micros = took.as_micros() as u64, "registered");
                        self.stats().last_registration = took;
                    }
                    !took.is_zero()
                })
            }
            SourceEvent::Remove(id) => registry.remove(&id).inspect(|&removed| {
                if removed {
                    tracing::info!(pod = %id, "released");
                }
            }),
            SourceEvent::Synced(present) => registry.retain(source, &present).map(|n| n > 0),
        };
        if let Err(e) = &result {
            tracing::warn!(error = %format!("{e:#}"), "request failed");
            let mut stats = self.stats();
            stats.errors += 1;
            if let Some(pod) = failed_pod {
                *stats.failures.entry(pod).or_default() += 1;
            }
        }
        result
    }

    /// Every captured pod.
    pub fn pods(&self) -> Vec<PodRecord> {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        registry.pods().cloned().collect()
    }

    /// Whether the agent has taken over the kernel's state and serves requests.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn registry_settings(&self) -> Settings {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        registry.settings().clone()
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How `capture agent` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Programs, maps and records.
    pub settings: Settings,
    /// The control socket.
    pub socket: PathBuf,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: std::net::SocketAddr,
    /// Watch this node's pods in Kubernetes (node name from `$NODE_NAME`).
    pub kubernetes: Option<kube::KubeSource>,
}

/// Runs the agent until SIGTERM or Ctrl-C. Capture stays in the kernel when it stops (or is killed): a
/// new agent takes over from the pins and the state file.
pub fn run(opts: Options) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(serve(opts))
}

async fn serve(opts: Options) -> Result<()> {
    let settings = opts.settings.clone();
    // Two agents on one state directory or socket would interleave their records and steal each other's
    // socket: the second refuses before it touches anything.
    let _state_lock = hold(&settings.state_dir.join(LOCK_FILE), "--state-dir", &settings.state_dir)?;
    let _socket_lock = hold(&lock_beside(&opts.socket), "--socket", &opts.socket)?;
    let started = Instant::now();
    let swept = ebpf::attach(&settings.pin_dir, Some(&settings.cgroup), LogLevel::Off)?;
    if swept > 0 {
        tracing::warn!(
            entries = swept,
            "swept set and CIDR entries no registered configuration owns"
        );
    }
    let spares = ebpf::Spares::start(&settings.pin_dir);
    let mut registry = Registry::load(settings, spares)?;
    let reconciled = registry
        .reconcile()
        .context("take over the pods of the previous agent")?;
    let agent = Arc::new(Agent {
        registry: Mutex::new(registry),
        ready: AtomicBool::new(false),
        stats: Mutex::new(Stats {
            reconcile: started.elapsed(),
            ..Stats::default()
        }),
    });
    tracing::info!(
        kept = reconciled.kept,
        restored = reconciled.restored,
        released = reconciled.released,
        millis = started.elapsed().as_millis() as u64,
        "programs attached, pods reconciled"
    );
    let http = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listen on {}", opts.listen))?;
    tracing::info!(socket = %opts.socket.display(), http = %http.local_addr()?, "serving");
    agent.ready.store(true, Ordering::Relaxed);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let kubernetes = async {
        match opts.kubernetes {
            Some(source) => follow_kubernetes(source, agent.clone()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = control::serve(&opts.socket, agent.clone()) => r,
        r = http::serve(http, agent.clone()) => r,
        r = kubernetes => r,
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// The lock file in the state directory.
const LOCK_FILE: &str = "agent.lock";

/// The lock file beside the control socket `socket`.
fn lock_beside(socket: &std::path::Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_owned();
    name.push(".lock");
    socket.with_file_name(name)
}

/// Holds an exclusive lock on `path` (made if missing) for as long as the returned value lives; fails at once,
/// naming `flag` and `value`, if another process holds it.
fn hold(path: &std::path::Path, flag: &str, value: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| match e {
        nix::errno::Errno::EWOULDBLOCK => anyhow::anyhow!(
            "{flag} {}: another capture agent is running with it (it holds {})",
            value.display(),
            path.display()
        ),
        e => anyhow::Error::from(e).context(format!("lock {}", path.display())),
    })
}

/// Applies the Kubernetes watch's events, one at a time, in order. A registration that fails is tried
/// again with backoff (1 s, doubling, at most a minute apart) until it succeeds or the pod changes or goes.
async fn follow_kubernetes(source: kube::KubeSource, agent: Arc<Agent>) -> Result<()> {
    /// Events the watch may queue while a registration runs.
    const QUEUE: usize = 256;
    let (tx, mut rx) = tokio::sync::mpsc::channel(QUEUE);
    let watch = tokio::spawn(kube::watch(source, tx));
    let mut retries = Retries::default();
    loop {
        let due = retries.earliest();
        let event = tokio::select! {
            event = rx.recv() => match event {
                Some(event) => {
                    retries.superseded_by(&event);
                    event
                }
                None => break,
            },
            () = sleep_until(due) => match retries.take_due(Instant::now()) {
                Some(spec) => SourceEvent::Upsert(spec),
                None => continue,
            },
        };
        let upsert = match &event {
            SourceEvent::Upsert(spec) => Some(spec.clone()),
            _ => None,
        };
        let agent = agent.clone();
        // A failed event is counted and logged by `apply`; the watch goes on.
        let ok = tokio::task::spawn_blocking(move || agent.apply(event, Source::Kubernetes).is_ok())
            .await
            .unwrap_or(false);
        match (ok, upsert) {
            (false, Some(spec)) => retries.failed(spec, Instant::now()),
            (true, Some(spec)) => retries.succeeded(&spec.id),
            _ => {}
        }
    }
    watch.await.context("the Kubernetes watch")?
}

/// Sleeps until `due`; never returns for `None`.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

/// Registrations to try again, by pod id.
#[derive(Debug, Default)]
struct Retries(std::collections::BTreeMap<String, Retry>);

#[derive(Debug)]
struct Retry {
    spec: PodSpec,
    /// Failures so far.
    failures: u32,
    due: Instant,
}

impl Retries {
    /// The first wait after a failure.
    const FIRST: Duration = Duration::from_secs(1);
    /// The longest wait.
    const LONGEST: Duration = Duration::from_secs(60);

    /// Records a failed registration of `spec` at `now`: it is due again after a backoff that doubles with
    /// each failure of the same pod.
    fn failed(&mut self, spec: PodSpec, now: Instant) {
        let failures = self.0.get(&spec.id).map_or(0, |r| r.failures) + 1;
        let wait = Self::FIRST
            .saturating_mul(1 << (failures - 1).min(16))
            .min(Self::LONGEST);
        let id = spec.id.clone();
        self.0.insert(
            id,
            Retry {
                spec,
                failures,
                due: now + wait,
            },
        );
    }

    /// A new event about a pod replaces its retry: an update brings its own attempt, a removal or a
    /// re-list without it ends the matter.
    fn superseded_by(&mut self, event: &SourceEvent) {
        match event {
            SourceEvent::Upsert(spec) => {
                // Keep the count, so a pod that keeps failing keeps its backoff; the new spec is tried now.
                if let Some(r) = self.0.get_mut(&spec.id) {
                    r.spec = spec.clone();
                    r.due = Instant::now() + Self::LONGEST;
                }
            }
            SourceEvent::Remove(id) => {
                self.0.remove(id);
            }
            SourceEvent::Synced(present) => self.0.retain(|id, _| present.contains(id)),
        }
    }

    /// When the next retry is due.
    fn earliest(&self) -> Option<Instant> {
        self.0.values().map(|r| r.due).min()
    }

    /// Pod `id` registered: nothing more to try, and its backoff starts over.
    fn succeeded(&mut self, id: &str) {
        self.0.remove(id);
    }

    /// A pod whose retry is due at `now`, taken off the list (it comes back if it fails again).
    fn take_due(&mut self, now: Instant) -> Option<PodSpec> {
        let id = self.0.iter().find(|(_, r)| r.due <= now).map(|(id, _)| id.clone())?;
        let retry = self.0.get_mut(&id)?;
        // Leave the count behind for the next failure's backoff; not due until then.
        retry.due = now + Self::LONGEST * 1000;
        Some(retry.spec.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> PodSpec {
        PodSpec {
            id: id.into(),
            netns: "/proc/1/ns/net".into(),
            flags: vec![],
        }
    }

    #[test]
    fn failed_registrations_come_back_with_doubling_backoff_until_the_pod_changes_or_goes() {
        let t0 = Instant::now();
        let mut r = Retries::default();
        assert_eq!(r.earliest(), None);
        r.failed(spec("a"), t0);
        assert_eq!(r.earliest(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(r.take_due(t0), None, "not due yet");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(r.take_due(t1).map(|s| s.id), Some("a".into()));
        assert_eq!(r.take_due(t1), None, "taken");
        r.failed(spec("a"), t1);
        assert_eq!(r.earliest(), Some(t1 + Duration::from_secs(2)));
        for _ in 0..10 {
            r.failed(spec("a"), t1);
        }
        assert_eq!(r.earliest(), Some(t1 + Retries::LONGEST), "capped");
        r.failed(spec("b"), t1);
        r.succeeded("b");
        r.failed(spec("b"), t1);
        assert!(r.0["b"].failures == 1, "a success starts the backoff over");
        r.superseded_by(&SourceEvent::Remove("a".into()));
        r.superseded_by(&SourceEvent::Synced(vec!["c".into()]));
        assert_eq!(r.earliest(), None, "removed, and not listed any more");
    }
}
