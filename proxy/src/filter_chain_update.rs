//! Envoy's in-place filter-chain update, for the connections that are open:
//! the chain each live connection runs on, and what a new version of its
//! listener does to it.
//!
//! A listener whose settings (everything but its filter chains, as Envoy's
//! `filterChainOnlyChange` compares them) did not change is updated chain
//! by chain, chains being known by their whole message (fingerprint):
//! - a connection whose chain is still there is never touched;
//! - one whose chain changed only in its `envoy.filters.network.rbac`
//!   filters is re-checked against the new ones: denied, it closes at once
//!   (after `delay_deny`), counted (`<prefix>rbac.denied` and
//!   `listener.<name>.ferry.rbac_recheck_closed`); allowed, it moves to the
//!   new chain and never notices;
//! - one whose chain changed otherwise, or went away, drains: HTTP/1 gets
//!   `Connection: close` on its next response and is closed when idle,
//!   HTTP/2 a GOAWAY that lets its streams finish, TCP the drain deadline.
//!   Nothing is cut mid-request. Stricter than Envoy, which serves a
//!   draining connection's requests under the old chain until it closes,
//!   the requests an HTTP connection still sends follow the chain a new
//!   connection would get (its HTTP filters, RBAC among them, and its
//!   routes), and that chain's network RBAC re-checks the connection too.
//!
//! A listener whose settings changed, or that was removed, drains all its
//! connections, as Envoy does.
//!
//! A connection registers once its chain is chosen, under the same lock an
//! update holds while it publishes a snapshot and walks the connections, so
//! none slips between the two: one that chose from a listener version an
//! update already replaced chooses again from the current one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_model::{ChainKind, ConnectionInfo, FilterChain, Listener};

use crate::drain::Drain;
use crate::rbac::{ConnRbac, Recheck};
use crate::stats::Stats;

/// The live connections, by id, and the listener versions they are
/// measured against.
#[derive(Default)]
pub struct Connections {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Every listener of the current snapshot, bound or not, by name.
    listeners: HashMap<String, Arc<Listener>>,
    conns: HashMap<u64, Arc<LiveConn>>,
    next_id: u64,
}

/// One open downstream connection, once its filter chain is chosen.
pub struct LiveConn {
    /// What chose its chain: a new version of the listener chooses again
    /// from the same facts.
    info: ConnectionInfo,
    /// Its own drain signal (a child of the process's).
    pub drain: Drain,
    /// The chain it runs on; requests of a draining HTTP connection follow
    /// the successor chain. Read lock-free by every request, replaced only
    /// under `state`'s lock.
    chain: ArcSwap<FilterChain>,
    state: Mutex<ConnState>,
    /// The client's certificate chain and when it was accepted (mTLS), for
    /// the revocation re-check when new CRLs arrive.
    peer: Mutex<Option<PeerChain>>,
}

struct PeerChain {
    /// Shared with the other connections of the same client.
    peer: Arc<crate::tls::Peer>,
    at: ferry_tls::rustls::pki_types::UnixTime,
}

struct ConnState {
    /// The listener version the connection was last measured against.
    listener: Arc<Listener>,
    /// Its network RBAC, once the transport is up (TLS done).
    rbac: Option<Arc<ConnRbac>>,
    /// A re-check denied it: it closes (after `delay_deny`), nothing more
    /// is decided about it.
    denied: bool,
}

/// What an update did to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Untouched,
    /// Its chain changed only in network RBAC, which still allows it.
    Kept,
    Drained,
    /// A network RBAC re-check denied it.
    Closed,
}

impl LiveConn {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the client's certificate chain of an mTLS connection.
    pub fn set_peer(&self, peer: Arc<crate::tls::Peer>) {
        *self.peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(PeerChain {
            peer,
            at: ferry_tls::rustls::pki_types::UnixTime::now(),
        });
    }

    /// The chain the connection's next request runs on.
    pub fn chain(&self) -> Arc<FilterChain> {
        self.chain.load_full()
    }

