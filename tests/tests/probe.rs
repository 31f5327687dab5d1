//! The harness's client and listener processes (`capture-probe`) on their own, without capture: every
//! kind of connection the capture tests make arrives, and reports what it should.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use testkit::{Cgroup, Connect, Listeners, POD_V4, POD_V6, Pod, REMOTE_V4, REMOTE_V6, connect_as, connect_with, sa};

const APP: (u32, u32) = (1000, 1000);

#[test]
fn probe_connects_every_way_and_listeners_report_it() {
    let pod = Pod::new("probe");
    let cgroup = Cgroup::new("probe");
    let remote = Listeners::start_with_udp(
        &pod.remote,
        None,
        None,
        &[
            sa(REMOTE_V4, 8080),
            sa(REMOTE_V6, 8080),
            sa(Ipv6Addr::UNSPECIFIED, 8081),
        ],
        &[sa(REMOTE_V4, 5353), sa(REMOTE_V6, 5353)],
    );
    let local = Listeners::start(&pod.pod, Some(&cgroup), Some(APP), &[sa(Ipv4Addr::LOCALHOST, 7001)]);

    // Plain TCP, IPv4 and IPv6, as the app user, from inside the cgroup.
    for dst in [sa(REMOTE_V4, 8080), sa(REMOTE_V6, 8080)] {
        let from = connect_as(&pod.pod, Some(&cgroup), APP, dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        let got = remote.next().unwrap_or_else(|| panic!("{dst} was not accepted"));
        assert_eq!((got.listener, got.peer), (8080, from), "{dst}");
        assert_eq!(
            from.ip(),
            if dst.is_ipv6() {
                IpAddr::from(POD_V6)
            } else {
                POD_V4.into()
            }
        );
    }

    // IPv4-mapped on an AF_INET6 socket, to a dual-stack listener.
    let mapped = sa(REMOTE_V4.to_ipv6_mapped(), 8081);
    let from = connect_as(&pod.pod, None, APP, mapped).expect("IPv4-mapped connect");
    assert_eq!(from, sa(POD_V4.to_ipv6_mapped(), from.port()));
    let got = remote.next().expect("the IPv4-mapped connection was not accepted");
    assert_eq!((got.listener, got.peer), (8081, from));

    // TCP Fast Open (sendto with MSG_FASTOPEN, no connect).
    let fastopen = Connect {
        fastopen: true,
        ..Connect::default()
    };
    let from = connect_with(&pod.pod, None, APP, sa(REMOTE_V4, 8080), fastopen).expect("fast open");
    assert_eq!(remote.next().map(|a| (a.listener, a.peer)), Some((8080, from)));

    // UDP: the datagram is reported and echoed.
    let udp = Connect {
        udp: true,
        ..Connect::default()
    };
    for dst in [sa(REMOTE_V4, 5353), sa(REMOTE_V6, 5353)] {
        let from = connect_with(&pod.pod, None, APP, dst, udp).unwrap_or_else(|e| panic!("udp {dst}: {e}"));
        let got = remote
            .next_datagram()
            .unwrap_or_else(|| panic!("udp {dst} was not received"));
        assert_eq!((got.listener, got.peer), (5353, from), "udp {dst}");
    }

    // Bound to a chosen source (the proxy's passthrough address), to a listener running as the app user.
    let bind = Connect {
        bind: Some(Ipv4Addr::new(127, 0, 0, 6).into()),
        ..Connect::default()
    };
    let from = connect_with(&pod.pod, None, (0, 0), sa(Ipv4Addr::LOCALHOST, 7001), bind).expect("bound connect");
    assert_eq!(from.ip(), IpAddr::from([127, 0, 0, 6]));
    let got = local.next().expect("the bound connection was not accepted");
    assert_eq!((got.listener, got.peer), (7001, from));

    // Failures come back as errors of the right kind, not as panics.
    let err = connect_as(&pod.pod, None, APP, sa(REMOTE_V4, 9)).expect_err("nothing listens on 9");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(err.to_string().starts_with("connect: "), "{err}");

    assert!(remote.drain().is_empty() && remote.drain_datagrams().is_empty());
    assert!(local.drain().is_empty());
}
