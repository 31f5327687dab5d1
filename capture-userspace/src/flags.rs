//! The command line: istio-iptables' flags and env vars, with istio's names, defaults and precedence, plus
//! capture's own flags; parsed and validated into a [`Config`] and [`Options`].
//!
//! One table, [`IstioFlag::spec`], describes every istio-iptables flag: its short and long names, the env vars
//! that set it and its default. The clap command, the env lookup and the README's flag table all come
//! from it. Precedence is istio's: command line > additional env var > primary env var > default.
//!
//! Where istio-iptables is lenient we are strict, and every bad value is one line naming the flag (or env
//! var) and the value: istio ignores invalid env values and pastes unchecked ports into iptables; an
//! operator would rather hear about a typo than run with a silently different capture.

use std::{path::PathBuf, time::Duration};

use clap::{Arg, ArgAction, ArgMatches, Command, ValueEnum};
use ipnet::{IpNet, Ipv4Net};
use strum::VariantArray as _;

use capture_common::maps::MAX_PROXY_IDS;

use crate::config::{
    Action, Backend, Config, DEFAULT_PIN_DIR, DEFAULT_RESOLV_CONF, InboundPorts, IncludeCidrs, InterceptionMode,
    Invocation, IptablesFlavour, LogLevel, MAX_OWNER_GROUPS, Options, Owner, OwnerGroups,
};

/// What kind of value a flag takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A value: `--flag VALUE`, `--flag=VALUE`, `-f VALUE`.
    Value,
    /// A pflag boolean: `--flag` means true, `--flag=false` sets it explicitly (never `--flag false`).
    Bool,
}

/// One istio-iptables flag.
#[derive(Clone, Copy, Debug)]
pub struct FlagSpec {
    /// Long name, without dashes.
    pub long: &'static str,
    /// Short name, if istio has one.
    pub short: Option<char>,
    /// The env var istio binds to the flag (`UPPER_SNAKE` of the long name), if any.
    pub env: Option<&'static str>,
    /// istio's `AdditionalEnv`: a second env var that wins over `env`.
    pub extra_env: Option<&'static str>,
    /// Default value (before any derivation such as `-u` from `ENVOY_USER`).
    pub default: &'static str,
    /// Value or boolean.
    pub kind: Kind,
    /// One-line help.
    pub help: &'static str,
}

const fn value(
    long: &'static str,
    short: Option<char>,
    env: Option<&'static str>,
    default: &'static str,
    help: &'static str,
) -> FlagSpec {
    FlagSpec {
        long,
        short,
        env,
        extra_env: None,
        default,
        kind: Kind::Value,
        help,
    }
}

const fn boolean(
    long: &'static str,
    env: &'static str,
    extra_env: Option<&'static str>,
    help: &'static str,
) -> FlagSpec {
    FlagSpec {
        long,
        short: None,
        env: Some(env),
        extra_env,
        default: "false",
        kind: Kind::Bool,
        help,
    }
}

/// Every flag istio-iptables accepts (`docs/istio-rules.md#capture-flags` and `#behaviour-flags`), in istio's
/// order: the parser looks flags up by variant, so a flag that is not in the table does not compile, and
/// `IstioFlag::VARIANTS` (derived) lists every one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::VariantArray)]
pub enum IstioFlag {
    /// `--envoy-port`.
    EnvoyPort,
    /// `--inbound-capture-port`.
    InboundCapturePort,
    /// `--inbound-tunnel-port`.
    InboundTunnelPort,
    /// `--proxy-uid`.
    ProxyUid,
    /// `--proxy-gid`.
    ProxyGid,
    /// `--istio-inbound-interception-mode`.
    IstioInboundInterceptionMode,
    /// `--istio-inbound-tproxy-mark`.
    IstioInboundTproxyMark,
    /// `--istio-inbound-tproxy-route-table`.
    IstioInboundTproxyRouteTable,
    /// `--istio-inbound-ports`.
    IstioInboundPorts,
    /// `--istio-local-exclude-ports`.
    IstioLocalExcludePorts,
    /// `--istio-exclude-interfaces`.
    IstioExcludeInterfaces,
    /// `--istio-service-cidr`.
    IstioServiceCidr,
    /// `--istio-service-exclude-cidr`.
    IstioServiceExcludeCidr,
    /// `--istio-outbound-ports`.
    IstioOutboundPorts,
    /// `--istio-local-outbound-ports-exclude`.
    IstioLocalOutboundPortsExclude,
    /// `--kube-virt-interfaces`.
    KubeVirtInterfaces,
    /// `--dry-run`.
    DryRun,
    /// `--redirect-dns`.
    RedirectDns,
    /// `--capture-all-dns`.
    CaptureAllDns,
    /// `--drop-invalid`.
    DropInvalid,
    /// `--dual-stack`.
    DualStack,
    /// `--network-namespace`.
    NetworkNamespace,
    /// `--cni-mode`.
    CniMode,
    /// `--run-validation`.
    RunValidation,
    /// `--skip-rule-apply`.
    SkipRuleApply,
    /// `--iptables-probe-port`.
    IptablesProbePort,
    /// `--probe-timeout`.
    ProbeTimeout,
    /// `--reconcile`.
    Reconcile,
    /// `--cleanup-only`.
    CleanupOnly,
    /// `--force-apply`.
    ForceApply,
    /// `--native-nftables`.
    NativeNftables,
    /// `--force-iptables-binary`.
    ForceIptablesBinary,
    /// `--log_output_level`.
    LogOutputLevel,
    /// `--log_as_json`.
    LogAsJson,
    /// `--log_caller`.
    LogCaller,
    /// `--log_stacktrace_level`.
    LogStacktraceLevel,
    /// `--log_target`.
    LogTarget,
}

