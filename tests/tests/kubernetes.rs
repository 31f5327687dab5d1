//! `capture agent --kubernetes` against a real API server (kube-apiserver v1.20.2 and etcd, built by
//! `cargo xtask setup`), running as the service account of `deploy/` with exactly the RBAC that the plain
//! manifest or the rendered Helm chart grants, and a test kubelet that gives pods namespaces, sandboxes in
//! the kubelet's cgroups (both drivers) and a status.
//!
//! Injected pods on this node are captured; other pods, hostNetwork pods, other nodes' pods and finished
//! pods are left alone; annotation changes, deletions and sandbox restarts are followed; the API server
//! down for 20 s, and a watch that expires on its return (410 Gone), neither release a pod that still
//! exists nor lose a change made meanwhile; and 100 pods created at once are all captured (how fast is
//! `cargo xtask bench`'s business).

use std::time::Duration;

use serde_json::json;
use testkit::{
    Agent, REMOTE_V4,
    kube::{CgroupDriver, Cluster, Kubelet, NS, captured, chart_objects, manifest_objects, pod_object},
    lands, listening, wait_until,
};

/// How long the agent may take to follow a change it can see.
const FOLLOW: Duration = Duration::from_secs(15);

/// `ids` as the captured set, for comparisons.
fn ids(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|id| format!("{NS}/{id}")).collect()
}

/// Waits until exactly `expected` are captured.
fn wait_captured(agent: &Agent, expected: &[&str], what: &str) {
    let expected = ids(expected);
    wait_until(
        what,
        FOLLOW,
        || captured(agent).into_keys().collect::<Vec<_>>() == expected,
        || format!("captured {:?}; agent log:\n{}", captured(agent).keys(), agent.log()),
    );
}

/// Where pod `name`'s app connection to the remote service goes.
fn goes(kubelet: &Kubelet, cluster: &Cluster, name: &str) -> &'static str {
    let pod = &kubelet.running(NS, name).net;
    let (sidecar, remote) = listening(pod, &cluster.cgroup);
    lands(pod, &cluster.cgroup, &sidecar, &remote)
}

/// The agent's log lines that say pod `name` was released.
fn releases(agent: &Agent, name: &str) -> usize {
    let pod = format!("pod={NS}/{name}");
    agent
        .log()
        .lines()
        .filter(|l| l.contains(&pod) && l.contains("released"))
        .count()
}

