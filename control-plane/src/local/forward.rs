//! A port on the host that leads into a pod, as `kubectl port-forward` does: each connection
//! accepted on the host's address is joined to a new connection opened from inside the pod's
//! network namespace. The host's own network is left alone (no interface, route or rule is
//! added), so there is nothing to clean up beyond the listening socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use ferry_netns::Dialer;

use super::LocalError;

/// A running forward; stopped when dropped.
pub struct Forward {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Forward {
    /// Listens on `listen` (port 0: any free port) and forwards to `target` inside the pod
    /// `dialer` opens connections in.
    pub fn start(
        listen: SocketAddr,
        dialer: Dialer,
        target: SocketAddr,
    ) -> Result<Forward, LocalError> {
        let listener = TcpListener::bind(listen).map_err(|source| LocalError::Io {
            what: "listening on",
            path: listen.to_string().into(),
            source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(LocalError::io("listening on", listen.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("port-forward".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let Ok(client) = conn else { continue };
                        let dialer = dialer.clone();
                        let _ = thread::Builder::new()
                            .name("port-forward-conn".into())
                            .spawn(move || join(client, &dialer, target));
                    }
                })
                .map_err(|source| LocalError::Io {
                    what: "starting the forward of",
                    path: addr.to_string().into(),
                    source,
                })?
        };
        Ok(Forward {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// The host address that leads into the pod.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Copies both ways between the host's connection and one opened in the pod, passing on
/// each side's end of stream as a half close.
fn join(client: TcpStream, dialer: &Dialer, target: SocketAddr) {
    let Ok(upstream) = dialer.dial(target, Duration::from_secs(5)) else {
        // Nothing listens in the pod: the host's client sees its connection closed.
        return;
    };
    let _ = upstream.set_read_timeout(None);
    let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let back = thread::spawn(move || pipe(upstream2, client2));
    pipe(client, upstream);
    let _ = back.join();
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