impl IstioFlag {
    /// The flag's names, env vars, default and help: the one place they are written.
    pub const fn spec(self) -> FlagSpec {
        match self {
            IstioFlag::EnvoyPort => value(
                "envoy-port",
                Some('p'),
                None,
                "15001",
                "Port the proxy's outbound listener accepts captured connections on (ENVOY_PORT is not read, as in istio)",
            ),
            IstioFlag::InboundCapturePort => value(
                "inbound-capture-port",
                Some('z'),
                Some("INBOUND_CAPTURE_PORT"),
                "15006",
                "Port the proxy's inbound listener accepts captured connections on",
            ),
            IstioFlag::InboundTunnelPort => value(
                "inbound-tunnel-port",
                Some('e'),
                Some("INBOUND_TUNNEL_PORT"),
                "15008",
                "HBONE tunnel port: not captured inbound in REDIRECT mode (TPROXY mode captures it, as Istio's mangle rules do: their RETURN for it is in nat only), not redirected for the proxy",
            ),
            IstioFlag::ProxyUid => value(
                "proxy-uid",
                Some('u'),
                Some("PROXY_UID"),
                "",
                "Proxy uids (comma list) whose traffic is not captured; default: uid of $ENVOY_USER (istio-proxy) or 1337",
            ),
            IstioFlag::ProxyGid => value(
                "proxy-gid",
                Some('g'),
                Some("PROXY_GID"),
                "",
                "Proxy gids (comma list) whose traffic is not captured; default: the proxy uids",
            ),
            IstioFlag::IstioInboundInterceptionMode => value(
                "istio-inbound-interception-mode",
                Some('m'),
                Some("ISTIO_INBOUND_INTERCEPTION_MODE"),
                "",
                "Inbound interception mode: REDIRECT or TPROXY",
            ),
            IstioFlag::IstioInboundTproxyMark => value(
                "istio-inbound-tproxy-mark",
                Some('t'),
                Some("ISTIO_INBOUND_TPROXY_MARK"),
                "1337",
                "TPROXY fwmark",
            ),
            IstioFlag::IstioInboundTproxyRouteTable => value(
                "istio-inbound-tproxy-route-table",
                Some('r'),
                Some("ISTIO_INBOUND_TPROXY_ROUTE_TABLE"),
                "133",
                "TPROXY routing table",
            ),
            IstioFlag::IstioInboundPorts => value(
                "istio-inbound-ports",
                Some('b'),
                Some("ISTIO_INBOUND_PORTS"),
                "",
                "Inbound ports to capture: '*' for all, a comma list, or empty for none",
            ),
            IstioFlag::IstioLocalExcludePorts => value(
                "istio-local-exclude-ports",
                Some('d'),
                Some("ISTIO_LOCAL_EXCLUDE_PORTS"),
                "",
                "Inbound ports not to capture (only with -b '*')",
            ),
            IstioFlag::IstioExcludeInterfaces => value(
                "istio-exclude-interfaces",
                Some('c'),
                Some("ISTIO_EXCLUDE_INTERFACES"),
                "",
                "Interfaces whose traffic is never captured",
            ),
            IstioFlag::IstioServiceCidr => value(
                "istio-service-cidr",
                Some('i'),
                Some("ISTIO_SERVICE_CIDR"),
                "",
                "Outbound destinations to capture: '*' for all, a comma list of CIDRs, or empty for none",
            ),
            IstioFlag::IstioServiceExcludeCidr => value(
                "istio-service-exclude-cidr",
                Some('x'),
                Some("ISTIO_SERVICE_EXCLUDE_CIDR"),
                "",
                "Outbound destination CIDRs never captured",
            ),
            IstioFlag::IstioOutboundPorts => value(
                "istio-outbound-ports",
                Some('q'),
                Some("ISTIO_OUTBOUND_PORTS"),
                "",
                "Outbound TCP ports captured to any non-excluded destination",
            ),
            IstioFlag::IstioLocalOutboundPortsExclude => value(
                "istio-local-outbound-ports-exclude",
                Some('o'),
                Some("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"),
                "",
                "Outbound TCP/UDP ports never captured (wins over every other rule)",
            ),
            IstioFlag::KubeVirtInterfaces => value(
                "kube-virt-interfaces",
                Some('k'),
                Some("KUBE_VIRT_INTERFACES"),
                "",
                "Interfaces whose inbound traffic is treated as outbound",
            ),
            IstioFlag::DryRun => FlagSpec {
                kind: Kind::Bool,
                ..value(
                    "dry-run",
                    Some('n'),
                    Some("DRY_RUN"),
                    "false",
                    "Print what would be applied; apply nothing",
                )
            },
            IstioFlag::RedirectDns => boolean(
                "redirect-dns",
                "REDIRECT_DNS",
                Some("ISTIO_META_DNS_CAPTURE"),
                "Capture DNS (TCP and UDP port 53) to the agent's DNS proxy on 15053",
            ),
            IstioFlag::CaptureAllDns => boolean(
                "capture-all-dns",
                "CAPTURE_ALL_DNS",
                None,
                "With --redirect-dns: capture all port-53 traffic, not only to resolv.conf servers",
            ),
            IstioFlag::DropInvalid => boolean(
                "drop-invalid",
                "DROP_INVALID",
                Some("INVALID_DROP"),
                "Drop packets conntrack marks INVALID",
            ),
            IstioFlag::DualStack => boolean(
                "dual-stack",
                "DUAL_STACK",
                Some("ISTIO_DUAL_STACK"),
                "Enable IPv6 capture whenever the namespace has any global IPv6 address",
            ),
            IstioFlag::NetworkNamespace => value(
                "network-namespace",
                None,
                Some("NETWORK_NAMESPACE"),
                "",
                "Apply in this network namespace (a path such as /var/run/netns/pod) instead of the current one",
            ),
            IstioFlag::CniMode => boolean(
                "cni-mode",
                "CNI_MODE",
                None,
                "Accepted for compatibility (istio: pod-scoped xtables lock)",
            ),
            IstioFlag::RunValidation => boolean(
                "run-validation",
                "RUN_VALIDATION",
                None,
                "After applying, check that redirection works; exit 126 if not",
            ),
            IstioFlag::SkipRuleApply => boolean(
                "skip-rule-apply",
                "SKIP_RULE_APPLY",
                None,
                "Do not apply anything (with --run-validation: only validate)",
            ),
            IstioFlag::IptablesProbePort => value(
                "iptables-probe-port",
                None,
                Some("IPTABLES_PROBE_PORT"),
                "15002",
                "Original destination port of the validation probe",
            ),
            IstioFlag::ProbeTimeout => value(
                "probe-timeout",
                None,
                Some("PROBE_TIMEOUT"),
                "5s",
                "Validation timeout (a Go-style duration such as 5s or 500ms)",
            ),
            IstioFlag::Reconcile => boolean(
                "reconcile",
                "RECONCILE",
                None,
                "Accepted for compatibility: re-applying always replaces existing capture state",
            ),
            IstioFlag::CleanupOnly => boolean(
                "cleanup-only",
                "CLEANUP_ONLY",
                None,
                "Remove capture from the namespace and exit (same as `capture clean`)",
            ),
            IstioFlag::ForceApply => boolean(
                "force-apply",
                "FORCE_APPLY",
                None,
                "Accepted for compatibility: applying is always idempotent",
            ),
            IstioFlag::NativeNftables => boolean(
                "native-nftables",
                "NATIVE_NFTABLES",
                None,
                "istio's nftables mode: not supported by the iptables backend; ignored by the eBPF backend",
            ),
            IstioFlag::ForceIptablesBinary => value(
                "force-iptables-binary",
                None,
                Some("FORCE_IPTABLES_BINARY"),
                "",
                "iptables binary flavour for the iptables backend: '', legacy or nft",
            ),
            IstioFlag::LogOutputLevel => value(
                "log_output_level",
                None,
                None,
                "default:info,grpc:none",
                "Accepted for compatibility (istio logging)",
            ),
            IstioFlag::LogAsJson => FlagSpec {
                kind: Kind::Bool,
                ..value(
                    "log_as_json",
                    None,
                    None,
                    "false",
                    "Accepted for compatibility (istio logging)",
                )
            },
            IstioFlag::LogCaller => value(
                "log_caller",
                None,
                None,
                "",
                "Accepted for compatibility (istio logging)",
            ),
            IstioFlag::LogStacktraceLevel => value(
                "log_stacktrace_level",
                None,
                None,
                "default:none",
                "Accepted for compatibility (istio logging)",
            ),
            IstioFlag::LogTarget => value(
                "log_target",
                None,
                None,
                "stdout",
                "Accepted for compatibility (istio logging)",
            ),
        }
    }

