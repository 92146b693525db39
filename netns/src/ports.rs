//! Free TCP ports on 127.0.0.1 for the workspace's tests, which run as many processes at once.
//!
//! Ports are taken below the kernel's ephemeral range (32768 and up by default): a port from
//! that range can be given to some other test's outgoing connection before the server under
//! test binds it. A port found free here is bound by a child a moment later, so each port
//! handed out is reserved for the life of this process by a lock on a file named after it
//! (`$TMPDIR/ferry-test-ports/<port>`), which every test process takes before handing that
//! port out; a second lock from this process fails too, so no port is given twice. Children
//! do not inherit the lock.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The first port handed out, and how many follow it.
const FIRST: u16 = 20000;
const PORTS: u32 = 12000;

/// A free TCP port on 127.0.0.1, reserved for this process's life.
pub fn free_port() -> u16 {
    // Each process walks the range from its own place, so parallel test processes rarely
    // try the same ports.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % PORTS,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let dir = std::env::temp_dir().join("ferry-test-ports");
    std::fs::create_dir_all(&dir).expect("the port reservation directory");
    for _ in 0..PORTS {
        let port = FIRST + (NEXT.fetch_add(1, Ordering::Relaxed) % PORTS) as u16;
        let Ok(lock) = std::fs::File::create(dir.join(port.to_string())) else {
            continue;
        };
        if lock.try_lock().is_ok() && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            // Held until this process exits.
            std::mem::forget(lock);
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", u32::from(FIRST) + PORTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_handed_out_once_and_is_free() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        assert!((FIRST..FIRST + PORTS as u16).contains(&a));
        TcpListener::bind((Ipv4Addr::LOCALHOST, a)).expect("a is free");
        // Reserved: a second lock on it fails while this process lives.
        let again = std::fs::File::create(
            std::env::temp_dir()
                .join("ferry-test-ports")
                .join(a.to_string()),
        )
        .unwrap();
        assert!(again.try_lock().is_err());
    }
}
