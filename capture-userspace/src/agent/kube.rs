//! The Kubernetes pod source: watch the pods scheduled on this node, pick the ones an Istio sidecar was
//! injected into ([`annotations::decide`]), find each one's network namespace under /proc, and tell the
//! agent ([`SourceEvent`]).
//!
//! The namespace is found from the pod's UID in `/proc/PID/cgroup` (the kubelet puts every container of a
//! pod, the sandbox included, under a `pod<UID>` cgroup), so the agent needs the host's PID namespace
//! (`hostPID`). A pod's sandbox can exist before or after the API shows the pod on this node: a pod
//! whose namespace is not there yet waits, and is looked for again every [`KubeSource::rescan`].

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use ::kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::mpsc;

use super::{PodSpec, SourceEvent, annotations};

/// The env var the DaemonSet sets from the downward API (`spec.nodeName`).
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// Where and how to watch.
#[derive(Clone, Debug)]
pub struct KubeSource {
    /// This node's name: only pods with `spec.nodeName` equal to it are watched.
    pub node_name: String,
    /// The host's /proc (the agent runs with `hostPID`); a fake tree in tests.
    pub proc_root: PathBuf,
    /// How often pods waiting for their namespace are looked for, and captured ones checked.
    pub rescan: Duration,
    /// The API server and credentials; `None`: the in-cluster service account, else `$KUBECONFIG`.
    pub kube_config: Option<::kube::Config>,
}

impl KubeSource {
    /// The node name from `$NODE_NAME`, the host's /proc, a one-second rescan, inferred credentials.
    pub fn from_env() -> anyhow::Result<Self> {
        let node_name = std::env::var(NODE_NAME_ENV).unwrap_or_default();
        anyhow::ensure!(
            !node_name.is_empty(),
            "{NODE_NAME_ENV} is not set (the DaemonSet sets it from spec.nodeName)"
        );
        Ok(Self {
            node_name,
            proc_root: "/proc".into(),
            rescan: Duration::from_secs(1),
            kube_config: None,
        })
    }
}

/// A network namespace, held by one process of the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetns {
    /// The process whose namespace this is (the pod's lowest PID: the sandbox, usually).
    pub pid: u32,
    /// `<proc_root>/<pid>/ns/net`.
    pub path: PathBuf,
    /// The namespace file's device and inode: the same for every process in the namespace.
    pub id: (u64, u64),
}

/// Watch this node's pods until `events` is closed. Watch errors (the API server restarting, an expired
/// resource version) are logged and retried with backoff ([`retry_backoff`]); every (re)list ends with [`SourceEvent::Synced`].
pub async fn watch(config: KubeSource, events: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
    let client = match config.kube_config.clone() {
        Some(kube_config) => Client::try_from(kube_config),
        None => Client::try_default().await,
    }
    .context("connecting to the Kubernetes API")?;
    let pods: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={}", config.node_name);
    let mut stream = watcher(pods, watcher::Config::default().fields(&selector))
        .backoff(retry_backoff())
        .boxed();
    let mut tick = tokio::time::interval(config.rescan);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = State::new(config.proc_root);
    tracing::info!("watching pods with {selector}");

    loop {
        let mut ended = false;
        let out = tokio::select! {
            () = events.closed() => return Ok(()),
            event = stream.next() => {
                let mut out = Vec::new();
                let mut next = event;
                // The events already received are applied first, then one /proc scan looks for the
                // namespaces of all their waiting pods: a scan reads every process's cgroup, and one per pod
                // made a burst of pods wait on each other (`cargo xtask bench --only kubernetes` beside
                // 1,500 idle processes: median 1.7 s, p99 4.1 s; batched, 0.6 s and 2.7 s).
                for _ in 0..BATCH {
                    match next {
                        Some(Ok(event)) => out.extend(state.on_event(event)),
                        Some(Err(e)) => tracing::warn!("pod watch: {e}; retrying"),
                        None => {
                            ended = true;
                            break;
                        }
                    }
                    match stream.next().now_or_never() {
                        Some(event) => next = event,
                        None => break,
                    }
                }
                out.extend(state.look_for_touched());
                out
            },
            _ = tick.tick() => state.rescan(),
        };
        for event in out {
            if events.send(event).await.is_err() {
                return Ok(());
            }
        }
        anyhow::ensure!(!ended, "the pod watch ended");
    }
}

/// At most this many watch events are applied before the waiting pods among them are looked for.
const BATCH: usize = 256;

