//! `-i` and `-x` are split by family, as istio-iptables splits them between iptables and ip6tables: an
//! IPv4 destination (an IPv4-mapped one on an IPv6 socket included) only meets the lists' IPv4 entries,
//! and IPv6 entries — IPv4-mapped prefixes such as `::ffff:0:0/96` included — only meet IPv6 destinations.
//! Every case is pinned to the outcome istio's rules give, on IPv4-only, dual-stack and IPv6-only pods,
//! each with a plain IPv4, an IPv4-mapped and an IPv6 connection.

use std::io::ErrorKind;

use testkit::{
    POD_V4, REMOTE_V4, REMOTE_V6,
    diff::{APP, Expect, Pin, Scene, differential_after, mapped, tcp},
    sa,
};

/// The remote server's port: reaching it means the connection was not captured.
const DIRECT: u16 = 8080;
/// The outbound capture port.
const CAPTURED: u16 = 15001;

/// What istio's rules do with the three connections under one flag set, on a pod where both families
/// are captured: the IPv4 connection (plain or mapped: the same to the kernel) and the IPv6 one.
struct Row {
    flags: &'static str,
    v4: u16,
    v6: u16,
}

const ROWS: &[Row] = &[
    // -x with IPv6 prefixes, IPv4-mapped ones included, never excludes IPv4.
    Row {
        flags: "-i * -x ::/0",
        v4: CAPTURED,
        v6: DIRECT,
    },
    Row {
        flags: "-i * -x ::/1",
        v4: CAPTURED,
        v6: DIRECT,
    },
    Row {
        flags: "-i * -x ::ffff:0:0/96",
        v4: CAPTURED,
        v6: CAPTURED,
    },
    Row {
        flags: "-i * -x ::ffff:192.0.2.0/120",
        v4: CAPTURED,
        v6: CAPTURED,
    },
    Row {
        flags: "-i * -x 2001:db8::/32,::/1",
        v4: CAPTURED,
        v6: DIRECT,
    },
    // -i with IPv6 prefixes never captures IPv4.
    Row {
        flags: "-i ::/0",
        v4: DIRECT,
        v6: CAPTURED,
    },
    Row {
        flags: "-i ::ffff:192.0.2.0/120",
        v4: DIRECT,
        v6: DIRECT,
    },
    Row {
        flags: "-i ::ffff:0:0/96",
        v4: DIRECT,
        v6: DIRECT,
    },
    // Mixed lists: each family meets its own entries.
    Row {
        flags: "-i 192.0.2.0/24,2001:db8::/32 -x ::/0",
        v4: CAPTURED,
        v6: DIRECT,
    },
    Row {
        flags: "-i 192.0.2.0/24",
        v4: CAPTURED,
        v6: DIRECT,
    },
    Row {
        flags: "-i ::/0 -x 0.0.0.0/0",
        v4: DIRECT,
        v6: CAPTURED,
    },
];

/// How the pod is addressed.
#[derive(Clone, Copy, Debug)]
enum Stack {
    /// Both families, IPv6 capture off (istio's default when the first address is IPv4).
    Ipv4Only,
    /// Both families, `--dual-stack`.
    Dual,
    /// No IPv4 address but loopback: IPv6 capture on by detection, IPv4 unroutable.
    Ipv6Only,
}

fn run(stack: Stack) {
    let prepare = |scene: &Scene| {
        if let Stack::Ipv6Only = stack {
            scene
                .pod
                .pod
                .ip(&["addr", "del", &format!("{POD_V4}/24"), "dev", "eth0"]);
        }
    };
    for row in ROWS {
        let flags = match stack {
            Stack::Dual => format!("-u 1337 {} --dual-stack", row.flags),
            Stack::Ipv4Only | Stack::Ipv6Only => format!("-u 1337 {}", row.flags),
        };
        let cases = [
            tcp("IPv4", APP, sa(REMOTE_V4, DIRECT)),
            tcp("IPv4-mapped", APP, sa(mapped(REMOTE_V4.octets()), DIRECT)),
            tcp("IPv6", APP, sa(REMOTE_V6, DIRECT)),
        ];
        let v4 = match stack {
            Stack::Ipv4Only | Stack::Dual => Expect::Port(row.v4),
            // No route: iptables' NAT never sees the connection. The eBPF backend decides before routing,
            // so what it captures reaches the proxy (which cannot reach the destination either); what it
            // leaves alone fails as under iptables. The README's differences table has this row.
            Stack::Ipv6Only if row.v4 == CAPTURED => Expect::Differs {
                iptables: Pin::Failed(ErrorKind::NetworkUnreachable),
                ebpf: Pin::Port(CAPTURED),
            },
            Stack::Ipv6Only => Expect::Failed(ErrorKind::NetworkUnreachable),
        };
        let v6 = match stack {
            // IPv6 capture is off: every IPv6 connection goes where it was going.
            Stack::Ipv4Only => Expect::Port(DIRECT),
            Stack::Dual | Stack::Ipv6Only => Expect::Port(row.v6),
        };
        differential_after(
            &prepare,
            &flags,
            &cases,
            &[("IPv4", v4), ("IPv4-mapped", v4), ("IPv6", v6)],
        );
    }
}

#[test]
fn ipv4_only_pod() {
    run(Stack::Ipv4Only);
}

#[test]
fn dual_stack_pod() {
    run(Stack::Dual);
}

#[test]
fn ipv6_only_pod() {
    run(Stack::Ipv6Only);
}
