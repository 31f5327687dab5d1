//! An echo server for a test's remote namespace: each connection gets back everything it sends, and is
//! closed after the client's EOF. Stops on drop.

use std::{
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use crate::{CONNECT_TIMEOUT, Netns};

/// A running echo server.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    ns: std::fs::File,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `addr` inside `ns` (a thread per connection).
    pub fn start(ns: &Netns, addr: SocketAddr) -> EchoServer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = ns.spawn(None, move || {
            let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("echo: listen on {addr}: {e}"));
            ready_tx.send(()).expect("ready");
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || {
                    let Ok(mut write) = conn.try_clone() else { return };
                    let mut read = conn;
                    let _ = std::io::copy(&mut read, &mut write);
                    let _ = write.shutdown(Shutdown::Write);
                });
            }
        });
        ready_rx
            .recv_timeout(CONNECT_TIMEOUT)
            .expect("echo server did not start");
        EchoServer {
            stop,
            addr,
            ns: std::fs::File::open(ns.path()).expect("open the echo server's namespace"),
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // One connection from inside the namespace wakes the blocked accept.
        let (addr, ns) = (self.addr, self.ns.try_clone());
        let waker = std::thread::spawn(move || {
            let Ok(ns) = ns else { return };
            if nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                let _ = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT);
            }
        });
        let _ = waker.join();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
