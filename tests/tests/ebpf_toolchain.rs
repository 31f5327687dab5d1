//! The whole kernel toolchain, proven end to end: the connect4 program embedded in the `capture` binary
//! loads, attaches to a child cgroup, and counts exactly the connects made inside that cgroup.

use std::{fs::File, net::Ipv4Addr};

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use capture_common::counters::Counter;
use tests::{Cgroup, Listeners, Netns, connect_as, run, sa};

const PORT: u16 = 7000;
const CONNECTS_IN_CGROUP: u64 = 3;

#[test]
fn embedded_connect4_program_counts_connects_in_its_cgroup_only() {
    let ns = Netns::new("bpf");
    let cgroup = Cgroup::new("bpf");
    let mut ebpf = Ebpf::load(capture::ebpf::PROGRAMS).expect("load the embedded object");
    let program: &mut CgroupSockAddr = ebpf
        .program_mut("capture_connect4")
        .expect("capture_connect4 is in the object")
        .try_into()
        .expect("capture_connect4 is a cgroup sock_addr program");
    program.load().expect("the verifier accepts capture_connect4");
    let cgroup_dir = File::open(cgroup.path()).expect("open the cgroup");
    // The link lives as long as `ebpf`, which is dropped before `cgroup`: detached before it is removed.
    program
        .attach(cgroup_dir, CgroupAttachMode::Single)
        .expect("attach to the child cgroup");

    let listeners = Listeners::start(&ns, &[sa(Ipv4Addr::LOCALHOST, PORT)]);
    // A connect from outside the cgroup is not seen.
    connect_as(&ns, (0, 0), sa(Ipv4Addr::LOCALHOST, PORT)).expect("connect outside the cgroup");
    for _ in 0..CONNECTS_IN_CGROUP {
        let mut cmd = ns.command("bash");
        cmd.args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{PORT}")]);
        cgroup.enter(&mut cmd);
        run(&mut cmd);
    }
    let accepted = (0..=CONNECTS_IN_CGROUP).filter_map(|_| listeners.next()).count() as u64;
    assert_eq!(
        accepted,
        CONNECTS_IN_CGROUP + 1,
        "every connection reached the listener"
    );

    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map("COUNTERS").expect("COUNTERS map")).expect("COUNTERS is a per-CPU array");
    let seen: u64 = counters
        .get(&Counter::Connect4Calls.index(), 0)
        .expect("read the counter")
        .iter()
        .sum();
    assert_eq!(seen, CONNECTS_IN_CGROUP, "connect4 calls counted in the cgroup");
}