    /// `-p/--envoy-port` or `--redirect-dns`: how errors name the flag.
    fn name(self) -> String {
        let spec = self.spec();
        match spec.short {
            Some(s) => format!("-{s}/--{}", spec.long),
            None => format!("--{}", spec.long),
        }
    }
}

/// [`IstioFlag::spec`] of every flag, in istio's order: the clap command, the env lookup and the README's flag
/// table come from it.
pub const ISTIO_FLAGS: [FlagSpec; IstioFlag::VARIANTS.len()] = {
    let mut out = [IstioFlag::VARIANTS[0].spec(); IstioFlag::VARIANTS.len()];
    let mut i = 1;
    while i < out.len() {
        out[i] = IstioFlag::VARIANTS[i].spec();
        i += 1;
    }
    out
};

/// Env-only inputs (`docs/istio-rules.md#env-only-inputs-and-derived-values`).
pub const ENV_OWNER_GROUPS: &str = "ISTIO_OUTBOUND_OWNER_GROUPS";
/// See [`ENV_OWNER_GROUPS`].
pub const ENV_OWNER_GROUPS_EXCLUDE: &str = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE";
/// See [`ENV_OWNER_GROUPS`].
pub const ENV_LOOPBACK_CIDR: &str = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR";
/// See [`ENV_OWNER_GROUPS`].
pub const ENV_ENVOY_USER: &str = "ENVOY_USER";
/// See [`ENV_OWNER_GROUPS`].
pub const ENV_DRY_RUN_FILE: &str = "DRY_RUN_FILE_PATH";

/// The proxy user istio looks up for the default `-u`, and the uid used when it does not exist.
const DEFAULT_ENVOY_USER: &str = "istio-proxy";
const DEFAULT_PROXY_ID: u32 = 1337;

/// A bad input: one line naming where the value came from, the value, and what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid value {value:?} for {origin}: {reason}")]
pub struct FlagError {
    /// `-p/--envoy-port`, or `env PROXY_UID (-u/--proxy-uid)`.
    pub origin: String,
    /// The value as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Where a setting's value came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    Cli,
    Env(&'static str),
    Default,
}

/// A flag's raw value and where it came from.
#[derive(Clone, Debug)]
struct Raw {
    /// How the input is named in errors: `-p/--envoy-port`, or the env var of an env-only input.
    name: String,
    value: String,
    origin: Origin,
}

impl Raw {
    /// Where the value came from, as errors name it: `-u/--proxy-uid`, or `env PROXY_UID (-u/--proxy-uid)`.
    fn origin_name(&self) -> String {
        match self.origin {
            Origin::Env(var) if var == self.name => format!("env {var}"),
            Origin::Env(var) => format!("env {var} ({})", self.name),
            Origin::Cli | Origin::Default => self.name.clone(),
        }
    }

    fn error(&self, reason: impl Into<String>) -> FlagError {
        self.error_for(&self.value, reason)
    }

