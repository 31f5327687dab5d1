//! Original destinations for as long as each connection lives, for any number of connections: the eBPF
//! backend keeps a connection's original destination with its sockets, and in a node-wide map only for the
//! moment of the handshake. So neither many connections held open nor a sidecar that stops accepting can
//! take another connection's original destination away, and nothing is left once they close.
//!
//! Each pod runs `capture-probe hold` (app and sidecar in one process, in the pod's namespace and the
//! capture cgroup): it connects N times to N different destinations, all redirected to its own sidecar
//! listener, accepts, and compares each `SO_ORIGINAL_DST` with where that connection was going.

use aya::maps::{HashMap, LpmTrie, Map, MapData};
use capture_common::maps::{CidrKeyData, ConnKey, OrigDst, PodConfig, SetKey, names};
use testkit::{
    BpfPins, Cgroup, INJECTOR_DEFAULT_FLAGS, Pod, capture,
    hold::{Checked, HeldPod},
    sa,
};

const APP: (u32, u32) = (1000, 1000);

/// More than the node-wide maps' 65,536 entries; smaller where the tests run slower (`time_scale`), so a
/// test stays within minutes there.
fn scaled(n: u32) -> u32 {
    n / testkit::time_scale().pow(2)
}

/// A pod registered with the injector's flags on the shared cgroup and pins, ready for many connections:
/// a listen backlog and local ports enough.
fn registered_pod(tag: &str, cgroup: &Cgroup, pins: &BpfPins) -> Pod {
    let pod = Pod::new(tag);
    testkit::run(pod.pod.command("sysctl").args([
        "-qw",
        "net.core.somaxconn=300000",
        "net.ipv4.ip_local_port_range=1024 65000",
    ]));
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let mut args = vec!["--backend", "ebpf", "--cgroup", &cg, "--pin-dir", &pin];
    args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    let out = capture(&pod.pod, &args);
    assert!(
        out.status.success(),
        "apply in {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pod
}

/// App and sidecar in `pod` for up to `capacity` connections: the sidecar on 127.0.0.1:15001, connection
/// `i` to 10.`net`.0.0 + `i` port 8080.
fn hold(pod: &Pod, cgroup: &Cgroup, net: u8, capacity: u32) -> HeldPod {
    HeldPod::start(
        &pod.pod,
        cgroup,
        APP,
        sa([127, 0, 0, 1], 15001),
        sa([10, net, 0, 0], 8080),
        capacity,
    )
}

fn all_right(n: u32) -> Checked {
    Checked {
        checked: n,
        right: n,
        wrong: 0,
        none: 0,
    }
}

fn open(pins: &BpfPins, name: &str) -> Map {
    let data = MapData::from_pin(pins.path().join(name)).unwrap_or_else(|e| panic!("open {name}: {e}"));
    Map::from_map_data(data).unwrap()
}

/// Entries of the maps a connection could leave something in, and of those it must not change.
#[derive(Debug, PartialEq, Eq)]
struct Entries {
    handshakes: usize,
    config: usize,
    sets: usize,
    cidrs: usize,
}

fn entries(pins: &BpfPins) -> Entries {
    let handshakes: HashMap<_, ConnKey, OrigDst> = open(pins, names::ORIG_BY_ADDR).try_into().unwrap();
    let config: HashMap<_, u64, PodConfig> = open(pins, names::CONFIG).try_into().unwrap();
    let sets: HashMap<_, SetKey, u8> = open(pins, names::SETS).try_into().unwrap();
    let cidrs: LpmTrie<_, CidrKeyData, u8> = open(pins, names::CIDRS).try_into().unwrap();
    Entries {
        handshakes: handshakes.keys().count(),
        config: config.keys().count(),
        sets: sets.keys().count(),
        cidrs: cidrs.keys().count(),
    }
}

/// `pods` pods share `total` connections held open at once: each gets its own original destination, again
/// when asked later, a new connection meanwhile too; no node-wide entry stays for a held connection, and
/// every map is back to where it was once they close.
fn hold_open(tag: &str, pods: u8, total: u32) {
    let cgroup = Cgroup::new(tag);
    let pins = BpfPins::new(tag);
    let pods: Vec<Pod> = (0..pods)
        .map(|k| registered_pod(&format!("{tag}{k}"), &cgroup, &pins))
        .collect();
    let baseline = entries(&pins);
    assert_eq!(baseline.handshakes, 0);
    let per_pod = total / pods.len() as u32;
    let mut holds: Vec<HeldPod> = pods
        .iter()
        .zip(64u8..)
        .map(|(pod, net)| hold(pod, &cgroup, net, per_pod + 100))
        .collect();
    for h in &mut holds {
        h.connect(per_pod);
    }
    for h in &mut holds {
        assert_eq!(h.accept(), all_right(per_pod), "the held connections, as accepted");
    }
    // Held open, accepted: nothing of theirs is left in the node-wide map.
    assert_eq!(entries(&pins), baseline, "while {total} connections are held open");
    for h in &mut holds {
        h.connect(100);
        assert_eq!(h.accept(), all_right(100), "new connections while {total} are held");
        assert_eq!(
            h.recheck(),
            all_right(per_pod + 100),
            "every held connection, asked again"
        );
    }
    for h in holds {
        h.close();
    }
    assert_eq!(entries(&pins), baseline, "after every connection closed");
}

#[test]
fn a_hundred_thousand_connections_held_open_in_one_pod_keep_their_original_destinations() {
    hold_open("held1", 1, scaled(100_000));
}

#[test]
fn a_hundred_thousand_connections_held_open_over_ten_pods_keep_their_original_destinations() {
    hold_open("held10", 10, scaled(100_000));
}

#[test]
fn a_sidecar_that_does_not_accept_takes_no_original_destination_from_another_pod() {
    let cgroup = Cgroup::new("pend");
    let pins = BpfPins::new("pend");
    let (stuck, working) = (
        registered_pod("pend-a", &cgroup, &pins),
        registered_pod("pend-b", &cgroup, &pins),
    );
    let baseline = entries(&pins);
    let pending = scaled(70_000);
    let mut stuck = hold(&stuck, &cgroup, 64, pending);
    let mut working = hold(&working, &cgroup, 96, 2000);
    // The working pod's connections wait for their sidecar while more than the node-wide map holds pile
    // up, unaccepted, at the stuck one; then more of its own.
    working.connect(1000);
    stuck.connect(pending);
    working.connect(1000);
    assert_eq!(
        working.accept(),
        all_right(2000),
        "the working pod, after {pending} connections piled up at the other"
    );
    assert_eq!(
        stuck.accept(),
        all_right(pending),
        "the stuck sidecar's connections, accepted at last"
    );
    assert_eq!(entries(&pins), baseline, "with every connection accepted");
    stuck.close();
    working.close();
    assert_eq!(entries(&pins), baseline, "after every connection closed");
}

#[test]
fn a_handshake_that_fails_leaves_no_entry() {
    // No sidecar listening: every captured connection is refused at the SYN, and the entry its
    // TCP_CONNECT_CB made goes with the failed handshake instead of waiting in the map for eviction (the old
    // code left all 20).
    let cgroup = Cgroup::new("refused");
    let pins = BpfPins::new("refused");
    let pod = registered_pod("refused", &cgroup, &pins);
    let baseline = entries(&pins);
    for i in 0..20u8 {
        let dst = sa([10, 64, 0, i], 8080);
        let refused = testkit::connect_as(&pod.pod, Some(&cgroup), APP, dst);
        assert!(refused.is_err(), "connection to {dst} with no sidecar: {refused:?}");
    }
    assert_eq!(entries(&pins), baseline, "after 20 refused connections");
}

#[test]
fn a_socket_connected_again_after_a_failed_redirect_leaves_no_entry() {
    // The first connect is redirected and refused (no sidecar), so the socket keeps that original
    // destination; the same socket then connects to a local app, which is not redirected. That handshake is
    // not one of ours and must leave nothing behind.
    let cgroup = Cgroup::new("again");
    let pins = BpfPins::new("again");
    let pod = registered_pod("again", &cgroup, &pins);
    let app = testkit::Listeners::start(&pod.pod, None, None, &[sa([127, 0, 0, 1], 8080)]);
    let baseline = entries(&pins);
    for i in 0..5u8 {
        let how = testkit::Connect {
            first: Some(sa([10, 64, 0, i], 8080)),
            ..Default::default()
        };
        testkit::connect_with(&pod.pod, Some(&cgroup), APP, sa([127, 0, 0, 1], 8080), how)
            .unwrap_or_else(|e| panic!("the second connect, to the local app: {e}"));
        assert!(app.next().is_some(), "the local app got connection {i}");
    }
    assert_eq!(entries(&pins), baseline, "after 5 sockets connected again");
}
