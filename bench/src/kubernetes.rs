//! Pods from the Kubernetes API to capture: a real API server (testkit's kube-apiserver v1.20.2 and etcd),
//! the agent as the manifest's service account, and many injected pods created at once on its node, then
//! run by the test kubelet one after another. The time per pod is from the moment its Running status was
//! written to the agent's `registered` log line for it: the watch event's trip, the /proc scan that finds
//! the pod's namespace, and the registration.

use std::time::Duration;

use anyhow::Result;
use testkit::kube::{CgroupDriver, Cluster, Kubelet, manifest_objects};

use crate::Progress;

/// How long all of them may take to be captured.
const WAIT: Duration = Duration::from_secs(300);
/// Planned seconds for the API server to start and each pod to be made (for the time-left estimate only).
pub const START_SECONDS: f64 = 10.0;
pub const POD_SECONDS: f64 = 0.05;

/// The time from Running to captured of each of `pods` pods created at once, in milliseconds, in pod order.
pub fn measure(pods: usize, progress: &mut Progress) -> Result<Vec<f64>> {
    let cluster = Cluster::new("bench", manifest_objects());
    let mut kubelet = Kubelet::new(&cluster.node, &cluster.cgroup, CgroupDriver::Cgroupfs);
    let agent = cluster.agent_on("bench", &cluster.api);
    let times: Vec<f64> = cluster
        .burst(&agent, &mut kubelet, pods, WAIT)
        .into_iter()
        .map(|seconds| seconds * 1000.0)
        .collect();
    progress.step(
        START_SECONDS + pods as f64 * POD_SECONDS,
        &format!("kubernetes: {pods} pods created at once, all captured"),
    );
    Ok(times)
}