/// The watch's retry delays after an error: from a quarter second, doubling, at most [`RETRY_MAX`] apart,
/// with jitter (so the agents of many nodes do not come back at one instant); back to the start after any
/// event. kube-runtime's default grows to 30 s, and through an API server outage it does: the watch that
/// expired on the server's return (410 Gone) then waited up to 30 s more for its relist, and changes made
/// meanwhile as long (tests/tests/kubernetes.rs, the API server down for 20 s).
fn retry_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// The longest wait between two attempts to list or watch.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A pod that qualifies for capture.
struct Tracked {
    uid: String,
    flags: Vec<String>,
    /// `None` while its namespace has not been found (then the agent has not been told about it).
    netns: Option<PodNetns>,
}

/// What the source knows; turns watch events and rescans into [`SourceEvent`]s.
struct State {
    proc_root: PathBuf,
    pods: BTreeMap<String, Tracked>,
    /// The ids seen during a (re)list in progress.
    listing: Option<BTreeSet<String>>,
    /// Waiting pods (no namespace yet) with a watch event since the last scan: the next one looks for them
    /// ([`State::look_for_touched`]). Pods that only wait are left to the rescan.
    touched: BTreeSet<String>,
}

impl State {
    fn new(proc_root: PathBuf) -> Self {
        Self {
            proc_root,
            pods: BTreeMap::new(),
            listing: None,
            touched: BTreeSet::new(),
        }
    }

    fn on_event(&mut self, event: watcher::Event<Pod>) -> Vec<SourceEvent> {
        match event {
            watcher::Event::Init => {
                self.listing = Some(BTreeSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => self.apply(&pod),
            watcher::Event::Delete(pod) => {
                let id = pod_id(&pod);
                self.touched.remove(&id);
                self.pods
                    .remove(&id)
                    .map(|_| SourceEvent::Remove(id))
                    .into_iter()
                    .collect()
            }
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                // Pods gone while we were not watching: the agent releases them on `Synced`.
                self.pods.retain(|id, _| listed.contains(id));
                self.touched.retain(|id| listed.contains(id));
                // The listed pods found now are upserted before the list is declared complete.
                let mut out = self.look_for_touched();
                out.push(SourceEvent::Synced(listed.into_iter().collect()));
                out
            }
        }
    }

    fn apply(&mut self, pod: &Pod) -> Vec<SourceEvent> {
        let id = pod_id(pod);
        let flags = match annotations::decide(pod) {
            Ok(flags) => flags,
            Err(skip) => {
                tracing::debug!("{id}: not captured: {skip}");
                self.touched.remove(&id);
                return self
                    .pods
                    .remove(&id)
                    .map(|_| SourceEvent::Remove(id))
                    .into_iter()
                    .collect();
            }
        };
        if let Some(listing) = &mut self.listing {
            listing.insert(id.clone());
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let tracked = self.pods.entry(id.clone()).or_insert_with(|| Tracked {
            uid: uid.clone(),
            flags: Vec::new(),
            netns: None,
        });
        if tracked.uid != uid {
            // The same name, a new pod (a StatefulSet's replacement): a new sandbox to find.
            *tracked = Tracked {
                uid,
                flags: Vec::new(),
                netns: None,
            };
        }
        let changed = tracked.flags != flags;
        tracked.flags = flags;
        match &tracked.netns {
            Some(netns) if changed => vec![upsert(&id, tracked, netns)],
            Some(_) => Vec::new(),
            None => {
                self.touched.insert(id);
                Vec::new()
            }
        }
    }

    /// Looks for the namespaces of the touched waiting pods, in one scan.
    fn look_for_touched(&mut self) -> Vec<SourceEvent> {
        let touched: Vec<String> = std::mem::take(&mut self.touched).into_iter().collect();
        self.find(&touched)
    }

    /// Look for the namespaces of the waiting pods, and check that the captured ones still have theirs.
    fn rescan(&mut self) -> Vec<SourceEvent> {
        // Touched pods are waiting ones too: this scan looks for them.
        self.touched.clear();
        let mut waiting = Vec::new();
        for (id, tracked) in &mut self.pods {
            let alive = tracked.netns.as_ref().is_some_and(|n| netns_id(&n.path) == Some(n.id));
            if !alive {
                if tracked.netns.take().is_some() {
                    tracing::info!("{id}: its namespace holder is gone; looking for the pod's namespace again");
                }
                waiting.push(id.clone());
            }
        }
        self.find(&waiting)
    }

    /// One /proc scan for these pods; an upsert for each one found.
    fn find(&mut self, ids: &[String]) -> Vec<SourceEvent> {
        if ids.is_empty() {
            return Vec::new();
        }
        let uids: BTreeSet<&str> = ids
            .iter()
            .filter_map(|id| self.pods.get(id))
            .map(|t| t.uid.as_str())
            .collect();
        let found = find_pod_netns(&self.proc_root, &uids);
        let mut out = Vec::new();
        for id in ids {
            let Some(tracked) = self.pods.get_mut(id) else { continue };
            if let Some(netns) = found.get(&tracked.uid) {
                tracing::info!("{id}: namespace {} (pid {})", netns.path.display(), netns.pid);
                out.push(upsert(id, tracked, netns));
                tracked.netns = Some(netns.clone());
            }
        }
        out
    }
}

fn upsert(id: &str, tracked: &Tracked, netns: &PodNetns) -> SourceEvent {
    SourceEvent::Upsert(PodSpec {
        id: id.to_string(),
        netns: netns.path.clone(),
        flags: tracked.flags.clone(),
    })
}

/// `namespace/name`, the id the agent knows a Kubernetes pod by.
pub fn pod_id(pod: &Pod) -> String {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    format!("{namespace}/{}", pod.metadata.name.as_deref().unwrap_or(""))
}

/// The network namespace of each pod (by UID) that has a process under `proc_root`: the lowest PID whose
/// `cgroup` names the pod. A namespace that is PID 1's (the host's, with `hostPID`) is never returned.
pub fn find_pod_netns(proc_root: &Path, uids: &BTreeSet<&str>) -> BTreeMap<String, PodNetns> {
    let mut found: BTreeMap<String, PodNetns> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return found;
    };
    let host = netns_id(&proc_root.join("1/ns/net"));
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        // Processes come and go while we read: a missing file just means this one is gone.
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let Some(uid) = cgroup
            .lines()
            .find_map(pod_uid_of_cgroup_line)
            .filter(|u| uids.contains(u.as_str()))
        else {
            continue;
        };
        if found.contains_key(&uid) {
            continue;
        }
        let path = dir.join("ns/net");
        let Some(id) = netns_id(&path) else { continue };
        if Some(id) == host {
            tracing::warn!("pod {uid}: pid {pid} is in the host's network namespace; not capturing it");
            continue;
        }
        found.insert(uid, PodNetns { pid, path, id });
    }
    found
}