#[test]
fn injected_pods_on_this_node_are_captured_as_the_manifests_service_account_and_followed() {
    let cluster = Cluster::new("manifest", manifest_objects());
    let admin = &cluster.admin;
    let mut kubelet = Kubelet::new(&cluster.node, &cluster.cgroup, CgroupDriver::Cgroupfs);
    let mut elsewhere = Kubelet::new("node-other", &cluster.cgroup, CgroupDriver::Cgroupfs);
    cluster.create(admin, "cni-classic-sidecar", "injected", None);
    cluster.create(admin, "cni-classic-sidecar", "job", None);
    cluster.create(admin, "no-sidecar", "plain", None);
    let mut host = pod_object("cni-classic-sidecar", NS, "host", &cluster.node);
    host["spec"]["hostNetwork"] = true.into();
    admin.create_pod(&host);
    cluster.create(admin, "cni-classic-sidecar", "other-node", Some("node-other"));
    for name in ["injected", "job", "plain", "host"] {
        kubelet.run(admin, NS, name);
    }
    // On another node, but its sandbox is on this machine: only the field selector keeps it out.
    elsewhere.run(admin, NS, "other-node");

    let agent = cluster.agent_on("manifest", &cluster.api);
    wait_captured(&agent, &["injected", "job"], "the injected pods on this node captured");
    assert_eq!(goes(&kubelet, &cluster, "injected"), "sidecar");
    assert_eq!(goes(&kubelet, &cluster, "plain"), "remote", "not injected");
    assert_eq!(goes(&elsewhere, &cluster, "other-node"), "remote", "another node's pod");

    kubelet.finish(admin, NS, "job");
    wait_captured(&agent, &["injected"], "a finished pod released");

    // An annotation change: the remote's address excluded from capture, then injection turned off.
    let exclude = json!({ "metadata": { "annotations": {
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": format!("{REMOTE_V4}/32") } } });
    admin.patch_pod(NS, "injected", &exclude);
    wait_until(
        "the new exclusion applied",
        FOLLOW,
        || goes(&kubelet, &cluster, "injected") == "remote",
        || agent.log(),
    );
    let include = json!({ "metadata": { "annotations": {
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": null } } });
    admin.patch_pod(NS, "injected", &include);
    wait_until(
        "the exclusion removed",
        FOLLOW,
        || goes(&kubelet, &cluster, "injected") == "sidecar",
        || agent.log(),
    );
    assert_eq!(
        releases(&agent, "injected"),
        0,
        "a flag change is no release: {}",
        agent.log()
    );

    // The sandbox restarted: a new namespace, the same pod. Only the new one is captured.
    let old = captured(&agent)[&format!("{NS}/injected")].clone();
    let old_pid = kubelet.running(NS, "injected").pid();
    kubelet.run(admin, NS, "injected");
    let new_pid = kubelet.running(NS, "injected").pid();
    wait_until(
        "the restarted sandbox's namespace captured",
        FOLLOW,
        || {
            captured(&agent)
                .get(&format!("{NS}/injected"))
                .is_some_and(|l| l.starts_with(&format!("/proc/{new_pid}/ns/net\t")))
        },
        || format!("was {old} (pid {old_pid}): {}", agent.log()),
    );
    assert_eq!(captured(&agent).len(), 1, "{:?}", captured(&agent));
    assert_eq!(goes(&kubelet, &cluster, "injected"), "sidecar");

    kubelet.delete(admin, NS, "injected");
    wait_captured(&agent, &[], "a deleted pod released");
    let log = agent.log();
    assert!(!log.contains("forbidden") && !log.contains("Forbidden"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The chart's RBAC is enough too, and pods of the systemd cgroup driver are found.
#[test]
fn the_charts_service_account_captures_pods_of_the_systemd_cgroup_driver() {
    let cluster = Cluster::new("chart", chart_objects());
    let admin = &cluster.admin;
    let mut kubelet = Kubelet::new(&cluster.node, &cluster.cgroup, CgroupDriver::Systemd);
    cluster.create(admin, "cni-classic-sidecar", "injected", None);
    kubelet.run(admin, NS, "injected");
    let agent = cluster.agent_on("chart", &cluster.api);
    wait_captured(&agent, &["injected"], "the pod captured");
    assert_eq!(goes(&kubelet, &cluster, "injected"), "sidecar");
    kubelet.delete(admin, NS, "injected");
    wait_captured(&agent, &[], "the pod released");
}

/// The RBAC under test is exactly what the agent needs: with any one verb of the ClusterRole taken away,
/// the agent misses pods (a pod there before it started, or one created after), and says it was forbidden.
#[test]
fn every_verb_the_role_grants_is_needed() {
    let verbs: Vec<String> = serde_json::from_value(
        manifest_objects()
            .iter()
            .find(|o| o["kind"] == "ClusterRole")
            .expect("a ClusterRole")["rules"][0]["verbs"]
            .clone(),
    )
    .expect("verbs");
    assert!(!verbs.is_empty());
    for missing in &verbs {
        let mut objects = manifest_objects();
        for role in objects.iter_mut().filter(|o| o["kind"] == "ClusterRole") {
            for rule in role["rules"].as_array_mut().expect("rules") {
                rule["verbs"] = json!(verbs.iter().filter(|v| *v != missing).collect::<Vec<_>>());
            }
        }
        let tag = format!("no-{missing}");
        let cluster = Cluster::new(&tag, objects);
        let admin = &cluster.admin;
        let mut kubelet = Kubelet::new(&cluster.node, &cluster.cgroup, CgroupDriver::Cgroupfs);
        cluster.create(admin, "cni-classic-sidecar", "before", None);
        kubelet.run(admin, NS, "before");
        let agent = cluster.agent_on(&tag, &cluster.api);
        // "after" comes after the agent's first list (or its refusal).
        wait_until(
            "the agent's first list, or its refusal",
            FOLLOW,
            || agent.log().contains("forbidden") || !captured(&agent).is_empty(),
            || agent.log(),
        );
        cluster.create(admin, "cni-classic-sidecar", "after", None);
        kubelet.run(admin, NS, "after");
        std::thread::sleep(testkit::patient(FOLLOW));
        let log = agent.log();
        assert_ne!(
            captured(&agent).into_keys().collect::<Vec<_>>(),
            ids(&["after", "before"]),
            "without {missing:?} the agent still captured both pods: {missing:?} is not needed: {log}"
        );
        assert!(log.contains("forbidden"), "without {missing:?}: {log}");
    }
}

/// The agent's API server stops for 20 s (a second one on the same etcd stays up, as another
/// control-plane node would): capture of running pods is unaffected meanwhile, and what changed meanwhile
/// (a pod created, one deleted, one's annotations) is applied once it is back.
#[test]
fn the_api_server_down_for_20_seconds_changes_nothing_and_misses_nothing() {
    let mut cluster = Cluster::new("down", manifest_objects());
    let second = cluster.api.beside();
    let admin2 = second.admin();
    let mut kubelet = Kubelet::new(&cluster.node, &cluster.cgroup, CgroupDriver::Cgroupfs);
    for name in ["stays", "changes", "goes"] {
        cluster.create(&cluster.admin, "cni-classic-sidecar", name, None);
        kubelet.run(&cluster.admin, NS, name);
    }
    let agent = cluster.agent_on("down", &cluster.api);
    wait_captured(&agent, &["changes", "goes", "stays"], "the pods captured");
    let before = captured(&agent);

    cluster.api.stop();
    let down = std::time::Instant::now();
    assert_eq!(
        goes(&kubelet, &cluster, "stays"),
        "sidecar",
        "while the API server is down"
    );
    cluster.create(&admin2, "cni-classic-sidecar", "new", None);
    kubelet.run(&admin2, NS, "new");
    kubelet.delete(&admin2, NS, "goes");
    let exclude = json!({ "metadata": { "annotations": {
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": format!("{REMOTE_V4}/32") } } });
    admin2.patch_pod(NS, "changes", &exclude);
    std::thread::sleep(Duration::from_secs(20).saturating_sub(down.elapsed()));
    assert_eq!(
        goes(&kubelet, &cluster, "stays"),
        "sidecar",
        "after 20 s without the API server"
    );
    assert_eq!(
        goes(&kubelet, &cluster, "changes"),
        "sidecar",
        "the change is not seen yet"
    );
    assert_eq!(
        captured(&agent),
        before,
        "nothing changed while the API server was down"
    );

    cluster.api.start_again();
    // The watch is retried at most 5 s apart (RBAC may refuse it once while the server's caches fill) and
    // lists again on the 410 that follows: 20 s is ample. With kube-runtime's default backoff (to 30 s) this
    // took up to a minute.
    wait_until(
        "the changes made while the server was down applied",
        Duration::from_secs(20),
        || captured(&agent).into_keys().collect::<Vec<_>>() == ids(&["changes", "new", "stays"]),
        || agent.log(),
    );
    assert_eq!(
        goes(&kubelet, &cluster, "changes"),
        "remote",
        "the annotation change applied"
    );
    assert_eq!(goes(&kubelet, &cluster, "new"), "sidecar");
    assert_eq!(captured(&agent)[&format!("{NS}/stays")], before[&format!("{NS}/stays")]);
    assert_eq!(releases(&agent, "stays"), 0, "{}", agent.log());
}

/// The agent's watch expires while it is away (the restarted server's watch cache starts after the
/// agent's resource version: 410 Gone). The agent lists again, releases the pod deleted meanwhile, and
/// never releases (nor re-registers) the pods that still exist.
#[test]
fn an_expired_watch_relists_without_releasing_pods_that_still_exist() {
    let mut cluster = Cluster::new("expired", manifest_objects());
    let second = cluster.api.beside();
    let admin2 = second.admin();
    let mut kubelet = Kubelet::new(&cluster.node, &cluster.cgroup, CgroupDriver::Cgroupfs);
    for name in ["kept", "deleted"] {
        cluster.create(&cluster.admin, "cni-classic-sidecar", name, None);
        kubelet.run(&cluster.admin, NS, name);
    }
    let agent = cluster.agent_on("expired", &cluster.api);
    wait_captured(&agent, &["deleted", "kept"], "the pods captured");
    let kept = captured(&agent)[&format!("{NS}/kept")].clone();

    cluster.api.stop();
    kubelet.delete(&admin2, NS, "deleted");
    // More changes than the deletion, so the agent's resource version is well behind.
    for i in 0..5 {
        admin2.patch_pod(
            NS,
            "kept",
            &json!({ "metadata": { "labels": { "touched": i.to_string() } } }),
        );
    }
    cluster.api.start_again();
    wait_captured(&agent, &["kept"], "the pod deleted meanwhile released");
    let log = agent.log();
    assert!(
        log.contains("too old resource version") && log.contains("Expired"),
        "the watch did not expire, so this test did not test a relist: {log}"
    );
    assert_eq!(captured(&agent)[&format!("{NS}/kept")], kept, "re-registered: {log}");
    assert_eq!(releases(&agent, "kept"), 0, "{log}");
    assert_eq!(goes(&kubelet, &cluster, "kept"), "sidecar");
}

/// 100 injected pods created at once on the node, then run: each one captured, once.
#[test]
fn a_hundred_pods_created_at_once_are_all_captured() {
    const PODS: usize = 100;
    let cluster = Cluster::new("hundred", manifest_objects());
    let mut kubelet = Kubelet::new(&cluster.node, &cluster.cgroup, CgroupDriver::Cgroupfs);
    let agent = cluster.agent_on("hundred", &cluster.api);
    let times = cluster.burst(&agent, &mut kubelet, PODS, Duration::from_secs(120));
    assert_eq!(times.len(), PODS);
    let log = agent.log();
    assert_eq!(
        log.lines().filter(|l| l.contains(" registered ")).count(),
        PODS,
        "{log}"
    );
    assert_eq!(goes(&kubelet, &cluster, "burst-0"), "sidecar");
    assert_eq!(goes(&kubelet, &cluster, &format!("burst-{}", PODS - 1)), "sidecar");
}