    /// Puts the connection's network RBAC in place once its transport is up
    /// (`make` gets the filters of the chain it runs on now, which an
    /// update may have replaced during the handshake). Returns it with that
    /// chain.
    pub fn attach_rbac(
        &self,
        make: impl FnOnce(&FilterChain) -> Arc<ConnRbac>,
    ) -> (Arc<ConnRbac>, Arc<FilterChain>) {
        let mut st = self.lock();
        let chain = self.chain.load_full();
        let rbac = make(&chain);
        st.rbac = Some(rbac.clone());
        (rbac, chain)
    }

    /// Measures the connection against the current versions of the
    /// listeners (its own missing: removed).
    fn reconsider(&self, listeners: &HashMap<String, Arc<Listener>>) -> Outcome {
        let mut st = self.lock();
        if st.denied {
            // Already on its way out.
            return Outcome::Untouched;
        }
        let Some(l) = listeners.get(&st.listener.name) else {
            return self.start_draining();
        };
        if Arc::ptr_eq(&st.listener, l) || st.listener.fingerprint == l.fingerprint {
            st.listener = l.clone();
            return Outcome::Untouched;
        }
        if st.listener.settings_fingerprint != l.settings_fingerprint {
            // A full listener update: everything drains, under the old
            // configuration.
            return self.start_draining();
        }
        st.listener = l.clone();
        let current = self.chain.load_full();
        if l.has_chain(current.fingerprint) {
            return Outcome::Untouched;
        }
        let successor = l.select_chain(&self.info).cloned();
        let Some(next) = successor else {
            return self.start_draining();
        };
        let recheck = |st: &ConnState| st.rbac.as_ref().map(|r| r.recheck(&next.rbac));
        if next.fingerprint_without_network_rbac == current.fingerprint_without_network_rbac {
            return match recheck(&st) {
                Some(Recheck::Denied(delay)) => {
                    st.denied = true;
                    close_after(&self.drain, delay);
                    Outcome::Closed
                }
                // Allowed, or not evaluated yet (the handshake is under
                // way): the new chain's RBAC is the connection's from now.
                Some(Recheck::Allowed) | None => {
                    self.chain.store(next);
                    Outcome::Kept
                }
            };
        }
        let outcome = self.start_draining();
        let both_http = matches!(
            (&current.kind, &next.kind),
            (ChainKind::Http(_), ChainKind::Http(_))
        );
        if both_http && current.tls.is_some() == next.tls.is_some() {
            self.chain.store(next.clone());
        }
        if (!current.rbac.is_empty() || !next.rbac.is_empty())
            && let Some(Recheck::Denied(delay)) = recheck(&st)
        {
            st.denied = true;
            close_after(&self.drain, delay);
            return Outcome::Closed;
        }
        outcome
    }

    /// Starts the connection's drain; counted only the first time.
    fn start_draining(&self) -> Outcome {
        if self.drain.is_draining() {
            return Outcome::Untouched;
        }
        self.drain.start();
        Outcome::Drained
    }
}

/// Closes a connection a re-check denied, after the filter's `delay_deny`.
fn close_after(drain: &Drain, delay: Option<Duration>) {
    match (delay, tokio::runtime::Handle::try_current()) {
        (Some(d), Ok(rt)) if !d.is_zero() => {
            let drain = drain.clone();
            rt.spawn(async move {
                tokio::time::sleep(d).await;
                drain.close();
            });
        }
        _ => drain.close(),
    }
}

/// A connection's place among the live ones; dropping it (when the
/// connection ends) takes it out.
pub struct Registered {
    conns: Arc<Connections>,
    id: u64,
    pub live: Arc<LiveConn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.lock().conns.remove(&self.id);
    }
}

/// The per-listener counts of one update.
#[derive(Default)]
struct Counts {
    kept: u64,
    drained: u64,
    closed: u64,
}

/// The lock an update holds from publishing a snapshot to walking the
/// connections.
pub struct Updating<'a>(MutexGuard<'a, Inner>);

