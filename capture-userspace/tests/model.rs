//! The outbound decision model against istio's scenario table (`docs/istio-rules.md#scenario-table`, whose row
//! numbers the comments use) and its quirks (`docs/istio-rules.md#interactions-and-gotchas`), run on the very map
//! entries the loader would write for the same flags.

use std::net::IpAddr;

use capture::{
    ebpf::entries::{EntryLookups, entries},
    flags,
    namespace::{Environment, Nameserver},
};
use capture_common::{
    addr::{self, Addr},
    maps::PodSources,
    model::{
        Conn, Proto, Rule, Verdict, accelerate, may_be_redirected, outbound, redirect_source, unkept_original_dst,
    },
};

const POD_IP: &str = "10.1.1.5";
const POD_IP6: &str = "fd00::5";
const APP: u32 = 1000;
const PROXY: u32 = 1337;
const INJECTOR: &str = "-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x '' -b * -d 15090,15021,15020";

fn ip(s: &str) -> Addr {
    match s.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => addr::from_v4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A pod: flags (as a command line; `''` is an empty value), IPv6 on or off, nameservers.
struct Pod {
    entries: capture::ebpf::entries::Entries,
    lookups: EntryLookups,
}

fn pod_with(flags_line: &str, env_vars: &[(&str, &str)], ipv6: bool, nameservers: &[&str]) -> Pod {
    let args = std::iter::once("capture")
        .chain(flags_line.split_whitespace().map(|w| if w == "''" { "" } else { w }))
        .collect::<Vec<_>>();
    let env_vars: Vec<(String, String)> = env_vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let inv = flags::parse(args, &|k| {
        if k == "ENVOY_USER" {
            return Some("capture-test-no-such-user".into());
        }
        env_vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("{flags_line}: {e}"));
    let env = Environment {
        ipv6,
        nameservers: nameservers
            .iter()
            .map(|t| Nameserver {
                addr: t.parse().unwrap(),
                text: (*t).into(),
            })
            .collect(),
        local: [POD_IP, POD_IP6, "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect(),
        ..Environment::default()
    };
    let entries = entries(&inv.config, &env, 7).unwrap();
    let lookups = EntryLookups::new(&entries);
    Pod { entries, lookups }
}

fn pod(flags_line: &str) -> Pod {
    pod_with(flags_line, &[], true, &[])
}

impl Pod {
    fn decide(&self, proto: Proto, dst: &str, dport: u16, uid: u32, gid: u32, src: Option<&str>) -> Verdict {
        let conn = Conn {
            proto,
            dst: ip(dst),
            dport,
            src: src.map_or(addr::UNSPECIFIED, ip),
            uid,
            gid,
        };
        outbound(&self.entries.config, &conn, &self.lookups)
    }

    fn tcp(&self, dst: &str, dport: u16, uid: u32) -> Verdict {
        self.decide(Proto::Tcp, dst, dport, uid, uid, None)
    }
}

use Rule::*;
use Verdict::{Pass, Redirect};

#[test]
fn scenario_table_outbound_rows() {
    let p = pod(INJECTOR);
    // 1: app → remote: 15001.
    assert_eq!(p.tcp("10.2.0.9", 80, APP), Redirect(15001, IncludeCidr));
    // 2: app → localhost: passes (c2).
    assert_eq!(p.tcp("127.0.0.1", 8080, APP), Pass(LocalNotProxyUid));
    // 3: app → own pod IP: passes (c2).
    assert_eq!(p.tcp(POD_IP, 8080, APP), Pass(LocalNotProxyUid));
    // 4/5: Envoy → remote passes (c3); Envoy → own pod IP goes to 15006 (c1).
    assert_eq!(p.tcp("10.2.0.9", 80, PROXY), Pass(ProxyUid));
    assert_eq!(p.tcp(POD_IP, 8080, PROXY), Redirect(15006, ProxyUidToLocal));
    // 6: Envoy → 127.0.0.1: passes (c1 excludes LOOP4; c3).
    assert_eq!(p.tcp("127.0.0.1", 15000, PROXY), Pass(ProxyUid));
    // 7: Envoy → 127.0.0.5: 15006 (the validator relies on it).
    assert_eq!(p.tcp("127.0.0.5", 15002, PROXY), Redirect(15006, ProxyUidToLocal));
    // 8: Envoy's passthrough from 127.0.0.6 → pod IP: passes (b).
    assert_eq!(
        p.decide(Proto::Tcp, POD_IP, 8080, PROXY, PROXY, Some("127.0.0.6")),
        Pass(Passthrough)
    );
    // 9: Envoy → own pod IP:15008: passes (c1 excludes the tunnel port; c3).
    assert_eq!(p.tcp(POD_IP, 15008, PROXY), Pass(ProxyUid));
    // 11: uid ≠ 1337 with gid 1337 → remote: passes (d3).
    assert_eq!(p.decide(Proto::Tcp, "10.2.0.9", 80, APP, 1337, None), Pass(ProxyGid));
    // 12: uid ≠ 1337, gid 1337 → own pod IP: c2 wins before d1.
    assert_eq!(
        p.decide(Proto::Tcp, POD_IP, 80, APP, 1337, None),
        Pass(LocalNotProxyUid)
    );
    // 13: UDP that is not DNS: passes at j.
    assert_eq!(
        p.decide(Proto::Udp, "10.2.0.9", 9999, APP, APP, None),
        Pass(IncludeCidr)
    );
}

#[test]
fn ipv6_and_ipv4_mapped_destinations() {
    let p = pod(INJECTOR);
    assert_eq!(p.tcp("2001:db8::9", 80, APP), Redirect(15001, IncludeCidr));
    assert_eq!(p.tcp("::1", 80, APP), Pass(LocalNotProxyUid));
    assert_eq!(
        p.tcp("::ffff:10.2.0.9", 80, APP),
        Redirect(15001, IncludeCidr),
        "mapped is IPv4"
    );
    assert_eq!(p.tcp("::ffff:127.0.0.1", 80, APP), Pass(LocalNotProxyUid));
    assert_eq!(
        p.decide(Proto::Tcp, POD_IP6, 80, PROXY, PROXY, Some("::6")),
        Pass(Passthrough)
    );
    let no_v6 = pod_with(INJECTOR, &[], false, &[]);
    assert_eq!(
        no_v6.tcp("2001:db8::9", 80, APP),
        Pass(FamilyOff),
        "IPv6 off: as istio without ip6tables rules"
    );
    assert_eq!(
        no_v6.tcp("::ffff:10.2.0.9", 80, APP),
        Redirect(15001, IncludeCidr),
        "mapped is still IPv4"
    );
}

#[test]
fn exclusions_and_includes_in_istios_order() {
    // -o beats everything, the proxy→pod IP redirect included.
    let p = pod("-u 1337 -i * -o 8080");
    assert_eq!(p.tcp("10.2.0.9", 8080, APP), Pass(OutboundExcludePort));
    assert_eq!(p.tcp(POD_IP, 8080, PROXY), Pass(OutboundExcludePort));
    assert_eq!(
        p.decide(Proto::Udp, "10.2.0.9", 8080, APP, APP, None),
        Pass(OutboundExcludePort)
    );
    // -x is applied even with an explicit -i, and before it.
    let p = pod("-u 1337 -i 10.0.0.0/8 -x 10.2.0.0/16");
    assert_eq!(p.tcp("10.2.0.9", 80, APP), Pass(ExcludeCidr));
    assert_eq!(p.tcp("10.3.0.9", 80, APP), Redirect(15001, IncludeCidr));
    assert_eq!(p.tcp("11.0.0.1", 80, APP), Pass(NoMatch));
    // A wider -x than -i still wins (no longest-prefix shortcut).
    let p = pod("-u 1337 -i 10.2.0.0/16 -x 10.0.0.0/8");
    assert_eq!(p.tcp("10.2.0.9", 80, APP), Pass(ExcludeCidr));
    // -x does not stop the proxy→pod-IP redirect.
    let p = pod(&format!("-u 1337 -i * -x {POD_IP}/32"));
    assert_eq!(p.tcp(POD_IP, 80, PROXY), Redirect(15006, ProxyUidToLocal));
    // -q without -i captures those ports anywhere not excluded; TCP only.
    let p = pod("-u 1337 -q 32000 -x 10.9.0.0/16");
    assert_eq!(p.tcp("11.0.0.1", 32000, APP), Redirect(15001, OutboundIncludePort));
    assert_eq!(p.tcp("10.9.0.1", 32000, APP), Pass(ExcludeCidr));
    assert_eq!(p.tcp("11.0.0.1", 32001, APP), Pass(NoMatch));
    assert_eq!(p.decide(Proto::Udp, "11.0.0.1", 32000, APP, APP, None), Pass(NoMatch));
    // -i lists only one family: the other is not captured.
    let p = pod("-u 1337 -i 10.0.0.0/8");
    assert_eq!(p.tcp("2001:db8::9", 80, APP), Pass(NoMatch));
}

#[test]
fn multiple_proxy_uids_keep_istios_ordering_quirk() {
    // With -u 3,4 the first uid's c2 (other local traffic passes) catches uid 4 before its c1.
    let p = pod("-u 3,4 -g 1,2 -i *");
    assert_eq!(
        p.decide(Proto::Tcp, POD_IP, 80, 3, 3, None),
        Redirect(15006, ProxyUidToLocal)
    );
    assert_eq!(p.decide(Proto::Tcp, POD_IP, 80, 4, 4, None), Pass(LocalNotProxyUid));
    assert_eq!(p.decide(Proto::Tcp, "10.2.0.9", 80, 4, 4, None), Pass(ProxyUid));
    assert_eq!(p.decide(Proto::Tcp, "10.2.0.9", 80, 9, 2, None), Pass(ProxyGid));
    assert_eq!(
        p.decide(Proto::Tcp, "10.2.0.9", 80, 9, 9, None),
        Redirect(15001, IncludeCidr)
    );
}

#[test]
fn loopback_include_and_loopback_cidr() {
    // A loopback CIDR in -i removes c2/d2: local app traffic goes on down the chain.
    let p = pod("-u 1337 -i 127.1.2.3/32");
    assert_eq!(p.tcp("127.1.2.3", 80, APP), Redirect(15001, IncludeCidr));
    assert_eq!(p.tcp("127.0.0.1", 80, APP), Pass(Loopback));
    assert_eq!(p.tcp(POD_IP, 80, APP), Pass(NoMatch));
    // ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR=127.0.0.1/8 widens "localhost" for c1 and g.
    let p = pod_with(
        "-u 1337 -i *",
        &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")],
        true,
        &[],
    );
    assert_eq!(p.tcp("127.0.0.5", 15002, PROXY), Pass(ProxyUid));
    let narrow = pod("-u 1337 -i *");
    assert_eq!(narrow.tcp("127.0.0.5", 15002, PROXY), Redirect(15006, ProxyUidToLocal));
}

#[test]
fn owner_groups() {
    let only = pod_with("-u 1337 -i *", &[("ISTIO_OUTBOUND_OWNER_GROUPS", "100,200")], true, &[]);
    assert_eq!(
        only.decide(Proto::Tcp, "10.2.0.9", 80, APP, 100, None),
        Redirect(15001, IncludeCidr)
    );
    assert_eq!(
        only.decide(Proto::Tcp, "10.2.0.9", 80, APP, 300, None),
        Pass(OwnerGroup)
    );
    let except = pod_with(
        "-u 1337 -i *",
        &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "300")],
        true,
        &[],
    );
    assert_eq!(
        except.decide(Proto::Tcp, "10.2.0.9", 80, APP, 300, None),
        Pass(OwnerGroup)
    );
    assert_eq!(
        except.decide(Proto::Tcp, "10.2.0.9", 80, APP, 100, None),
        Redirect(15001, IncludeCidr)
    );
}

#[test]
fn dns_capture_order() {
    let p = pod_with(
        "-u 1337 -i * -x 10.96.0.0/12 --redirect-dns",
        &[],
        true,
        &["10.96.0.10"],
    );
    // DNS to the listed server goes to 15053 before the -x exclusion, over UDP and TCP.
    assert_eq!(
        p.decide(Proto::Udp, "10.96.0.10", 53, APP, APP, None),
        Redirect(15053, Dns)
    );
    assert_eq!(p.tcp("10.96.0.10", 53, APP), Redirect(15053, Dns));
    // Another server: not DNS-captured; UDP passes, TCP falls to -i.
    assert_eq!(p.decide(Proto::Udp, "10.2.0.9", 53, APP, APP, None), Pass(IncludeCidr));
    // The proxy's own DNS passes.
    assert_eq!(
        p.decide(Proto::Udp, "10.96.0.10", 53, PROXY, PROXY, None),
        Pass(ProxyUid)
    );
    // In DNS mode, c1 spares port 53 and c2 only lets TCP other than 53 pass.
    assert_eq!(p.tcp(POD_IP, 53, PROXY), Pass(ProxyUid));
    assert_eq!(
        p.tcp(POD_IP, 53, APP),
        Redirect(15001, IncludeCidr),
        "the edge case of docs/istio-rules.md#dns"
    );
    // -o 53 disables it.
    let p = pod_with("-u 1337 -i * -o 53 --redirect-dns --capture-all-dns", &[], true, &[]);
    assert_eq!(
        p.decide(Proto::Udp, "10.2.0.9", 53, APP, APP, None),
        Pass(OutboundExcludePort)
    );
    // capture-all catches any server; no nameserver and no capture-all turns DNS off.
    let p = pod_with("-u 1337 --redirect-dns --capture-all-dns", &[], true, &[]);
    assert_eq!(
        p.decide(Proto::Udp, "10.2.0.9", 53, APP, APP, None),
        Redirect(15053, Dns)
    );
    let p = pod_with("-u 1337 --redirect-dns", &[], true, &[]);
    assert_eq!(p.decide(Proto::Udp, "10.2.0.9", 53, APP, APP, None), Pass(NoMatch));
}

fn inbound_to(p: &Pod, dst: &str, dport: u16, src: &str, ifindex: u32) -> Verdict {
    let conn = capture_common::model::InConn {
        dst: ip(dst),
        src: ip(src),
        dport,
        ifindex,
    };
    capture_common::model::inbound(&p.entries.config, &conn, &p.lookups)
}

/// The interface a remote connection arrives on in these tests (anything but lo).
const ETH0: u32 = 2;

#[test]
fn scenario_table_inbound_rows() {
    let p = pod(INJECTOR);
    // 14: inbound TCP from outside to an app port: 15006.
    assert_eq!(
        inbound_to(&p, POD_IP, 8080, "10.2.0.9", ETH0),
        Redirect(15006, InboundPort)
    );
    // 15: tunnel and -d ports pass.
    assert_eq!(inbound_to(&p, POD_IP, 15008, "10.2.0.9", ETH0), Pass(TunnelPort));
    for port in [15090, 15021, 15020] {
        assert_eq!(inbound_to(&p, POD_IP, port, "10.2.0.9", ETH0), Pass(InboundExcludePort));
    }
    // 16: port 22 is captured.
    assert_eq!(
        inbound_to(&p, POD_IP, 22, "10.2.0.9", ETH0),
        Redirect(15006, InboundPort)
    );
    // Locally generated connections never are, whatever interface the kernel reports.
    assert_eq!(inbound_to(&p, POD_IP, 8080, POD_IP, ETH0), Pass(LocalInbound));
    assert_eq!(inbound_to(&p, POD_IP, 8080, "127.0.0.6", 1), Pass(LocalInbound));
}

/// istio writes the tunnel port's RETURN in nat's ISTIO_INBOUND only; TPROXY mode captures inbound in
/// mangle, so there the tunnel port goes to the inbound port like any other (with `-b *`, and with a list
/// that names it).
#[test]
fn tproxy_mode_captures_the_tunnel_port() {
    let p = pod("-p 15001 -z 15006 -u 1337 -m TPROXY -i * -b * -d 15090");
    assert_eq!(
        inbound_to(&p, POD_IP, 15008, "10.2.0.9", ETH0),
        Redirect(15006, InboundPort)
    );
    assert_eq!(
        inbound_to(&p, POD_IP, 15090, "10.2.0.9", ETH0),
        Pass(InboundExcludePort)
    );
    let listed = pod("-u 1337 -m TPROXY -b 15008,8080");
    assert_eq!(
        inbound_to(&listed, POD_IP, 15008, "10.2.0.9", ETH0),
        Redirect(15006, InboundPort)
    );
    let redirect = pod("-u 1337 -m REDIRECT -b 15008,8080");
    assert_eq!(inbound_to(&redirect, POD_IP, 15008, "10.2.0.9", ETH0), Pass(TunnelPort));
}

#[test]
fn inbound_lists_interfaces_and_families() {
    let list = pod("-u 1337 -b 8080 -d 8080");
    assert_eq!(
        inbound_to(&list, POD_IP, 8080, "10.2.0.9", ETH0),
        Redirect(15006, InboundPort),
        "-d ignored"
    );
    assert_eq!(inbound_to(&list, POD_IP, 9090, "10.2.0.9", ETH0), Pass(NoMatch));
    let off = pod("-u 1337 -i *");
    assert_eq!(inbound_to(&off, POD_IP, 8080, "10.2.0.9", ETH0), Pass(InboundOff));
    let v4_only = pod_with(INJECTOR, &[], false, &[]);
    assert_eq!(inbound_to(&v4_only, POD_IP6, 8080, "fd00::9", ETH0), Pass(FamilyOff));
    assert_eq!(
        inbound_to(&pod(INJECTOR), POD_IP6, 8080, "fd00::9", ETH0),
        Redirect(15006, InboundPort)
    );
}

#[test]
fn loopback_acceleration_takes_quiet_local_pairs_only() {
    let on = pod(&format!("{INJECTOR} --loopback-accel"));
    let accel = |p: &Pod, peer: &str, quiet: bool| accelerate(&p.entries.config, &ip(peer), quiet, &p.lookups);
    // The app and its proxy over loopback, the proxy's passthrough to the pod's own address.
    for peer in ["127.0.0.1", "127.0.0.6", "::1", POD_IP, POD_IP6] {
        assert!(accel(&on, peer, true), "{peer}");
        assert!(!accel(&on, peer, false), "{peer} after data crossed");
    }
    // A peer outside the namespace: nothing to hand the data to.
    assert!(!accel(&on, "10.9.9.9", true));
    assert!(!accel(&on, "2001:db8::9", true));
    // Off unless asked for.
    assert!(!accel(&pod(INJECTOR), "127.0.0.1", true));
}

#[test]
fn a_socket_without_a_kept_original_destination_reports_its_local_address_but_not_at_the_proxys_own_port() {
    let p = pod(INJECTOR);
    // A socket accepted from a remote peer (or the app's own, connected anywhere but a capture port).
    let answer =
        |local: &str, port: u16| unkept_original_dst(&p.entries.config, &ip(local), port, &ip("10.9.9.9"), 40000);
    // Inbound, handed over by sk_lookup: the local address is the original destination, whatever the port
    // (a remote client may well connect to the pod's 15001).
    for (local, port) in [
        (POD_IP, 8080),
        (POD_IP6, 8080),
        (POD_IP, 15001),
        ("::ffff:10.1.1.5", 15001),
    ] {
        assert_eq!(answer(local, port), Some((ip(local), port)), "{local} port {port}");
    }
    // Loopback but another port: a connection not rewritten, answered like conntrack.
    assert_eq!(answer("127.0.0.1", 8080), Some((ip("127.0.0.1"), 8080)));
    // The outbound capture port at loopback: a redirected connection whose destination was lost.
    for local in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
        assert_eq!(answer(local, 15001), None, "{local}");
    }
    // Another -p moves that port.
    let other = pod("-p 16001 -z 15006 -u 1337 -m REDIRECT -i *");
    let peer = ip("10.9.9.9");
    assert_eq!(
        unkept_original_dst(&other.entries.config, &ip("127.0.0.1"), 15001, &peer, 40000),
        Some((ip("127.0.0.1"), 15001))
    );
    assert_eq!(
        unkept_original_dst(&other.entries.config, &ip("127.0.0.1"), 16001, &peer, 40000),
        None
    );
}

