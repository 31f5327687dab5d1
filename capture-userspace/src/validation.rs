//! `--run-validation`: istio's check that capture really redirects (`docs/istio-rules.md#run-validation`).
//!
//! Listeners on the proxy's two ports on localhost; a client dials from localhost to the passthrough
//! address (127.0.0.6 or ::6) on the probe port, once a second. Capture works when a listener accepts a
//! connection whose original destination port is the probe port: the proxy-uid rule (c1) redirected it to
//! the inbound port. Like istio, it only passes when run as a proxy uid.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::sockopt::original_dst;

/// How often the client dials, as istio.
const DIAL_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the probe; `Ok(false)` means capture did not redirect it within `timeout`.
pub fn run(proxy_ports: [u16; 2], probe_port: u16, v6: bool, timeout: Duration) -> Result<bool> {
    let (local, passthrough): (IpAddr, IpAddr) = if v6 {
        (Ipv6Addr::LOCALHOST.into(), Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6).into())
    } else {
        (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::new(127, 0, 0, 6).into())
    };
    let (tx, rx) = mpsc::channel();
    for port in proxy_ports {
        let listener = TcpListener::bind((local, port))
            .with_context(|| format!("validation: listen on {}", SocketAddr::new(local, port)))?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let dst = original_dst(conn.as_fd(), v6).ok();
                if tx.send(dst.map(|d| d.port())).is_err() {
                    return;
                }
            }
        });
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        // A refused dial is expected until capture redirects; the listener thread reports success.
        let _dial = TcpStream::connect_timeout(&SocketAddr::new(passthrough, probe_port), DIAL_INTERVAL);
        let wait = DIAL_INTERVAL.min(deadline.saturating_duration_since(Instant::now()));
        if let Ok(Some(port)) = rx.recv_timeout(wait)
            && port == probe_port
        {
            return Ok(true);
        }
    }
    Ok(false)
}