impl Connections {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many connections are open (their chain chosen).
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a connection accepted on `listener` (or handed over to
    /// it) with its chain chosen from `info`; a new drain signal is made
    /// from `process`. `None` when no chain matches (the connection is to
    /// be closed).
    pub fn register(
        self: &Arc<Self>,
        listener: &Arc<Listener>,
        info: ConnectionInfo,
        process: &Drain,
    ) -> Option<Registered> {
        // Chosen outside the lock; again inside only when an update
        // replaced the listener meanwhile.
        let chosen = listener.select_chain(&info).cloned();
        let mut inner = self.lock();
        let (listener, chain, removed) = match inner.listeners.get(&listener.name) {
            Some(cur) if cur.fingerprint == listener.fingerprint => (cur.clone(), chosen?, false),
            Some(cur) => (cur.clone(), cur.select_chain(&info)?.clone(), false),
            // Removed since it accepted the connection: it drains at once.
            None => (listener.clone(), chosen?, !inner.listeners.is_empty()),
        };
        let drain = process.child();
        if removed {
            drain.start();
        }
        let live = Arc::new(LiveConn {
            info,
            drain,
            chain: ArcSwap::new(chain),
            state: Mutex::new(ConnState {
                listener,
                rbac: None,
                denied: false,
            }),
            peer: Mutex::new(None),
        });
        let id = inner.next_id;
        inner.next_id += 1;
        inner.conns.insert(id, live.clone());
        Some(Registered {
            conns: self.clone(),
            id,
            live,
        })
    }

    /// Re-checks the client certificates of open mTLS connections against
    /// the validation now in force (new CRLs, from SDS or a new chain) and
    /// closes those whose certificate is now revoked, as ztunnel does;
    /// counted in `listener.<name>.ferry.tls_revoked_closed`. Expiry since
    /// the handshake and root rotations close nothing (the chain is checked
    /// at its handshake's time; only a revocation counts).
    pub fn close_revoked(&self, secrets: &dyn ferry_tls::Secrets, stats: &Stats) {
        let conns: Vec<Arc<LiveConn>> = self.lock().conns.values().cloned().collect();
        let mut checks: HashMap<usize, Option<ferry_tls::PeerCheck>> = HashMap::new();
        for conn in conns {
            let peer = conn.peer.lock().unwrap_or_else(|p| p.into_inner());
            let Some(peer) = peer.as_ref() else { continue };
            let chain = conn.chain();
            let Some(tls) = &chain.tls else { continue };
            let check = checks
                .entry(Arc::as_ptr(&chain) as usize)
                .or_insert_with(|| ferry_tls::downstream_peer_check(tls, secrets));
            let Some(check) = check else { continue };
            if check.revoked(&peer.peer.certs, peer.at, true) && !conn.drain.is_draining() {
                let name = conn.lock().listener.name.clone();
                stats
                    .counter(&format!("listener.{name}.ferry.tls_revoked_closed"))
                    .inc();
                tracing::info!(listener.name = %name, src.addr = ?conn.info.source, "closing a connection whose client certificate is now revoked");
                conn.drain.close();
            }
        }
    }

    /// Takes the lock an update holds: publish the snapshot, then call
    /// [`Updating::update`].
    pub fn updating(&self) -> Updating<'_> {
        Updating(self.lock())
    }
}