#[test]
fn the_applications_own_end_of_a_redirected_connection_gets_no_original_destination() {
    let p = pod(INJECTOR);
    let cfg = &p.entries.config;
    // Connected to loopback on a port a redirect lands on (-p, -z, the DNS proxy's): its own local address
    // would be a wrong answer, and capture keeps the destination only on the proxy's end.
    for (local, remote, port) in [
        (POD_IP, "127.0.0.1", 15001),
        ("127.0.0.1", "127.0.0.1", 15001),
        (POD_IP, "127.0.0.1", 15006),
        (POD_IP, "127.0.0.1", 15053),
        (POD_IP6, "::1", 15001),
        ("::ffff:10.1.1.5", "::ffff:127.0.0.1", 15001),
    ] {
        assert!(may_be_redirected(cfg, &ip(remote), port), "{remote} port {port}");
        assert_eq!(
            unkept_original_dst(cfg, &ip(local), 40000, &ip(remote), port),
            None,
            "{local} -> {remote}:{port}"
        );
    }
    // Another port at loopback, or a capture port elsewhere: not a redirect's, answered with the local address.
    for (remote, port) in [
        ("127.0.0.1", 8080),
        (POD_IP, 15001),
        ("10.9.9.9", 15006),
        ("::2", 15001),
    ] {
        assert!(!may_be_redirected(cfg, &ip(remote), port), "{remote} port {port}");
        assert_eq!(
            unkept_original_dst(cfg, &ip(POD_IP), 40000, &ip(remote), port),
            Some((ip(POD_IP), 40000)),
            "{remote}:{port}"
        );
    }
}

