//! The iptables backend applied for real in a throwaway pod namespace with the injector's default flags.

use testkit::{INJECTOR_DEFAULT_FLAGS, Listeners, Pod, REMOTE_V4, capture, connect_as, sa};

const APP: (u32, u32) = (1000, 1000);
const PROXY: (u32, u32) = (1337, 1337);
const REMOTE_PORT: u16 = 8080;

#[test]
fn injector_defaults_redirect_the_app_not_the_proxy_and_clean_restores_the_namespace() {
    let pod = Pod::new("ipt");
    let before = pod.pod.iptables_rules();

    let mut args = vec!["--backend", "iptables"];
    args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    let out = capture(&pod.pod, &args);
    assert!(
        out.status.success(),
        "capture failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(pod.pod.iptables_rules(), before, "capture applied no rules");

    let sidecar = Listeners::start(
        &pod.pod,
        None,
        None,
        &[sa([0, 0, 0, 0], 15001), sa([0, 0, 0, 0], 15006)],
    );
    let remote = Listeners::start(&pod.remote, None, None, &[sa(REMOTE_V4, REMOTE_PORT)]);
    let dst = sa(REMOTE_V4, REMOTE_PORT);

    // The app's connection lands on the sidecar's outbound port, which reads the original destination.
    let local = connect_as(&pod.pod, None, APP, dst).expect("app connection");
    let got = sidecar.next().expect("the app's connection did not reach the sidecar");
    assert_eq!(got.listener, 15001);
    assert_eq!(got.original_dst, Some(dst));
    assert_eq!(got.peer, local);
    assert!(
        remote.drain().is_empty(),
        "the app's connection also reached the remote server"
    );

    // The proxy's own connection goes straight to the remote server.
    connect_as(&pod.pod, None, PROXY, dst).expect("proxy connection");
    let got = remote
        .next()
        .expect("the proxy's connection did not reach the remote server");
    assert_eq!(got.listener, REMOTE_PORT);
    assert!(sidecar.drain().is_empty(), "the proxy's connection was captured");

    // Re-applying is idempotent.
    let applied = pod.pod.iptables_rules();
    let out = capture(&pod.pod, &args);
    assert!(
        out.status.success(),
        "re-apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pod.pod.iptables_rules(), applied, "re-applying changed the rules");

    let mut clean = vec!["clean", "--backend", "iptables"];
    clean.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    let out = capture(&pod.pod, &clean);
    assert!(
        out.status.success(),
        "clean failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pod.pod.iptables_rules(), before, "clean did not restore the namespace");

    // And with capture gone, the app reaches the remote server directly.
    connect_as(&pod.pod, None, APP, dst).expect("app connection after clean");
    assert_eq!(remote.next().map(|a| a.listener), Some(REMOTE_PORT));
}

/// `--run-validation` as istio's CNI mode runs it: rules applied first (as root), then the validation alone
/// as the proxy user, which passes, and as another user, which fails with istio's exit code 126.
#[test]
fn run_validation_passes_as_the_proxy_user_and_fails_otherwise() {
    let pod = Pod::new("vld");
    let mut apply = vec!["--backend", "iptables"];
    apply.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    let out = capture(&pod.pod, &apply);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));

    testkit::assert_validation(&pod.pod, None, &apply, PROXY, APP);
}
