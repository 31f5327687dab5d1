//! The whole kernel toolchain, proven end to end: the programs embedded in the `capture` binary load and
//! attach to a child cgroup (`capture --backend ebpf --cgroup`), and judge exactly the connects made by
//! processes inside that cgroup, as the namespace's counters in the pinned maps show.

use std::net::Ipv4Addr;

use aya::maps::{Map, MapData, PerCpuHashMap};
use capture_common::{
    counters::{COUNTERS, Counter, NetnsCounters},
    maps::names,
};
use testkit::{BpfPins, Cgroup, INJECTOR_DEFAULT_FLAGS, Listeners, Netns, capture, connect_as, sa};

const PORT: u16 = 7000;
const CONNECTS_IN_CGROUP: u64 = 3;

/// Counter totals (over CPUs) of every namespace registered in `pins`.
fn counters(pins: &BpfPins) -> Vec<(u64, [u64; COUNTERS])> {
    let path = pins.path().join(names::NETNS_COUNTERS);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let map: PerCpuHashMap<_, u64, NetnsCounters> =
        PerCpuHashMap::try_from(Map::from_map_data(data).expect("NETNS_COUNTERS")).expect("a per-CPU hash map");
    map.iter()
        .map(|entry| {
            let (netns, per_cpu) = entry.expect("read NETNS_COUNTERS");
            (
                netns,
                Counter::ALL.map(|c| per_cpu.iter().map(|n| n.0[c.index()]).sum()),
            )
        })
        .collect()
}

#[test]
fn embedded_programs_judge_connects_in_their_cgroup_only() {
    let ns = Netns::new("bpf");
    let cgroup = Cgroup::new("bpf");
    let pins = BpfPins::new("bpf");
    let cgroup_arg = cgroup.path().display().to_string();
    let pin_arg = pins.path().display().to_string();
    let mut args = vec!["--backend", "ebpf", "--cgroup", &cgroup_arg, "--pin-dir", &pin_arg];
    args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    let out = capture(&ns, &args);
    assert!(
        out.status.success(),
        "capture --backend ebpf failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(counters(&pins).len(), 1, "one namespace registered");

    // To 127.0.0.1 every connection passes (istio's `-d 127.0.0.1/32 -j RETURN`), judged or not.
    let dst = sa(Ipv4Addr::LOCALHOST, PORT);
    let listeners = Listeners::start(&ns, None, None, &[dst]);
    // A connect from outside the cgroup is not seen.
    connect_as(&ns, None, (0, 0), dst).expect("connect outside the cgroup");
    for _ in 0..CONNECTS_IN_CGROUP {
        connect_as(&ns, Some(&cgroup), (0, 0), dst).expect("connect inside the cgroup");
    }
    let accepted = (0..=CONNECTS_IN_CGROUP).filter_map(|_| listeners.next()).count() as u64;
    assert_eq!(
        accepted,
        CONNECTS_IN_CGROUP + 1,
        "every connection reached the listener"
    );

    let [(_, counted)] = counters(&pins)[..] else {
        panic!("not exactly one namespace registered");
    };
    assert_eq!(
        (counted[Counter::Redirected.index()], counted[Counter::Passed.index()]),
        (0, CONNECTS_IN_CGROUP),
        "(redirected, passed) counted for the connects in the cgroup"
    );

    let mut clean = vec!["clean", "--backend", "ebpf", "--pin-dir", &pin_arg];
    clean.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    let out = capture(&ns, &clean);
    assert!(
        out.status.success(),
        "capture clean failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.path().exists(), "the last clean leaves no pins");
}