impl Updating<'_> {
    /// Measures every open connection against the new `listeners` (all of
    /// them, bound or not), counting in `stats` with Envoy's
    /// `listener_manager.*` names and Ferry's per-listener ones.
    pub fn update(mut self, listeners: &[Arc<Listener>], stats: &Stats) {
        let inner = &mut *self.0;
        let new: HashMap<String, Arc<Listener>> = listeners
            .iter()
            .map(|l| (l.name.clone(), l.clone()))
            .collect();
        let count = |name: &str| stats.counter(&format!("listener_manager.{name}")).inc();
        for (name, l) in &new {
            match inner.listeners.get(name) {
                None => count("listener_added"),
                Some(old) if old.fingerprint == l.fingerprint => {}
                Some(old) => {
                    count("listener_modified");
                    if old.settings_fingerprint == l.settings_fingerprint {
                        count("listener_in_place_updated");
                    }
                }
            }
        }
        for name in inner.listeners.keys() {
            if !new.contains_key(name) {
                count("listener_removed");
            }
        }
        let mut counts: HashMap<String, Counts> = HashMap::new();
        for conn in inner.conns.values() {
            let outcome = conn.reconsider(&new);
            if outcome == Outcome::Untouched {
                continue;
            }
            let name = conn.lock().listener.name.clone();
            let c = counts.entry(name).or_default();
            match outcome {
                Outcome::Untouched => {}
                Outcome::Kept => c.kept += 1,
                Outcome::Drained => c.drained += 1,
                Outcome::Closed => c.closed += 1,
            }
        }
        for (name, c) in counts {
            let counter = |what: &str| stats.counter(&format!("listener.{name}.ferry.{what}"));
            counter("rbac_recheck_kept").add(c.kept);
            counter("rbac_recheck_closed").add(c.closed);
            counter("cx_drained_by_update").add(c.drained);
            tracing::info!(
                listener.name = %name,
                connections.kept = c.kept,
                connections.drained = c.drained,
                connections.closed = c.closed,
                "listener updated: connections re-checked, drained or closed"
            );
        }
        inner.listeners = new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::rbac::{
        Action, Enforcement, NetworkRbac, Permission, Policy, Principal, Rbac,
    };
    use ferry_model::{
        FilterChainMatch, HttpCodec, HttpConnectionManager, ListenerFilters, RouteSource, TcpProxy,
    };

    fn tcp(cluster: &str) -> ChainKind {
        ChainKind::Tcp(TcpProxy {
            stat_prefix: cluster.into(),
            cluster: cluster.into(),
            weighted: Vec::new(),
            idle_timeout: None,
            access_logs: Default::default(),
            max_connect_attempts: 1,
            max_downstream_connection_duration: None,
            hash_source_ip: false,
            tunneling: None,
        })
    }

    fn http(routes: &str) -> ChainKind {
        ChainKind::Http(HttpConnectionManager {
            stat_prefix: "in".into(),
            codec: HttpCodec::Auto,
            routes: RouteSource::Rds(routes.into()),
            generate_request_id: false,
            idle_timeout: None,
            stream_idle_timeout: None,
            request_timeout: None,
            use_remote_address: false,
            forward_client_cert: Default::default(),
            client_cert_details: Default::default(),
            http_filters: Vec::new(),
            client_trust: Default::default(),
            suppress_envoy_headers: false,
            path_normalization: Default::default(),
            protocol: Default::default(),
            server_header: ferry_model::listener::ServerHeader::PassThrough,
            upgrades: Vec::new(),
            access_logs: Default::default(),
            tracing: None,
        })
    }

    /// Network RBAC allowing only `source`.
    fn allow_only(source: &str) -> Arc<NetworkRbac> {
        allow_only_delayed(source, None)
    }

    fn allow_only_delayed(source: &str, delay_deny: Option<Duration>) -> Arc<NetworkRbac> {
        Arc::new(NetworkRbac {
            stat_prefix: "tcp.".into(),
            rules: Some(Arc::new(Rbac {
                action: Action::Allow,
                policies: vec![Policy {
                    name: "p".into(),
                    permissions: vec![Permission::Any],
                    principals: vec![Principal::DirectRemoteIp(
                        ferry_model::CidrRange::new(source.parse().unwrap(), 32).unwrap(),
                    )],
                }],
            })),
            shadow_rules: None,
            shadow_rules_stat_prefix: String::new(),
            enforcement: Enforcement::OneTimeOnFirstByte,
            delay_deny,
        })
    }

    /// A chain on destination `port`; `content` stands for the rest of its
    /// message and `rbac` for its network RBAC (both in the fingerprints).
    fn chain(port: u16, kind: ChainKind, content: u64, rbac: Option<&str>) -> Arc<FilterChain> {
        let bare = u64::from(port) << 32 | content;
        Arc::new(FilterChain {
            name: format!("chain_{port}"),
            fingerprint: rbac.map_or(bare, |r| {
                bare ^ r.bytes().fold(7, |h, b| h * 31 + u64::from(b))
            }),
            fingerprint_without_network_rbac: bare,
            filter_chain_match: FilterChainMatch {
                destination_port: Some(port),
                ..Default::default()
            },
            tls: None,
            rbac: rbac.map(allow_only).into_iter().collect(),
            ext_authz: Vec::new(),
            set_filter_state: Vec::new(),
            kind,
            istio_stats: None,
            metadata_exchange: None,
            request_buffer_limit: None,
        })
    }

    fn listener(name: &str, settings: u64, chains: Vec<Arc<FilterChain>>) -> Arc<Listener> {
        let fingerprint = chains
            .iter()
            .fold(settings, |h, c| h.wrapping_mul(31) ^ c.fingerprint);
        Arc::new(Listener {
            name: name.into(),
            fingerprint,
            settings_fingerprint: settings,
            address: "127.0.0.1:15006".parse().unwrap(),
            additional_addresses: Vec::new(),
            bind_to_port: true,
            internal: false,
            use_original_dst: false,
            listener_filters: ListenerFilters::default(),
            detection_timeout: None,
            close_on_detection_timeout: false,
            filter_chains: chains,
            default_chain: None,
            filter_chain_matcher: None,
            tcp_keepalive: None,
            access_logs: Default::default(),
        })
    }

    fn info(port: u16, source: &str) -> ConnectionInfo {
        ConnectionInfo {
            destination: Some(format!("127.0.0.1:{port}").parse().unwrap()),
            source: Some(format!("{source}:40000").parse().unwrap()),
            ..Default::default()
        }
    }

    struct Bed {
        conns: Arc<Connections>,
        process: Drain,
        stats: Arc<Stats>,
    }

    impl Bed {
        fn new(listeners: &[Arc<Listener>]) -> Self {
            let bed = Bed {
                conns: Arc::default(),
                process: Drain::new(),
                stats: Arc::default(),
            };
            bed.update(listeners);
            bed
        }

        fn update(&self, listeners: &[Arc<Listener>]) {
            self.conns.updating().update(listeners, &self.stats);
        }

        /// A connection on `l` from `source` to `port`, its transport up.
        fn open(&self, l: &Arc<Listener>, port: u16, source: &str) -> Registered {
            let r = self
                .conns
                .register(l, info(port, source), &self.process)
                .expect("a chain");
            let downstream = crate::rbac::Downstream {
                peer: format!("{source}:40000").parse().unwrap(),
                local: format!("127.0.0.1:{port}").parse().unwrap(),
                server_name: String::new(),
                tls: None,
                filter_state: None,
            };
            r.live
                .attach_rbac(|c| ConnRbac::new(&c.rbac, self.stats.clone(), downstream));
            r
        }

        fn stat(&self, name: &str) -> u64 {
            self.stats.counter(name).get()
        }
    }

    #[tokio::test]
    async fn only_connections_on_changed_chains_drain() {
        let (a, b) = (chain(1, tcp("a"), 1, None), chain(2, tcp("b"), 1, None));
        let v1 = listener("l", 1, vec![a.clone(), b]);
        let bed = Bed::new(std::slice::from_ref(&v1));
        let on_a = bed.open(&v1, 1, "10.0.0.1");
        let on_b = bed.open(&v1, 2, "10.0.0.1");
        // Chain b's cluster changes; a is the same message.
        let v2 = listener("l", 1, vec![chain(2, tcp("b2"), 2, None), a]);
        bed.update(std::slice::from_ref(&v2));
        assert!(
            !on_a.live.drain.is_draining(),
            "an unchanged chain is untouched"
        );
        assert!(on_b.live.drain.is_draining() && !on_b.live.drain.is_closing());
        assert_eq!(bed.stat("listener_manager.listener_in_place_updated"), 1);
        assert_eq!(bed.stat("listener_manager.listener_modified"), 1);
        assert_eq!(bed.stat("listener.l.ferry.cx_drained_by_update"), 1);
        // The same version again changes nothing.
        bed.update(std::slice::from_ref(&v2));
        assert_eq!(bed.stat("listener_manager.listener_modified"), 1);
        // Other settings: a full update, everything drains.
        let v3 = listener("l", 2, v2.filter_chains.clone());
        bed.update(&[v3]);
        assert!(on_a.live.drain.is_draining());
        assert_eq!(bed.stat("listener_manager.listener_in_place_updated"), 1);
        assert_eq!(bed.stat("listener_manager.listener_modified"), 2);
        // A draining connection is counted once.
        bed.update(&[listener("l", 3, v2.filter_chains.clone())]);
        assert_eq!(bed.stat("listener.l.ferry.cx_drained_by_update"), 2);
        assert_eq!(bed.conns.len(), 2);
        drop((on_a, on_b));
        assert!(bed.conns.is_empty(), "closed connections leave");
    }

    #[tokio::test]
    async fn a_removed_listener_drains_and_late_connections_choose_anew() {
        let v1 = listener("l", 1, vec![chain(1, tcp("a"), 1, None)]);
        let other = listener("o", 1, vec![chain(1, tcp("o"), 1, None)]);
        let bed = Bed::new(&[v1.clone(), other.clone()]);
        let on_other = bed.open(&other, 1, "10.0.0.1");
        // A connection that chose from v1 registers after v2 replaced it:
        // it runs on v2's chain.
        let v2 = listener("l", 1, vec![chain(1, tcp("a2"), 2, None)]);
        bed.update(&[v2.clone(), other.clone()]);
        let late = bed.open(&v1, 1, "10.0.0.1");
        assert!(Arc::ptr_eq(&late.live.chain(), &v2.filter_chains[0]));
        assert!(!late.live.drain.is_draining());
        // Removed: its connections drain; the other listener's do not.
        bed.update(std::slice::from_ref(&other));
        assert!(late.live.drain.is_draining());
        assert!(!on_other.live.drain.is_draining());
        assert_eq!(bed.stat("listener_manager.listener_removed"), 1);
        // One that chose from it afterwards drains at once.
        let later = bed.open(&v2, 1, "10.0.0.1");
        assert!(later.live.drain.is_draining());
    }

    #[tokio::test]
    async fn a_network_rbac_change_closes_only_the_denied() {
        // No policy at first: both clients connect.
        let open = listener("l", 1, vec![chain(9, tcp("a"), 1, None)]);
        let bed = Bed::new(std::slice::from_ref(&open));
        let x = bed.open(&open, 9, "10.0.0.1");
        let y = bed.open(&open, 9, "10.0.0.2");
        // Now only 10.0.0.1 may connect.
        let v2 = listener("l", 1, vec![chain(9, tcp("a"), 1, Some("10.0.0.1"))]);
        bed.update(std::slice::from_ref(&v2));
        assert!(!x.live.drain.is_draining(), "still allowed: untouched");
        assert!(Arc::ptr_eq(&x.live.chain(), &v2.filter_chains[0]));
        assert!(y.live.drain.is_closing(), "denied: closed at once");
        assert_eq!(bed.stat("listener.l.ferry.rbac_recheck_kept"), 1);
        assert_eq!(bed.stat("listener.l.ferry.rbac_recheck_closed"), 1);
        assert_eq!(bed.stat("listener.l.ferry.cx_drained_by_update"), 0);
        assert_eq!(bed.stat("tcp.rbac.denied"), 1);
        // The kept one is measured against its new chain from now on.
        let v3 = listener("l", 1, vec![chain(9, tcp("a"), 1, Some("10.0.0.9"))]);
        bed.update(&[v3]);
        assert!(x.live.drain.is_closing());
        assert_eq!(bed.stat("tcp.rbac.denied"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_denied_connection_closes_after_delay_deny() {
        let open = listener("l", 1, vec![chain(9, tcp("a"), 1, None)]);
        let bed = Bed::new(std::slice::from_ref(&open));
        let c = bed.open(&open, 9, "10.0.0.2");
        let mut denying = chain(9, tcp("a"), 1, Some("10.0.0.1"));
        let delay = Duration::from_secs(2);
        if let Some(c) = Arc::get_mut(&mut denying) {
            c.rbac = vec![allow_only_delayed("10.0.0.1", Some(delay))];
        }
        bed.update(&[listener("l", 1, vec![denying])]);
        assert!(!c.live.drain.is_closing(), "held for delay_deny");
        tokio::time::sleep(delay + Duration::from_millis(10)).await;
        assert!(c.live.drain.is_closing());
        // Decided once: a later update neither counts nor closes it again.
        bed.update(&[listener(
            "l",
            1,
            vec![chain(9, tcp("a"), 1, Some("10.0.0.7"))],
        )]);
        assert_eq!(bed.stat("listener.l.ferry.rbac_recheck_closed"), 1);
        assert_eq!(bed.stat("tcp.rbac.denied"), 1);
    }

    #[tokio::test]
    async fn requests_of_a_draining_http_connection_follow_the_new_chain() {
        let v1 = listener("l", 1, vec![chain(80, http("r1"), 1, None)]);
        let bed = Bed::new(std::slice::from_ref(&v1));
        let c = bed.open(&v1, 80, "10.0.0.1");
        let v2 = listener("l", 1, vec![chain(80, http("r2"), 2, None)]);
        bed.update(std::slice::from_ref(&v2));
        assert!(c.live.drain.is_draining() && !c.live.drain.is_closing());
        assert!(Arc::ptr_eq(&c.live.chain(), &v2.filter_chains[0]));
        // A TCP chain in its place: the connection drains on its own chain.
        let v3 = listener("l", 1, vec![chain(80, tcp("t"), 3, None)]);
        bed.update(&[v3]);
        assert!(Arc::ptr_eq(&c.live.chain(), &v2.filter_chains[0]));
    }

    /// A client certificate with `id` as its URI SAN.
    fn client_cert(id: &str) -> ferry_tls::rustls::pki_types::CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        params.self_signed(&key).unwrap().der().clone()
    }

    /// The connections of one client share its chain and what was read of
    /// it; another client's chain is another entry, and a chain no
    /// connection holds any more is not kept.
    #[test]
    fn a_client_chain_is_kept_once_for_all_its_connections() {
        let contexts = crate::tls::TlsContexts::default();
        let c = chain(443, tcp("t"), 1, None);
        let a = client_cert("spiffe://cluster.local/ns/a/sa/a");
        let b = client_cert("spiffe://cluster.local/ns/b/sa/b");
        assert!(contexts.peer(&c, &[]).is_none(), "no certificate, no peer");
        let first = contexts.peer(&c, std::slice::from_ref(&a)).unwrap();
        let second = contexts.peer(&c, std::slice::from_ref(&a)).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert!(Arc::ptr_eq(&first.client_cert, &second.client_cert));
        assert_eq!(first.certs, vec![a.clone()]);
        assert_eq!(
            first.identity.as_deref(),
            Some("spiffe://cluster.local/ns/a/sa/a")
        );
        assert_eq!(
            first.client_cert.uris,
            vec!["spiffe://cluster.local/ns/a/sa/a".to_string()]
        );
        let other = contexts.peer(&c, std::slice::from_ref(&b)).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(
            other.identity.as_deref(),
            Some("spiffe://cluster.local/ns/b/sa/b")
        );
        // The same leaf in a longer chain is another chain.
        let longer = contexts.peer(&c, &[a.clone(), b.clone()]).unwrap();
        assert!(!Arc::ptr_eq(&first, &longer));
        drop((first, second, other, longer));
        let again = contexts.peer(&c, std::slice::from_ref(&a)).unwrap();
        assert_eq!(Arc::strong_count(&again), 1, "made anew, held only here");
        assert_eq!(again.certs, vec![a]);
    }
}