    /// An error about one token of a list value.
    fn error_for(&self, token: &str, reason: impl Into<String>) -> FlagError {
        FlagError {
            origin: self.origin_name(),
            value: token.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The clap command: istio's flags and ours on `capture`, and on `capture clean`; `capture status`.
pub fn command() -> Command {
    // pflag lets a repeated flag override the earlier one; so do we.
    let apply_args = |cmd: Command| {
        cmd.args(ISTIO_FLAGS.into_iter().map(istio_arg))
            .args(our_args())
            .args_override_self(true)
    };
    apply_args(
        Command::new("capture")
            .version(env!("CARGO_PKG_VERSION"))
            .about("Transparent traffic capture for service-mesh sidecars, in eBPF: a drop-in for istio-iptables")
            .args_conflicts_with_subcommands(true),
    )
    .subcommand(apply_args(
        Command::new("clean").about("Remove capture from the network namespace (same as --cleanup-only)"),
    ))
    .subcommand(
        Command::new("status")
            .about("Show the capture applied to the network namespace")
            .arg(backend_arg())
            .arg(pin_dir_arg()),
    )
}

fn istio_arg(spec: FlagSpec) -> Arg {
    let mut arg = Arg::new(spec.long).long(spec.long).help(spec.help);
    if let Some(short) = spec.short {
        arg = arg.short(short);
    }
    if let Some(env) = spec.env {
        arg = arg.long_help(format!(
            "{} [env: {env}{}] [default: {:?}]",
            spec.help,
            spec.extra_env.map(|e| format!(", {e} (wins)")).unwrap_or_default(),
            spec.default
        ));
    }
    match spec.kind {
        // Negative numbers are values, so that `-z -1` is reported as a bad port, not an unknown flag.
        Kind::Value => arg
            .num_args(1)
            .allow_negative_numbers(true)
            .value_name("VALUE")
            .action(ArgAction::Set),
        Kind::Bool => arg
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
            .value_name("BOOL")
            .action(ArgAction::Set),
    }
}

fn backend_arg() -> Arg {
    Arg::new("backend")
        .long("backend")
        .value_name("ebpf|iptables|auto")
        .help("How capture is applied; auto: ebpf if the kernel has every feature it needs, else iptables [default: ebpf]")
}

fn pin_dir_arg() -> Arg {
    Arg::new("pin-dir")
        .long("pin-dir")
        .value_name("PATH")
        .help("bpffs directory the eBPF backend pins its programs and maps in [default: /sys/fs/bpf/capture]")
}

fn our_args() -> [Arg; 6] {
    [
        backend_arg(),
        pin_dir_arg(),
        Arg::new("log-level")
            .long("log-level")
            .value_name("off|error|warn|info|debug|trace")
            .help("eBPF backend: the kernel programs' log level; other than off, capture stays and forwards the logs until Ctrl-C [default: off]"),
        Arg::new("cgroup")
            .long("cgroup")
            .value_name("PATH")
            .help("cgroup v2 directory the eBPF programs attach to [default: the cgroup v2 root, from /proc/mounts]"),
        Arg::new("resolv-conf")
            .long("resolv-conf")
            .value_name("PATH")
            .help("Where --redirect-dns reads the DNS servers from [default: /etc/resolv.conf]"),
        Arg::new("loopback-accel")
            .long("loopback-accel")
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
            .value_name("BOOL")
            .action(ArgAction::Set)
            .help("eBPF backend: sends between the app and its proxy skip the loopback TCP/IP path (sockops + sk_msg) [default: false]"),
    ]
}

/// Parses argv (including the program name) and the environment. Pure: it reads only its arguments (and
/// the user database, for `-u`/`-g` names) and applies nothing.
pub fn parse<I, T>(args: I, env: &dyn Fn(&str) -> Option<String>) -> Result<Invocation, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    // Checked here rather than by clap, whose error for a value that is not UTF-8 names no argument.
    let args = args
        .into_iter()
        .enumerate()
        .map(|(i, arg)| {
            arg.into().into_string().map_err(|bad| FlagError {
                origin: format!("command-line argument {i}"),
                value: bad.to_string_lossy().into_owned(),
                reason: NOT_UTF8.into(),
            })
        })
        .collect::<Result<Vec<String>, FlagError>>()?;
    let matches = command().try_get_matches_from(args)?;
    let (action, sub) = match matches.subcommand() {
        Some(("clean", sub)) => (Action::Clean, sub),
        Some(("status", sub)) => (Action::Status, sub),
        _ => (Action::Apply, &matches),
    };
    Ok(resolve(action, sub, env)?)
}

/// Why parsing failed: clap's own errors (unknown flag, missing value, --help) or a bad value. Displayed
/// as one line naming the argument, as `capture` prints it and the agent answers it.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// clap rejected the command line, or the user asked for help or the version.
    #[error("{}", clap_line(.0))]
    Clap(#[from] clap::Error),
    /// A flag or env var had a bad value.
    #[error(transparent)]
    Flag(#[from] FlagError),
}

/// One line for a clap error: what is wrong and the argument (and value) it is about, quoted and escaped.
/// Not clap's rendering, which goes on with usage and tips, and quotes an argument unescaped (an argument
/// with a newline would break the line).
fn clap_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        return "-h/--help or -V/--version: asks for text, applies nothing".into();
    }
    let quoted = [
        ContextKind::InvalidArg,
        ContextKind::InvalidValue,
        ContextKind::InvalidSubcommand,
    ]
    .into_iter()
    .filter_map(|kind| match e.get(kind)? {
        ContextValue::String(s) => Some(format!("{s:?}")),
        ContextValue::Strings(v) => Some(format!("{:?}", v.join(" "))),
        _ => None,
    })
    .collect::<Vec<_>>();
    if quoted.is_empty() {
        // Kinds without context: clap's own first line (our arguments are already UTF-8 by then).
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        return first.trim_start_matches("error: ").to_owned();
    }
    format!("{}: {}", e.kind(), quoted.join(" "))
}

/// The reason given for input that is not UTF-8.
const NOT_UTF8: &str = "not valid UTF-8";

/// Every env var the parser reads: each flag's, and the env-only inputs.
pub fn env_names() -> impl Iterator<Item = &'static str> {
    ISTIO_FLAGS.iter().flat_map(|s| [s.env, s.extra_env]).flatten().chain([
        ENV_OWNER_GROUPS,
        ENV_OWNER_GROUPS_EXCLUDE,
        ENV_LOOPBACK_CIDR,
        ENV_ENVOY_USER,
        ENV_DRY_RUN_FILE,
    ])
}

/// The env vars [`parse`] reads, taken from `lookup` (`std::env::var_os` for the process's own). A value
/// that is not UTF-8 is an error naming the variable: treating it as unset would silently apply the default.
pub fn environment(
    lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<std::collections::HashMap<&'static str, String>, FlagError> {
    env_names()
        .filter_map(|name| Some((name, lookup(name)?)))
        .map(|(name, value)| {
            let value = value.into_string().map_err(|bad| FlagError {
                origin: format!("env {name}"),
                value: bad.to_string_lossy().into_owned(),
                reason: NOT_UTF8.into(),
            })?;
            Ok((name, value))
        })
        .collect()
}

/// Looks up one istio flag: command line, then the additional env var, then the primary one, then the
/// default.
fn raw(matches: &ArgMatches, flag: IstioFlag, env: &dyn Fn(&str) -> Option<String>) -> Raw {
    let spec = flag.spec();
    let cli = matches.try_get_one::<String>(spec.long).ok().flatten().cloned();
    let name = flag.name();
    if let Some(value) = cli {
        return Raw {
            name,
            value,
            origin: Origin::Cli,
        };
    }
    for var in [spec.extra_env, spec.env].into_iter().flatten() {
        if let Some(value) = env(var) {
            return Raw {
                name,
                value,
                origin: Origin::Env(var),
            };
        }
    }
    Raw {
        name,
        value: spec.default.to_owned(),
        origin: Origin::Default,
    }
}

/// istio-iptables' defaults, read from the one place they are written (the flag table, [`IstioFlag::spec`],
/// and capture's own flags): what `capture` resolves to with no flags and an empty environment. The proxy
/// user is 1337 whatever this machine's passwd says (istio's fallback when `$ENVOY_USER` names no user).
impl Default for Invocation {
    fn default() -> Self {
        let no_user = |var: &str| (var == ENV_ENVOY_USER).then(String::new);
        parse(["capture"], &no_user).expect("no flags resolve to the defaults")
    }
}

/// [`Invocation::default`]'s configuration.
impl Default for Config {
    fn default() -> Self {
        Invocation::default().config
    }
}

/// [`Invocation::default`]'s options: apply with the eBPF backend.
impl Default for Options {
    fn default() -> Self {
        Invocation::default().options
    }
}

/// Where [`resolve`] reads its inputs: the parsed command line and the environment.
struct Inputs<'a> {
    matches: &'a ArgMatches,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Inputs<'_> {
    /// One istio flag, by [`raw`]'s precedence.
    fn get(&self, flag: IstioFlag) -> Raw {
        raw(self.matches, flag, self.env)
    }

    /// One of capture's own flags, if given.
    fn ours(&self, name: &str) -> Option<String> {
        self.matches.try_get_one::<String>(name).ok().flatten().cloned()
    }

    /// An env-only input, or its default.
    fn env_only(&self, var: &'static str, default: &'static str) -> Raw {
        env_raw(var, default, self.env)
    }
}

/// Builds the invocation section by section (each builder reads and checks its own flags), then checks the
/// rules that span sections in [`validate`].
fn resolve(action: Action, m: &ArgMatches, env: &dyn Fn(&str) -> Option<String>) -> Result<Invocation, FlagError> {
    let input = Inputs { matches: m, env };
    let backend = our_choice("--backend", input.ours("backend"), Backend::Ebpf)?;
    if action == Action::Status {
        let mut inv = Invocation::default();
        inv.options.backend = backend;
        inv.options.action = Action::Status;
        inv.options.pin_dir = pin_dir(input.ours("pin-dir"));
        return Ok(inv);
    }
    let (proxy_uids, proxy_gids) = proxy_owners(&input)?;
    let Mode {
        mode,
        tproxy_mark,
        tproxy_route_table,
    } = mode(&input)?;
    let Inbound {
        inbound_capture_port,
        inbound_tunnel_port,
        inbound_ports,
        inbound_exclude_ports,
    } = inbound(&input)?;
    let Outbound {
        proxy_port,
        include_cidrs,
        exclude_cidrs,
        outbound_ports,
        outbound_exclude_ports,
        loopback_cidr_v4,
    } = outbound(&input)?;
    let (redirect_dns, capture_all_dns) = dns(&input)?;
    let config = Config {
        proxy_port,
        inbound_capture_port,
        inbound_tunnel_port,
        proxy_uids,
        proxy_gids,
        mode,
        tproxy_mark,
        tproxy_route_table,
        inbound_ports,
        inbound_exclude_ports,
        exclude_interfaces: interfaces(&input.get(IstioFlag::IstioExcludeInterfaces))?,
        include_cidrs,
        exclude_cidrs,
        outbound_ports,
        outbound_exclude_ports,
        kube_virt_interfaces: interfaces(&input.get(IstioFlag::KubeVirtInterfaces))?,
        redirect_dns,
        capture_all_dns,
        drop_invalid: boolean_value(&input.get(IstioFlag::DropInvalid))?,
        dual_stack: boolean_value(&input.get(IstioFlag::DualStack))?,
        owner_groups: owner_groups(&input)?,
        loopback_cidr_v4,
        loopback_accel: match input.ours("loopback-accel") {
            None => false,
            Some(value) => boolean_value(&Raw {
                name: "--loopback-accel".into(),
                value,
                origin: Origin::Cli,
            })?,
        },
    };
    let options = options(&input, action, backend)?;
    // Accepted for compatibility; validated so that a typo is still reported.
    for flag in [
        IstioFlag::CniMode,
        IstioFlag::Reconcile,
        IstioFlag::ForceApply,
        IstioFlag::LogAsJson,
    ] {
        boolean_value(&input.get(flag))?;
    }
    validate(&input, &config, &options)?;
    Ok(Invocation { config, options })
}

/// `-u` and `-g`: the proxy's uids (default: `$ENVOY_USER`'s) and gids (default: the uids, as group ids).
fn proxy_owners(input: &Inputs) -> Result<(Vec<Owner>, Vec<Owner>), FlagError> {
    let uid_raw = input.get(IstioFlag::ProxyUid);
    let proxy_uids = match &uid_raw {
        r if r.value.is_empty() && r.origin == Origin::Default => {
            vec![default_proxy_user(input.env)]
        }
        r => owners(r, Ids::User)?,
    };
    let proxy_gids = match input.get(IstioFlag::ProxyGid) {
        r if r.value.is_empty() && r.origin == Origin::Default => {
            // istio: "same string as the final ProxyUID", read as group ids; an error names both flags.
            let uids = proxy_uids
                .iter()
                .map(|o| o.token.as_str())
                .collect::<Vec<_>>()
                .join(",");
            let name = format!("{} (its default, the list of {})", r.name, uid_raw.origin_name());
            owners(&Raw { value: uids, name, ..r }, Ids::Group)?
        }
        r => owners(&r, Ids::Group)?,
    };
    Ok((proxy_uids, proxy_gids))
}

/// The interception mode section.
struct Mode {
    mode: InterceptionMode,
    tproxy_mark: u32,
    tproxy_route_table: u32,
}

/// `-m`, `-t`, `-r`.
fn mode(input: &Inputs) -> Result<Mode, FlagError> {
    let r = input.get(IstioFlag::IstioInboundInterceptionMode);
    let mode = match r.value.as_str() {
        "" | "REDIRECT" => InterceptionMode::Redirect,
        "TPROXY" => InterceptionMode::Tproxy,
        _ => return Err(r.error("expected REDIRECT or TPROXY")),
    };
    Ok(Mode {
        mode,
        tproxy_mark: number(&input.get(IstioFlag::IstioInboundTproxyMark))?,
        tproxy_route_table: number(&input.get(IstioFlag::IstioInboundTproxyRouteTable))?,
    })
}

/// The inbound section.
struct Inbound {
    inbound_capture_port: u16,
    inbound_tunnel_port: u16,
    inbound_ports: InboundPorts,
    inbound_exclude_ports: Vec<u16>,
}

/// `-z`, `-e`, `-b`, `-d`.
fn inbound(input: &Inputs) -> Result<Inbound, FlagError> {
    let r = input.get(IstioFlag::IstioInboundPorts);
    let inbound_ports = match r.value.as_str() {
        "" => InboundPorts::None,
        "*" => InboundPorts::All,
        _ => InboundPorts::List(ports(&r)?),
    };
    Ok(Inbound {
        inbound_capture_port: port(&input.get(IstioFlag::InboundCapturePort))?,
        inbound_tunnel_port: port(&input.get(IstioFlag::InboundTunnelPort))?,
        inbound_ports,
        inbound_exclude_ports: ports(&input.get(IstioFlag::IstioLocalExcludePorts))?,
    })
}

/// The outbound section.
struct Outbound {
    proxy_port: u16,
    include_cidrs: IncludeCidrs,
    exclude_cidrs: Vec<IpNet>,
    outbound_ports: Vec<u16>,
    outbound_exclude_ports: Vec<u16>,
    loopback_cidr_v4: Ipv4Net,
}

/// `-p`, `-i`, `-x`, `-q`, `-o` and `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`.
fn outbound(input: &Inputs) -> Result<Outbound, FlagError> {
    let include_cidrs = {
        let r = input.get(IstioFlag::IstioServiceCidr);
        if r.value == "*" {
            IncludeCidrs::All
        } else {
            IncludeCidrs::List(cidrs(&r)?)
        }
    };
    let exclude_cidrs = {
        let r = input.get(IstioFlag::IstioServiceExcludeCidr);
        if r.value == "*" {
            return Err(r.error("a wildcard exclude would turn outbound capture off; list CIDRs instead"));
        }
        cidrs(&r)?
    };
    let loopback_cidr_v4 = {
        let r = input.env_only(ENV_LOOPBACK_CIDR, "127.0.0.1/32");
        let net: Ipv4Net = r
            .value
            .parse()
            .map_err(|_| r.error("expected an IPv4 CIDR such as 127.0.0.1/32"))?;
        if !net.addr().is_loopback() || net.prefix_len() < 8 {
            return Err(r.error("expected an IPv4 loopback CIDR with a prefix of /8 to /32"));
        }
        net
    };
    Ok(Outbound {
        proxy_port: port(&input.get(IstioFlag::EnvoyPort))?,
        include_cidrs,
        exclude_cidrs,
        outbound_ports: ports(&input.get(IstioFlag::IstioOutboundPorts))?,
        outbound_exclude_ports: ports(&input.get(IstioFlag::IstioLocalOutboundPortsExclude))?,
        loopback_cidr_v4,
    })
}

/// `--redirect-dns` and `--capture-all-dns`.
fn dns(input: &Inputs) -> Result<(bool, bool), FlagError> {
    Ok((
        boolean_value(&input.get(IstioFlag::RedirectDns))?,
        boolean_value(&input.get(IstioFlag::CaptureAllDns))?,
    ))
}

/// `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`.
fn owner_groups(input: &Inputs) -> Result<OwnerGroups, FlagError> {
    let include = input.env_only(ENV_OWNER_GROUPS, "*");
    let exclude = input.env_only(ENV_OWNER_GROUPS_EXCLUDE, "");
    if include.value == "*" {
        return Ok(OwnerGroups::AllExcept(owners(&exclude, Ids::Group)?));
    }
    let groups = owners(&include, Ids::Group)?;
    if groups.len() > MAX_OWNER_GROUPS {
        return Err(include.error(format!("at most {MAX_OWNER_GROUPS} groups, got {}", groups.len())));
    }
    Ok(OwnerGroups::Only(groups))
}

/// How and where to apply: capture's own flags and istio's behaviour flags.
fn options(input: &Inputs, action: Action, backend: Backend) -> Result<Options, FlagError> {
    let r = input.get(IstioFlag::ForceIptablesBinary);
    let iptables_flavour = match r.value.as_str() {
        "" => IptablesFlavour::Auto,
        value => IptablesFlavour::from_str(value, false).map_err(|_| {
            r.error(format!(
                "expected {}",
                one_of(&choices::<IptablesFlavour>(), "an empty value")
            ))
        })?,
    };
    let r = input.get(IstioFlag::ProbeTimeout);
    let probe_timeout =
        go_duration(&r.value).ok_or_else(|| r.error("expected a duration such as 5s, 500ms or 1m30s"))?;
    let non_empty_path = |r: Raw| (!r.value.is_empty()).then(|| PathBuf::from(r.value));
    let cleanup_only = boolean_value(&input.get(IstioFlag::CleanupOnly))?;
    Ok(Options {
        action: if cleanup_only { Action::Clean } else { action },
        backend,
        cgroup: input.ours("cgroup").map(PathBuf::from),
        pin_dir: pin_dir(input.ours("pin-dir")),
        log_level: our_choice("--log-level", input.ours("log-level"), LogLevel::Off)?,
        resolv_conf: input
            .ours("resolv-conf")
            .map_or_else(|| PathBuf::from(DEFAULT_RESOLV_CONF), PathBuf::from),
        dry_run: boolean_value(&input.get(IstioFlag::DryRun))?,
        dry_run_file: (input.env)(ENV_DRY_RUN_FILE)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        network_namespace: non_empty_path(input.get(IstioFlag::NetworkNamespace)),
        run_validation: boolean_value(&input.get(IstioFlag::RunValidation))?,
        skip_rule_apply: boolean_value(&input.get(IstioFlag::SkipRuleApply))?,
        probe_port: port(&input.get(IstioFlag::IptablesProbePort))?,
        probe_timeout,
        native_nftables: boolean_value(&input.get(IstioFlag::NativeNftables))?,
        iptables_flavour,
    })
}

/// The rules that span sections: what a backend cannot do. Every value has been checked on its own by now.
fn validate(input: &Inputs, config: &Config, options: &Options) -> Result<(), FlagError> {
    let backend = options.backend;
    if config.loopback_accel && backend == Backend::Iptables {
        return Err(FlagError {
            origin: "--loopback-accel".into(),
            value: "true".into(),
            reason: "loopback acceleration is an eBPF program; drop the flag or use --backend ebpf".into(),
        });
    }
    // `auto` is held to both backends' limits, so that the same flags are valid on every kernel.
    if backend != Backend::Iptables {
        for (ids, flag) in [
            (&config.proxy_uids, IstioFlag::ProxyUid),
            (&config.proxy_gids, IstioFlag::ProxyGid),
        ] {
            if ids.len() > MAX_PROXY_IDS {
                let tokens: Vec<&str> = ids.iter().map(|o| o.token.as_str()).collect();
                return Err(input.get(flag).error_for(
                    &tokens.join(","),
                    format!("the eBPF backend takes at most {MAX_PROXY_IDS} ids (use --backend iptables for more)"),
                ));
            }
        }
    }
    if options.native_nftables && backend != Backend::Ebpf {
        // The raw value, so that the error names the env var when that is where it came from.
        return Err(input
            .get(IstioFlag::NativeNftables)
            .error("the iptables backend writes iptables rules, not nftables; drop the flag or use --backend ebpf"));
    }
    Ok(())
}

/// The names of a [`ValueEnum`]'s values, in declaration order.
fn choices<T: ValueEnum>() -> Vec<String> {
    T::value_variants()
        .iter()
        .filter_map(|v| Some(v.to_possible_value()?.get_name().to_owned()))
        .collect()
}

/// `a, b or last`.
fn one_of(names: &[String], last: &str) -> String {
    let mut out = names.join(", ");
    out.push_str(" or ");
    out.push_str(last);
    out
}

/// One of capture's own enum flags: `default` when not given, else one of its values, exactly spelt.
fn our_choice<T: ValueEnum>(flag: &str, given: Option<String>, default: T) -> Result<T, FlagError> {
    let Some(value) = given else {
        return Ok(default);
    };
    T::from_str(&value, false).map_err(|_| {
        let mut names = choices::<T>();
        let last = names.pop().unwrap_or_default();
        FlagError {
            origin: flag.into(),
            value,
            reason: format!("expected {}", one_of(&names, &last)),
        }
    })
}

fn pin_dir(given: Option<String>) -> PathBuf {
    given.map_or_else(|| PathBuf::from(DEFAULT_PIN_DIR), PathBuf::from)
}

/// A pseudo-spec for env-only inputs, so their errors read like the flags'.
fn env_raw(var: &'static str, default: &'static str, env: &dyn Fn(&str) -> Option<String>) -> Raw {
    let (value, origin) = match env(var) {
        Some(value) => (value, Origin::Env(var)),
        None => (default.to_owned(), Origin::Default),
    };
    Raw {
        name: var.to_owned(),
        value,
        origin,
    }
}

/// istio's `config.Split`: split on `,` and drop empty tokens (no trimming).
fn split(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').filter(|t| !t.is_empty())
}

fn parse_port(token: &str) -> Option<u16> {
    token.parse::<u16>().ok().filter(|p| *p != 0)
}

const PORT_REASON: &str = "expected a port number from 1 to 65535";

fn port(r: &Raw) -> Result<u16, FlagError> {
    parse_port(&r.value).ok_or_else(|| r.error(PORT_REASON))
}

fn ports(r: &Raw) -> Result<Vec<u16>, FlagError> {
    split(&r.value)
        .map(|t| parse_port(t).ok_or_else(|| r.error_for(t, PORT_REASON)))
        .collect()
}

fn number(r: &Raw) -> Result<u32, FlagError> {
    r.value.parse().map_err(|_| r.error("expected a non-negative integer"))
}

fn cidrs(r: &Raw) -> Result<Vec<IpNet>, FlagError> {
    split(&r.value)
        .map(|t| {
            t.parse::<IpNet>()
                .map_err(|_| r.error_for(t, "expected a CIDR such as 10.0.0.0/8 or 2001:db8::/32"))
        })
        .collect()
}

/// Linux interface names: 1–15 bytes, no `/`, whitespace or `:` (iptables' `+` wildcard suffix is allowed).
fn interfaces(r: &Raw) -> Result<Vec<String>, FlagError> {
    const IFNAMSIZ: usize = 16;
    split(&r.value)
        .map(|t| {
            let ok = t.len() < IFNAMSIZ
                && !t.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
            if ok {
                Ok(t.to_owned())
            } else {
                Err(r.error_for(t, "expected an interface name of at most 15 characters"))
            }
        })
        .collect()
}

/// pflag's `ParseBool`.
fn boolean_value(r: &Raw) -> Result<bool, FlagError> {
    match r.value.as_str() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(r.error("expected a boolean (true/false, 1/0, t/f)")),
    }
}