/// istio-iptables splits `-i` and `-x` by family: an IPv4 destination (an IPv4-mapped one on an IPv6 socket
/// included) only meets the IPv4 entries, and IPv6 entries — IPv4-mapped prefixes included — only meet IPv6
/// destinations. Each row is the verdict ip(6)tables gives; the connection is the app's TCP to port 80.
#[test]
fn cidr_lists_are_split_by_family() {
    const V4_REMOTE: &str = "10.2.0.9";
    const MAPPED_REMOTE: &str = "::ffff:10.2.0.9";
    const V6_REMOTE: &str = "2001:db8::9";
    // (flags, IPv4 remote, IPv6 remote)
    let cases: &[(&str, Verdict, Verdict)] = &[
        // -x with IPv6 prefixes leaves IPv4 captured.
        ("-i * -x ::/0", Redirect(15001, IncludeCidr), Pass(ExcludeCidr)),
        ("-i * -x ::/1", Redirect(15001, IncludeCidr), Pass(ExcludeCidr)),
        (
            "-i * -x ::ffff:0:0/96",
            Redirect(15001, IncludeCidr),
            Redirect(15001, IncludeCidr),
        ),
        (
            "-i * -x ::ffff:10.2.0.0/112",
            Redirect(15001, IncludeCidr),
            Redirect(15001, IncludeCidr),
        ),
        (
            "-i * -x 2001:db8::/32,::/1",
            Redirect(15001, IncludeCidr),
            Pass(ExcludeCidr),
        ),
        // -x with IPv4 prefixes leaves IPv6 captured.
        ("-i * -x 0.0.0.0/0", Pass(ExcludeCidr), Redirect(15001, IncludeCidr)),
        ("-i * -x 10.0.0.0/8,::/1", Pass(ExcludeCidr), Pass(ExcludeCidr)),
        // -i with IPv6 prefixes captures no IPv4.
        ("-i ::/0", Pass(NoMatch), Redirect(15001, IncludeCidr)),
        ("-i ::ffff:10.2.0.0/112", Pass(NoMatch), Pass(NoMatch)),
        ("-i ::ffff:0:0/96", Pass(NoMatch), Pass(NoMatch)),
        // -i with IPv4 prefixes captures no IPv6.
        ("-i 0.0.0.0/0", Redirect(15001, IncludeCidr), Pass(NoMatch)),
        ("-i 10.0.0.0/8", Redirect(15001, IncludeCidr), Pass(NoMatch)),
        // Mixed lists: each family its own entries.
        (
            "-i 10.0.0.0/8,2001:db8::/32",
            Redirect(15001, IncludeCidr),
            Redirect(15001, IncludeCidr),
        ),
        (
            "-i 10.0.0.0/8,2001:db8::/32 -x ::/0",
            Redirect(15001, IncludeCidr),
            Pass(ExcludeCidr),
        ),
        ("-i ::/0 -x 0.0.0.0/0", Pass(ExcludeCidr), Redirect(15001, IncludeCidr)),
        // -q captures its ports in both families unless -x of that family excludes first.
        (
            "-i '' -q 80 -x ::/0",
            Redirect(15001, OutboundIncludePort),
            Pass(ExcludeCidr),
        ),
        (
            "-i '' -q 80 -x 0.0.0.0/0",
            Pass(ExcludeCidr),
            Redirect(15001, OutboundIncludePort),
        ),
    ];
    for (flags, v4, v6) in cases {
        let p = pod(flags);
        assert_eq!(p.tcp(V4_REMOTE, 80, APP), *v4, "{flags}: IPv4 {V4_REMOTE}");
        // An IPv4-mapped destination on an IPv6 socket is an IPv4 connection to the kernel and to iptables.
        assert_eq!(
            p.tcp(MAPPED_REMOTE, 80, APP),
            *v4,
            "{flags}: IPv4-mapped {MAPPED_REMOTE}"
        );
        assert_eq!(p.tcp(V6_REMOTE, 80, APP), *v6, "{flags}: IPv6 {V6_REMOTE}");
    }
}

