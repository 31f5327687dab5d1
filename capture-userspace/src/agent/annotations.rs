//! Which pods the Kubernetes source captures, and with which istio-iptables flags.
//!
//! The agent takes the place of what Istio runs after injection. With the injector in CNI mode
//! (`pilot.cni.enabled`), the injector writes the effective capture settings onto the pod as annotations
//! and adds an `istio-validation` init container instead of `istio-init`; the istio-cni plugin then reads
//! the pod and calls istio-iptables for it. [`decide`] reproduces that plugin's two steps on the same
//! pod object (Istio master, `cni/pkg/plugin/plugin.go` and `sidecar_redirect.go`):
//!
//! 1. Which pods: not host-network (the CNI is never called for those), no `istio-init` container (the
//!    pod captures itself), an `istio-proxy` container (regular or native sidecar) running `proxy sidecar`
//!    without `DISABLE_ENVOY`, injection not turned off by the `sidecar.istio.io/inject` label or
//!    annotation (the label wins), a `sidecar.istio.io/status` annotation (the injector's mark), not an
//!    ambient pod, and an interception mode other than `NONE`.
//! 2. Which flags: each annotation or its CNI default, the proxy's uid/gid from the `istio-proxy`
//!    container's security context, and DNS, dual-stack and invalid-drop from its env.
//!
//! The table of annotations and flags is in the README (*Running as a node agent*).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};

/// The sidecar's container name, as the injector writes it.
pub const PROXY_CONTAINER: &str = "istio-proxy";
/// The init container of injection without CNI: it captures the pod by itself.
pub const INIT_CONTAINER: &str = "istio-init";

/// The injector's mark on every pod it injected.
pub const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Turns injection off, as a label (preferred) or an annotation.
pub const INJECT_KEY: &str = "sidecar.istio.io/inject";
/// `REDIRECT`, `TPROXY` or `NONE`.
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
/// The pilot-agent status port, excluded from inbound capture.
pub const STATUS_PORT: &str = "status.sidecar.istio.io/port";
/// Outbound destinations captured (`-i`).
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
/// Outbound destinations never captured (`-x`).
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// Inbound ports captured (`-b`).
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
/// Inbound ports never captured (`-d`).
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// Outbound ports captured to any destination (`-q`).
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
/// Outbound ports never captured (`-o`).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// Interfaces whose traffic is never captured (`-c`).
pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
/// Interfaces whose inbound traffic counts as outbound (`-k`); wins over [`KUBEVIRT_INTERFACES`].
pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
/// The deprecated name of [`REROUTE_VIRTUAL_INTERFACES`].
pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
/// Set by istio-cni on pods that ztunnel captures (ambient mode).
pub const AMBIENT_REDIRECTION: &str = "ambient.istio.io/redirection";
/// The ambient dataplane-mode label.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// Ports Istio always keeps out of inbound capture: pilot-agent's status, the health check, Envoy's stats.
const ALWAYS_EXCLUDED_INBOUND: &str = "15020,15021,15090";
/// istio-cni's default for both `-d` and `-o` when the pod has no annotation: the status port.
const DEFAULT_EXCLUDED_PORT: &str = "15020";
/// The proxy's uid and gid when its container does not run as a non-root id.
const DEFAULT_PROXY_ID: i64 = 1337;