/// The pod UID in one line of /proc/PID/cgroup (v2 `0::/path`, or a v1 `N:controllers:/path`), for the
/// kubelet's two cgroup drivers: systemd (`…/kubepods-burstable-pod<UID with _>.slice/…`) and cgroupfs
/// (`…/kubepods/burstable/pod<UID>/…`).
pub fn pod_uid_of_cgroup_line(line: &str) -> Option<String> {
    let path = line.splitn(3, ':').nth(2)?;
    path.split('/').find_map(|part| {
        let uid = match part.strip_suffix(".slice") {
            Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
            None => part.strip_prefix("pod")?.to_string(),
        };
        is_uid(&uid).then_some(uid)
    })
}

/// A Kubernetes UID: 36 characters of hex digits and dashes (8-4-4-4-12).
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The (device, inode) of a namespace file, following the /proc symlink.
fn netns_id(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6b1f6f3c-2a4e-4d6e-9f0a-1c2b3d4e5f60";

    #[test]
    fn cgroup_lines_of_both_drivers() {
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6b1f6f3c_2a4e_4d6e_9f0a_1c2b3d4e5f60.slice/cri-containerd-0123abcd.scope";
        let guaranteed = "0::/kubepods.slice/kubepods-pod6b1f6f3c_2a4e_4d6e_9f0a_1c2b3d4e5f60.slice/crio-0123.scope";
        let cgroupfs = "0::/kubepods/besteffort/pod6b1f6f3c-2a4e-4d6e-9f0a-1c2b3d4e5f60/0123abcd";
        let v1 = "4:memory:/kubepods/pod6b1f6f3c-2a4e-4d6e-9f0a-1c2b3d4e5f60/0123abcd";
        for line in [systemd, guaranteed, cgroupfs, v1] {
            assert_eq!(pod_uid_of_cgroup_line(line).as_deref(), Some(UID), "{line}");
        }
        for line in [
            "0::/init.scope",
            "0::/system.slice/containerd.service",
            "0::/kubepods.slice/kubepods-burstable.slice",
            "0::/podcast/x",
        ] {
            assert_eq!(pod_uid_of_cgroup_line(line), None, "{line}");
        }
    }
}