/// A mapped loopback prefix in `-i` is a loopback entry to istio (Go unmaps before `IsLoopback`): the c2
/// rules go, in both families, though the entry itself only ever matches IPv6 destinations.
#[test]
fn a_mapped_loopback_include_removes_the_local_pass_rules() {
    let p = pod("-i ::ffff:127.0.0.1/128");
    assert_eq!(p.tcp(POD_IP, 8080, APP), Pass(NoMatch));
    assert_eq!(p.tcp("127.0.0.1", 8080, APP), Pass(Loopback));
    let plain = pod("-i ::ffff:10.0.0.0/104");
    assert_eq!(plain.tcp(POD_IP, 8080, APP), Pass(LocalNotProxyUid));
}

/// One pod may take an eighth of the node's CIDR map and a sixty-fourth of its set map, whatever its
/// annotations say: more is refused in one line naming the flags, so no pod can fill the maps for others.
#[test]
fn a_pod_may_not_take_more_than_its_share_of_the_node_wide_maps() {
    use capture_common::maps::{MAX_CIDR_ENTRIES_PER_POD, MAX_SET_ENTRIES_PER_POD};
    let env = Environment {
        local: vec![POD_IP.parse().unwrap()],
        ..Environment::default()
    };
    let parse = |line: &str| {
        let args = std::iter::once("capture".to_owned()).chain(line.split_whitespace().map(str::to_owned));
        flags::parse(args, &|_| None).unwrap_or_else(|e| panic!("{e}"))
    };
    let cidrs = |n: u32| {
        (0..n)
            .map(|i| format!("10.{}.{}.0/27", i / 256, i % 256))
            .collect::<Vec<_>>()
            .join(",")
    };
    // The pod's own address takes one entry: the last -x CIDR that fits is the limit less one.
    let fits = parse(&format!("-u 1337 -i * -x {}", cidrs(MAX_CIDR_ENTRIES_PER_POD - 1)));
    assert!(entries(&fits.config, &env, 1).is_ok());
    let over = parse(&format!("-u 1337 -i * -x {}", cidrs(MAX_CIDR_ENTRIES_PER_POD)));
    let err = entries(&over.config, &env, 1).unwrap_err().to_string();
    let (n, max) = (MAX_CIDR_ENTRIES_PER_POD + 1, MAX_CIDR_ENTRIES_PER_POD);
    assert!(err.starts_with(&format!("-i/-x: {n} CIDRs")), "{err}");
    assert!(err.contains(&format!("at most {max} per pod")), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let ports = |n: u32| (1..=n).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let fits = parse(&format!("-u 1337 -b {}", ports(MAX_SET_ENTRIES_PER_POD)));
    assert!(entries(&fits.config, &env, 1).is_ok());
    let over = parse(&format!("-u 1337 -b {}", ports(MAX_SET_ENTRIES_PER_POD + 1)));
    let err = entries(&over.config, &env, 1).unwrap_err().to_string();
    assert!(
        err.contains("1025 ports and groups") && err.contains("at most 1024 per pod"),
        "{err}"
    );
}

/// Every redirect lands on a port sockops looks at for the proxy's end of the handshake
/// (`model::lands_on_capture_port`): under other capture ports, with DNS capture, for the app and the
/// proxy, to local and remote addresses of both families. A redirect landing elsewhere would reach the proxy
/// without its original destination.
#[test]
fn every_redirect_lands_on_a_port_sockops_looks_at() {
    use capture_common::model::lands_on_capture_port;
    let flag_lines = [
        INJECTOR.to_owned(),
        "-p 15101 -z 15106 -u 1337 -i * -b *".to_owned(),
        "-p 15001 -z 15006 -u 1337 -i 10.0.0.0/8 -q 25,587".to_owned(),
    ];
    let mut redirects = 0;
    for line in &flag_lines {
        let p = pod_with(line, &[("REDIRECT_DNS", "true")], true, &["10.96.0.10"]);
        for (proto, dst, dport) in [
            (Proto::Tcp, "10.2.3.4", 8080),
            (Proto::Tcp, "10.2.3.4", 25),
            (Proto::Tcp, POD_IP, 8080),
            (Proto::Tcp, POD_IP6, 8080),
            (Proto::Tcp, "2001:db8::1", 443),
            (Proto::Udp, "10.96.0.10", 53),
            (Proto::Tcp, "10.96.0.10", 53),
        ] {
            for uid in [APP, PROXY] {
                if let Redirect(port, rule) = p.decide(proto, dst, dport, uid, uid, None) {
                    redirects += 1;
                    assert!(
                        lands_on_capture_port(&p.entries.config, port),
                        "{line}: {proto:?} {dst}:{dport} as {uid} → {port} ({rule:?})"
                    );
                }
            }
        }
    }
    // The app's, the proxy's to its own pod (-z) and DNS's are all among them.
    assert!(
        redirects >= 15,
        "only {redirects} redirects: the cases no longer exercise the rule"
    );
}

/// The source a redirected connection's socket is bound to: the pod's address of the destination's family,
/// as routing picks it before REDIRECT; nothing for a socket bound already or a loopback destination.
#[test]
fn a_redirected_connection_comes_from_the_pods_address() {
    let sources = PodSources {
        v4: ip(POD_IP),
        v6: ip(POD_IP6),
    };
    let unbound = addr::UNSPECIFIED;
    let source = |dst: &str, bound: &str, port: u16| redirect_source(&sources, &ip(dst), &ip(bound), port);
    // Off the pod, either family (an IPv4-mapped destination is IPv4); and the pod's own address.
    for (dst, want) in [
        ("10.9.9.9", POD_IP),
        ("::ffff:10.9.9.9", POD_IP),
        ("2001:db8::9", POD_IP6),
        (POD_IP, POD_IP),
        (POD_IP6, POD_IP6),
    ] {
        assert_eq!(
            redirect_source(&sources, &ip(dst), &unbound, 0),
            Some(ip(want)),
            "{dst}"
        );
        assert_eq!(
            source(dst, "0.0.0.0", 0),
            Some(ip(want)),
            "{dst}, socket bound to 0.0.0.0 without a port"
        );
    }
    // Loopback or unspecified destinations: the kernel picks loopback under REDIRECT too.
    for dst in ["127.0.0.6", "127.0.0.1", "::1", "::ffff:127.0.0.6", "0.0.0.0", "::"] {
        assert_eq!(source(dst, "::", 0), None, "{dst}");
    }
    // A socket bound to an address keeps it; one bound to a port cannot be bound again.
    assert_eq!(source("10.9.9.9", POD_IP, 0), None);
    assert_eq!(source("10.9.9.9", "127.0.0.6", 0), None);
    assert_eq!(source("10.9.9.9", "0.0.0.0", 40000), None);
    assert_eq!(source("2001:db8::9", "::", 40000), None);
    // A pod without an address of the family: left as it is.
    let v4_only = PodSources {
        v4: ip(POD_IP),
        v6: addr::UNSPECIFIED,
    };
    assert_eq!(redirect_source(&v4_only, &ip("2001:db8::9"), &unbound, 0), None);
}

/// The loader's `POD_SOURCES` value: each family's first global address, not loopback, link-local or the
/// passthrough address `::6` capture adds to lo.
#[test]
fn the_pods_sources_are_its_first_global_addresses() {
    let env = Environment {
        local: [
            "127.0.0.1",
            "::1",
            "::6",
            "fe80::1",
            "169.254.1.1",
            POD_IP,
            "10.1.1.6",
            POD_IP6,
            "fd00::6",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect(),
        ..Environment::default()
    };
    let e = entries(&capture::config::Config::default(), &env, 7).unwrap();
    assert_eq!(
        e.sources,
        PodSources {
            v4: ip(POD_IP),
            v6: ip(POD_IP6)
        }
    );
    let none = entries(&capture::config::Config::default(), &Environment::default(), 7).unwrap();
    assert_eq!(none.sources, PodSources::default());
}