/// Whether a list is of users or of groups.
#[derive(Clone, Copy)]
enum Ids {
    User,
    Group,
}

/// A comma list of uids or gids, numbers or names (names resolved through the system's user database).
fn owners(r: &Raw, ids: Ids) -> Result<Vec<Owner>, FlagError> {
    split(&r.value)
        .map(|t| {
            let id = match t.parse::<u32>() {
                Ok(id) => Some(id),
                Err(_) => lookup(t, ids),
            };
            id.map(|id| Owner {
                token: t.to_owned(),
                id,
            })
            .ok_or_else(|| {
                let what = match ids {
                    Ids::User => "a uid or the name of an existing user",
                    Ids::Group => "a gid or the name of an existing group",
                };
                r.error_for(t, format!("expected {what}"))
            })
        })
        .collect()
}

fn lookup(name: &str, ids: Ids) -> Option<u32> {
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '\0') {
        return None;
    }
    match ids {
        Ids::User => nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw()),
        Ids::Group => nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw()),
    }
}

/// istio's default `-u`: the uid of `$ENVOY_USER` (default istio-proxy) if that user exists, else 1337.
fn default_proxy_user(env: &dyn Fn(&str) -> Option<String>) -> Owner {
    let user = env(ENV_ENVOY_USER).unwrap_or_else(|| DEFAULT_ENVOY_USER.into());
    let id = lookup(&user, Ids::User).unwrap_or(DEFAULT_PROXY_ID);
    Owner {
        token: id.to_string(),
        id,
    }
}

