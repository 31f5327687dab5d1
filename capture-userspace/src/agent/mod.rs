//! `capture agent`: one long-running process per node that keeps pods captured, instead of an init
//! container per pod. Pod sources (the local control socket, Kubernetes) tell it which pods exist; it
//! registers each pod's network namespace with the eBPF backend and unregisters it when the pod goes.

pub mod annotations;
pub mod kube;

use std::path::PathBuf;

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