/// Why a pod is not captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The pod uses the node's network namespace: capturing it would capture the node.
    HostNetwork,
    /// The pod's containers have all ended (`Succeeded` or `Failed`): there is nothing left to capture.
    Finished,
    /// The pod has an `istio-init` container, which applies capture itself.
    IstioInit,
    /// No `istio-proxy` container: no sidecar to send traffic to.
    NoSidecar,
    /// The `istio-proxy` container is a gateway (`proxy router`), not a sidecar.
    NotSidecar(String),
    /// `DISABLE_ENVOY` is true on the `istio-proxy` container.
    EnvoyDisabled,
    /// The `sidecar.istio.io/inject` label or annotation is false.
    InjectionDisabled,
    /// The injector's `sidecar.istio.io/status` annotation is missing.
    NotInjected,
    /// ztunnel captures this pod (ambient mode).
    Ambient,
    /// `sidecar.istio.io/interceptionMode: NONE`.
    InterceptionNone,
    /// An interception mode Istio does not know; istio-cni refuses the pod, so do we.
    BadInterceptionMode(String),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HostNetwork => f.write_str("host network"),
            Self::Finished => f.write_str("finished"),
            Self::IstioInit => f.write_str("has an istio-init container, which captures it"),
            Self::NoSidecar => f.write_str("no istio-proxy container"),
            Self::NotSidecar(kind) => write!(f, "istio-proxy is a {kind}, not a sidecar"),
            Self::EnvoyDisabled => f.write_str("DISABLE_ENVOY on istio-proxy"),
            Self::InjectionDisabled => write!(f, "{INJECT_KEY} is false"),
            Self::NotInjected => write!(f, "no {STATUS_ANNOTATION} annotation"),
            Self::Ambient => f.write_str("ambient mode"),
            Self::InterceptionNone => write!(f, "{INTERCEPTION_MODE} is NONE"),
            Self::BadInterceptionMode(mode) => write!(f, "{INTERCEPTION_MODE} {mode:?} is not REDIRECT or TPROXY"),
        }
    }
}

/// The pod's capture flags, or `None` when the agent leaves it alone (see [`decide`] for why).
pub fn flags(pod: &Pod) -> Option<Vec<String>> {
    decide(pod).ok()
}

/// The istio-iptables flags istio-cni would apply to this pod, or why it would not capture it.
pub fn decide(pod: &Pod) -> Result<Vec<String>, Skip> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let spec = pod.spec.as_ref().ok_or(Skip::NoSidecar)?;

    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Err(Skip::Finished);
    }
    if annotations.get(AMBIENT_REDIRECTION).map(String::as_str) == Some("enabled")
        || labels.get(DATAPLANE_MODE).map(String::as_str) == Some("ambient")
    {
        return Err(Skip::Ambient);
    }
    // Init containers first, as istio-cni lists them: a native sidecar is an init container.
    let containers = || spec.init_containers.iter().flatten().chain(spec.containers.iter());
    if containers().any(|c| c.name == INIT_CONTAINER) {
        return Err(Skip::IstioInit);
    }
    let proxy = containers()
        .find(|c| c.name == PROXY_CONTAINER)
        .ok_or(Skip::NoSidecar)?;
    let env = proxy_env(proxy);
    if env.get("DISABLE_ENVOY").and_then(|v| parse_bool(v)) == Some(true) {
        return Err(Skip::EnvoyDisabled);
    }
    if let Some(args) = proxy.args.as_deref()
        && args.len() >= 2
        && args[0] == "proxy"
        && args[1] != "sidecar"
    {
        return Err(Skip::NotSidecar(args[1].clone()));
    }
    let inject = labels.get(INJECT_KEY).or_else(|| annotations.get(INJECT_KEY));
    if inject.and_then(|v| parse_bool(v)) == Some(false) {
        return Err(Skip::InjectionDisabled);
    }
    if !annotations.contains_key(STATUS_ANNOTATION) {
        return Err(Skip::NotInjected);
    }
    let get = |key: &str, default: &str| annotations.get(key).map_or(default, String::as_str).to_string();

    let mode = get(INTERCEPTION_MODE, "REDIRECT");
    match mode.as_str() {
        "REDIRECT" | "TPROXY" => {}
        "NONE" => return Err(Skip::InterceptionNone),
        _ => return Err(Skip::BadInterceptionMode(mode)),
    }
    let security = proxy.security_context.as_ref();
    let id = |id: Option<i64>| id.filter(|&id| id != 0).unwrap_or(DEFAULT_PROXY_ID).to_string();
    let uid = id(security.and_then(|s| s.run_as_user));
    let gid = id(security.and_then(|s| s.run_as_group));

    let mut flags: Vec<String> = [
        ("-p", "15001".to_string()),
        ("-z", "15006".to_string()),
        ("-u", uid),
        ("-g", gid),
        ("-m", mode),
        ("-i", get(INCLUDE_OUTBOUND_IP_RANGES, "*")),
        ("-x", get(EXCLUDE_OUTBOUND_IP_RANGES, "")),
        ("-b", get(INCLUDE_INBOUND_PORTS, "*")),
        ("-d", exclude_inbound_ports(annotations)),
        ("-o", get(EXCLUDE_OUTBOUND_PORTS, DEFAULT_EXCLUDED_PORT)),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();

    let virtual_interfaces = annotations
        .get(REROUTE_VIRTUAL_INTERFACES)
        .or_else(|| annotations.get(KUBEVIRT_INTERFACES));
    let optional = [
        ("-q", annotations.get(INCLUDE_OUTBOUND_PORTS)),
        ("-k", virtual_interfaces),
        ("-c", annotations.get(EXCLUDE_INTERFACES)),
    ];
    for (flag, value) in optional {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            flags.extend([flag.to_string(), value.clone()]);
        }
    }
    // istio-cni turns capture-all-DNS on together with DNS capture.
    let switches = [
        ("ISTIO_META_DNS_CAPTURE", &["--redirect-dns", "--capture-all-dns"][..]),
        ("ISTIO_DUAL_STACK", &["--dual-stack"][..]),
        ("INVALID_DROP", &["--drop-invalid"][..]),
    ];
    for (var, switch) in switches {
        if env.get(var).and_then(|v| parse_bool(v)) == Some(true) {
            flags.extend(switch.iter().map(|s| s.to_string()));
        }
    }
    Ok(flags)
}