/// A Go `time.ParseDuration` string: a sequence of decimal numbers with units (ns, us, µs, ms, s, m, h).
fn go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// The flag table as Markdown, for the README (a test keeps the README in step with [`ISTIO_FLAGS`]).
pub fn markdown_table() -> String {
    let mut out = String::from("| Short | Long | Env var(s) | Default | Meaning |\n|---|---|---|---|---|\n");
    for spec in ISTIO_FLAGS {
        let short = spec.short.map(|s| format!("`-{s}`")).unwrap_or_default();
        let envs = [spec.env, spec.extra_env]
            .into_iter()
            .flatten()
            .map(|e| format!("`{e}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let default = if spec.default.is_empty() {
            "`\"\"`".to_owned()
        } else {
            format!("`{}`", spec.default)
        };
        out.push_str(&format!(
            "| {short} | `--{}` | {envs} | {default} | {} |\n",
            spec.long, spec.help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of the command (istio's and capture's own) has a long name and short letter of its own, and
    /// every istio flag its own env vars: two alike would make one of them unreachable (clap's own check runs
    /// only when a debug build parses, and none looks at env vars, which capture reads itself).
    #[test]
    fn no_two_flags_share_a_name_letter_or_env_var() {
        let cmd = command();
        let mut longs = std::collections::HashSet::new();
        let mut shorts = std::collections::HashSet::new();
        for arg in cmd.get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(longs.insert(long), "--{long} twice");
            }
            if let Some(short) = arg.get_short() {
                assert!(shorts.insert(short), "-{short} twice");
            }
        }
        for flag in IstioFlag::VARIANTS {
            assert!(longs.contains(flag.spec().long), "{flag:?} is not in the command");
        }
        let mut envs = std::collections::HashSet::new();
        for env in ISTIO_FLAGS.iter().flat_map(|s| [s.env, s.extra_env]).flatten() {
            assert!(envs.insert(env), "${env} read by two flags");
        }
    }

    #[test]
    fn our_enums_are_refused_with_their_values_in_order() {
        let reason = |args: &[&str]| match parse(args.iter().copied(), &|_| None) {
            Err(ParseError::Flag(e)) => e.to_string(),
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(
            reason(&["capture", "--backend", "bpf"]),
            r#"invalid value "bpf" for --backend: expected ebpf, iptables or auto"#
        );
        assert_eq!(
            reason(&["capture", "--log-level=Debug"]),
            r#"invalid value "Debug" for --log-level: expected off, error, warn, info, debug or trace"#
        );
        assert_eq!(
            reason(&["capture", "--force-iptables-binary", "auto"]),
            r#"invalid value "auto" for --force-iptables-binary: expected legacy, nft or an empty value"#
        );
    }
}
