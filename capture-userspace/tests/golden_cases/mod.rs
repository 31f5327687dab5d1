//! Istio's 27 golden cases as `capture` arguments (CASES.md, `tests/data/golden/README.md`): the golden
//! parity test renders them, the fuzz test mutates them.

/// One golden case: flags on top of istio's test base, env vars, IPv6 on, nameservers.
pub struct Case {
    pub name: &'static str,
    /// Command-line flags, split on white space (`--flag=` gives an empty value).
    pub args: &'static str,
    pub env: &'static [(&'static str, &'static str)],
    pub ipv6: bool,
    pub nameservers: &'static [&'static str],
}

const fn case(name: &'static str, args: &'static str) -> Case {
    Case {
        name,
        args,
        env: &[],
        ipv6: false,
        nameservers: &[],
    }
}

const V6: bool = true;
const DNS_V4: &[&str] = &["127.0.0.53"];

/// The table of CASES.md (tests/data/golden/README.md).
#[rustfmt::skip]
pub const CASES: &[Case] = &[
    case("empty", ""),
    Case { ipv6: V6, ..case("ipv6-empty-inbound-ports", "--istio-inbound-ports=") },
    Case { nameservers: DNS_V4, ..case("ip-range", "-x 1.1.0.0/16 -i 9.9.0.0/16 --redirect-dns -g 1,2 -u 3,4") },
    Case { ipv6: V6, nameservers: DNS_V4, ..case("tproxy",
        "-m TPROXY -b * -x 1.1.0.0/16 -i 9.9.0.0/16 --redirect-dns -g 1337 -u 1337 -c not-istio-nic") },
    Case { ipv6: V6, ..case("ipv6-inbound-ports", "-b 4000,5000") },
    Case { ipv6: V6, ..case("ipv6-virt-interfaces", "-b 4000,5000 -k eth0,eth1") },
    Case { ipv6: V6, ..case("ipv6-ipnets",
        "-b 4000,5000 -d 6000,7000, -k eth0,eth1 -x 2001:db8::/32 -i 2001:db8::/32") },
    Case { ipv6: V6, ..case("ipv6-uid-gid",
        "-b 4000,5000 -d 6000,7000 -k eth0,eth1 -x 2001:db8::/32 -i 2001:db8::/32 -g 1,2 -u 3,4") },
    Case { ipv6: V6, ..case("ipv6-outbound-ports", "--istio-inbound-ports= -q 32000,31000") },
    case("kube-virt-interfaces", "-k eth1,eth2 -i *"),
    case("ipnets", "-i 10.0.0.0/8"),
    case("ipnets-with-kube-virt-interfaces", "-k eth1,eth2 -i 10.0.0.0/8"),
    case("inbound-ports-include", "-b 32000,31000"),
    case("inbound-ports-wildcard", "-b *"),
    case("inbound-ports-tproxy", "-b 32000,31000 -m TPROXY"),
    case("inbound-ports-wildcard-tproxy", "-b * -m TPROXY"),
    Case { ipv6: V6, nameservers: &["127.0.0.53", "::127.0.0.53"], ..case("dns-uid-gid", "--redirect-dns -g 1,2 -u 3,4") },
    Case { ipv6: V6, ..case("ipv6-dns-uid-gid", "--redirect-dns -g 1,2 -u 3,4") },
    Case { env: &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")], ..case("outbound-owner-groups", "") },
    Case { env: &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")], ..case("outbound-owner-groups-exclude", "") },
    Case { ipv6: V6, env: &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")],
        ..case("ipv6-dns-outbound-owner-groups", "--redirect-dns") },
    Case { ipv6: V6, env: &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")],
        ..case("ipv6-dns-outbound-owner-groups-exclude", "--redirect-dns") },
    case("outbound-ports-include", "-q 32000,31000"),
    Case { nameservers: DNS_V4, ..case("loopback-outbound-iprange", "-i 127.1.2.3/32 --redirect-dns -g 1,2 -u 3,4") },
    case("basic-exclude-nic", "-c not-istio-nic"),
    case("drop-invalid", "--drop-invalid"),
    Case { env: &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")], ..case("host-ipv4-loopback-cidr", "") },
];

/// istio's test base (CASES.md), before each case's flags.
const BASE: &str = "-p 15001 -z 15006 -e 15008 -u 1337 -g 1337 -t 1337 -r 133";

impl Case {
    /// The case's argv: the program name, istio's test base, then the case's flags.
    pub fn argv(&self) -> impl Iterator<Item = &'static str> {
        std::iter::once("capture")
            .chain(BASE.split_whitespace())
            .chain(self.args.split_whitespace())
    }
}