/// `-d`: the annotation (default: the status port), plus the status-port annotation as the injector adds
/// it, plus the ports Istio always excludes, each once, in first-seen order.
fn exclude_inbound_ports(annotations: &BTreeMap<String, String>) -> String {
    let mut ports: Vec<&str> = Vec::new();
    let listed = annotations
        .get(EXCLUDE_INBOUND_PORTS)
        .map_or(DEFAULT_EXCLUDED_PORT, String::as_str);
    let status = annotations
        .get(STATUS_PORT)
        .map(|p| p.trim())
        .filter(|p| !p.is_empty() && *p != "0");
    let all = listed
        .split(',')
        .chain(status)
        .chain(ALWAYS_EXCLUDED_INBOUND.split(','));
    for port in all.map(str::trim).filter(|p| !p.is_empty()) {
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports.join(",")
}

/// The `istio-proxy` container's literal env values (istio-cni reads `value` only, never `valueFrom`).
fn proxy_env(proxy: &Container) -> BTreeMap<&str, &str> {
    let vars = proxy.env.iter().flatten();
    vars.map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or("")))
        .collect()
}

/// Go's `strconv.ParseBool`, which Istio uses for these labels, annotations and env vars.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn exclude_inbound_ports_dedups_in_order() {
        assert_eq!(exclude_inbound_ports(&annotations(&[])), "15020,15021,15090");
        let custom = annotations(&[(EXCLUDE_INBOUND_PORTS, "8081, 15021,,"), (STATUS_PORT, "15030")]);
        assert_eq!(exclude_inbound_ports(&custom), "8081,15021,15030,15020,15090");
        let zero = annotations(&[(EXCLUDE_INBOUND_PORTS, ""), (STATUS_PORT, "0")]);
        assert_eq!(exclude_inbound_ports(&zero), "15020,15021,15090");
    }

    #[test]
    fn parse_bool_is_gos() {
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("yes"), None);
    }
}
