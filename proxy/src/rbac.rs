//! RBAC at run time: what a downstream connection offers the policies (its
//! addresses, SNI, TLS peer), Envoy's counter names for the decisions, and
//! `envoy.filters.network.rbac` as a stream adaptor in front of the chain's
//! terminal filter.
//!
//! The network filter decides when the first bytes (or the end of the
//! stream) arrive, as Envoy's does (`ONE_TIME_ON_FIRST_BYTE`; `CONTINUOUS`
//! re-evaluates and counts on every read and at the end of the stream): a
//! denied connection never has its bytes forwarded and is closed, after
//! `delay_deny` if set. Nothing
//! the decision reads changes during a connection, so it is taken up front
//! and only applied, and counted, as data arrives; only a new version of
//! the policies changes it: an update that alters nothing but a chain's
//! network RBAC re-checks the chain's open connections
//! ([`ConnRbac::recheck`]) and the listener closes those now denied.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ferry_filters::http::rbac::{self as engine, Subject, TlsPeer, Verdict};
use ferry_model::rbac::{DynamicMetadata, Enforcement, NetworkRbac, Rbac};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stats::{Counter, Stats};

/// What a downstream connection tells the policies.
#[derive(Debug, Clone)]
pub struct Downstream {
    pub peer: SocketAddr,
    /// The (original) destination.
    pub local: SocketAddr,
    /// SNI, "" without one.
    pub server_name: String,
    /// `Some` when TLS was terminated here.
    pub tls: Option<DownstreamTls>,
    /// The filter state that came with an internal connection.
    pub filter_state: Option<Arc<ferry_model::filter_state::FilterState>>,
}

/// The TLS side: the client certificate's names, when one was presented.
#[derive(Debug, Clone)]
pub struct DownstreamTls {
    pub client_cert: Option<Arc<ferry_tls::ClientCertInfo>>,
}

impl Downstream {
    pub fn tls_peer(&self) -> Option<TlsPeer<'_>> {
        self.tls.as_ref().map(|t| match &t.client_cert {
            Some(c) => TlsPeer {
                uri_sans: &c.uris,
                dns_sans: &c.dns,
                subject: &c.subject,
            },
            None => TlsPeer::default(),
        })
    }

    /// The metadata Istio's authentication filter would have set for the
    /// peer's SPIFFE identity.
    pub fn metadata(&self) -> DynamicMetadata {
        let spiffe = self
            .tls
            .as_ref()
            .and_then(|t| t.client_cert.as_ref())
            .and_then(|c| c.uris.iter().find(|u| u.starts_with("spiffe://")));
        engine::istio_authn_metadata(spiffe.map(String::as_str))
    }
}

/// Envoy's `statPrefixJoin`: a dot between the parts unless the prefix is
/// empty or already ends with one.
pub fn stat_join(prefix: &str, token: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('.') {
        format!("{prefix}{token}")
    } else {
        format!("{prefix}.{token}")
    }
}

/// The counters of one RBAC filter, named as Envoy names them:
/// `<base>rbac.allowed`, `<base>rbac.<rules_prefix>.allowed`,
/// `…<shadow_prefix>.shadow_denied`, and per policy
/// `…policy.<name>.allowed` when tracked.
pub struct RbacCounters<'a> {
    pub stats: &'a Stats,
    /// `http.<hcm prefix>.` or the network filter's `stat_prefix`.
    pub base: &'a str,
    pub rules_prefix: &'a str,
    pub shadow_prefix: &'a str,
    pub per_rule: bool,
}

impl RbacCounters<'_> {
    fn counter(&self, rules_prefix: &str, name: &str) -> Counter {
        // A rules prefix without a trailing dot gets one (`rbac.dry_.shadow_allowed`).
        let base = stat_join(&stat_join(self.base, "rbac."), rules_prefix);
        self.stats.counter(&stat_join(&base, name))
    }

    fn policy_counter(&self, rules_prefix: &str, policy: &str, name: &str) -> Counter {
        let base = stat_join(&stat_join(self.base, "rbac."), rules_prefix);
        self.stats
            .counter(&format!("{}{policy}.{name}", stat_join(&base, "policy.")))
    }

    /// Counts a decision of the enforced rules.
    pub fn enforced(&self, v: &Verdict) {
        let what = if v.allowed { "allowed" } else { "denied" };
        // A LOG decision counts as allowed; Envoy 1.40 has no logged counters.
        self.counter(self.rules_prefix, what).inc();
        if self.per_rule
            && let Some(p) = &v.matched_policy
        {
            self.policy_counter(self.rules_prefix, p, what).inc();
        }
    }

    /// Counts a decision of the shadow rules.
    pub fn shadow(&self, v: &Verdict) {
        let what = if v.allowed {
            "shadow_allowed"
        } else {
            "shadow_denied"
        };
        self.counter(self.shadow_prefix, what).inc();
        if self.per_rule
            && let Some(p) = &v.matched_policy
        {
            self.policy_counter(self.shadow_prefix, p, what).inc();
        }
    }
}

/// What a network filter sees: the connection only, no headers, no path.
fn network_subject<'a>(
    d: &'a Downstream,
    headers: &'a HeaderMap,
    md: &'a DynamicMetadata,
) -> Subject<'a> {
    Subject {
        headers,
        pseudo: None,
        local: d.local,
        direct_remote: d.peer,
        remote: d.peer.ip(),
        server_name: &d.server_name,
        tls: d.tls_peer(),
        metadata: md,
        filter_state: d.filter_state.as_deref(),
    }
}

/// The decisions of a chain's network RBAC filters for one connection:
/// each filter with its shadow and enforced verdicts.
struct Decisions {
    filters: Vec<(Arc<NetworkRbac>, Option<Verdict>, Option<Verdict>)>,
}

impl Decisions {
    fn evaluate(filters: &[Arc<NetworkRbac>], downstream: &Downstream) -> Self {
        if filters.is_empty() {
            return Self {
                filters: Vec::new(),
            };
        }
        let empty = HeaderMap::new();
        let md = downstream.metadata();
        let subject = network_subject(downstream, &empty, &md);
        let eval = |r: &Option<Arc<Rbac>>| r.as_ref().map(|r| engine::evaluate(r, &subject));
        Self {
            filters: filters
                .iter()
                .map(|f| (f.clone(), eval(&f.shadow_rules), eval(&f.rules)))
                .collect(),
        }
    }

    /// Runs the filters in order on arriving data, counting when `count`:
    /// `Err` with the `delay_deny` of the first filter that denies. Shadow
    /// rules count only on the first data, enforced ones on every evaluation
    /// (each read under `CONTINUOUS`).
    fn apply(&self, stats: &Stats, first: bool, count: bool) -> Result<(), Option<Duration>> {
        for (cfg, shadow, enforced) in &self.filters {
            if !first && cfg.enforcement != Enforcement::Continuous {
                continue;
            }
            let counters = RbacCounters {
                stats,
                base: &cfg.stat_prefix,
                rules_prefix: "",
                shadow_prefix: &cfg.shadow_rules_stat_prefix,
                per_rule: false,
            };
            if let Some(v) = shadow
                && first
                && count
            {
                counters.shadow(v);
            }
            if let Some(v) = enforced {
                if count {
                    counters.enforced(v);
                }
                if !v.allowed {
                    return Err(cfg.delay_deny);
                }
            }
        }
        Ok(())
    }

    fn continuous(&self) -> bool {
        self.filters
            .iter()
            .any(|(c, _, _)| c.enforcement == Enforcement::Continuous)
    }
}

/// The network RBAC of one connection: what the connection offers the
/// policies and the decisions of its chain's filters, shared by the stream
/// adaptor that applies them and the listener update that re-checks them
/// against a new version of the chain.
pub struct ConnRbac {
    stats: Arc<dyn AsRef<Stats> + Send + Sync>,
    downstream: Downstream,
    state: Mutex<RbacState>,
    /// Whether some filter re-evaluates on every read (`CONTINUOUS`).
    continuous: AtomicBool,
}

struct RbacState {
    decisions: Arc<Decisions>,
    /// The first bytes arrived: the decisions were applied and counted.
    started: bool,
}

/// The outcome of a re-check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recheck {
    Allowed,
    /// Denied; close after this `delay_deny`.
    Denied(Option<Duration>),
}

impl ConnRbac {
    /// Evaluates `filters` for `downstream` (nothing is counted until the
    /// first bytes arrive).
    pub fn new(
        filters: &[Arc<NetworkRbac>],
        stats: Arc<dyn AsRef<Stats> + Send + Sync>,
        downstream: Downstream,
    ) -> Arc<Self> {
        let decisions = Decisions::evaluate(filters, &downstream);
        Arc::new(Self {
            stats,
            continuous: AtomicBool::new(decisions.continuous()),
            downstream,
            state: Mutex::new(RbacState {
                decisions: Arc::new(decisions),
                started: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RbacState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the connection's decisions anew from `filters` (the RBAC of
    /// the chain an update moved it to). Counted as an evaluation on
    /// arriving data when the connection already passed its first bytes,
    /// or when it is denied (it closes before any other count).
    pub fn recheck(&self, filters: &[Arc<NetworkRbac>]) -> Recheck {
        let decisions = Arc::new(Decisions::evaluate(filters, &self.downstream));
        let mut st = self.lock();
        let verdict = decisions.apply(self.stats.as_ref().as_ref(), true, false);
        if st.started || verdict.is_err() {
            let _ = decisions.apply(self.stats.as_ref().as_ref(), true, true);
            st.started = true;
        }
        self.continuous
            .store(decisions.continuous(), Ordering::Relaxed);
        st.decisions = decisions;
        match verdict {
            Ok(()) => Recheck::Allowed,
            Err(delay) => Recheck::Denied(delay),
        }
    }

    /// The connection as the filters after RBAC see it.
    pub fn downstream(&self) -> &Downstream {
        &self.downstream
    }

    /// The connection's dynamic metadata once the network RBAC filters ran:
    /// their shadow rules' verdicts (namespace `envoy.filters.network.rbac`,
    /// keys after each filter's `shadow_rules_stat_prefix`), as Envoy's
    /// filter records them, beside what the connection itself offers.
    pub fn metadata(&self) -> DynamicMetadata {
        let mut md = self.downstream.metadata();
        let decisions = self.lock().decisions.clone();
        for (cfg, shadow, _) in &decisions.filters {
            let Some(v) = shadow else { continue };
            let ns =
                md.0.entry("envoy.filters.network.rbac".to_string())
                    .or_default();
            let prefix = &cfg.shadow_rules_stat_prefix;
            if let Some(p) = &v.matched_policy {
                ns.insert(
                    format!("{prefix}shadow_effective_policy_id"),
                    ferry_model::rbac::MetaValue::String(p.clone()),
                );
            }
            ns.insert(
                format!("{prefix}shadow_engine_result"),
                ferry_model::rbac::MetaValue::String(
                    if v.allowed { "allowed" } else { "denied" }.into(),
                ),
            );
        }
        md
    }

    /// Applies the decisions to arriving data (`first`: the first bytes).
    fn on_data(&self, first: bool) -> Result<(), Option<Duration>> {
        let (decisions, count) = {
            let mut st = self.lock();
            // The first bytes are counted once, even if a re-check
            // counted them already.
            let count = !first || !st.started;
            st.started = true;
            (st.decisions.clone(), count)
        };
        decisions.apply(self.stats.as_ref().as_ref(), first, count)
    }
}

enum Gate {
    /// No byte seen yet.
    First,
    Allowed,
    /// The end of the stream was decided: later reads pass through.
    Ended,
    Delaying(Pin<Box<tokio::time::Sleep>>),
    Denied,
}

/// A downstream stream behind the chain's network RBAC filters.
pub struct Guarded<S> {
    inner: S,
    rbac: Arc<ConnRbac>,
    gate: Gate,
}

/// Puts `io` behind the connection's network RBAC.
pub fn guard<S>(io: S, rbac: &Arc<ConnRbac>) -> Guarded<S> {
    Guarded {
        inner: io,
        rbac: rbac.clone(),
        gate: Gate::First,
    }
}

fn denied() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "RBAC: access denied")
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.gate {
                Gate::Denied => return Poll::Ready(Err(denied())),
                Gate::Delaying(sleep) => {
                    std::task::ready!(sleep.as_mut().poll(cx));
                    this.gate = Gate::Denied;
                }
                Gate::Ended => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Gate::First | Gate::Allowed => {
                    let before = buf.filled().len();
                    std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    let got = buf.filled().len() > before;
                    let first = matches!(this.gate, Gate::First);
                    // The end of the stream counts as arriving data, once: Envoy's
                    // filter is called for it too, so it decides a connection
                    // closed without a byte, and `CONTINUOUS` decides the end of a
                    // stream again.
                    let eof = !got && buf.remaining() > 0;
                    if !(got || eof) || !(first || this.rbac.continuous.load(Ordering::Relaxed)) {
                        return Poll::Ready(Ok(()));
                    }
                    match this.rbac.on_data(first) {
                        Ok(()) => {
                            this.gate = if eof { Gate::Ended } else { Gate::Allowed };
                            return Poll::Ready(Ok(()));
                        }
                        Err(delay) => {
                            // The bytes of a denied connection go nowhere.
                            buf.set_filled(before);
                            tracing::debug!(
                                rbac.delay_deny = ?delay,
                                "network RBAC denied the connection"
                            );
                            this.gate = match delay {
                                Some(d) => Gate::Delaying(Box::pin(tokio::time::sleep(d))),
                                None => Gate::Denied,
                            };
                        }
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::rbac::{Action, Permission, Policy, Principal};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn network(action: Action, port: u16, delay: Option<std::time::Duration>) -> Arc<NetworkRbac> {
        enforced(action, port, delay, Enforcement::OneTimeOnFirstByte)
    }

    fn enforced(
        action: Action,
        port: u16,
        delay: Option<std::time::Duration>,
        enforcement: Enforcement,
    ) -> Arc<NetworkRbac> {
        Arc::new(NetworkRbac {
            stat_prefix: "tcp.".into(),
            rules: Some(Arc::new(Rbac {
                action,
                policies: vec![Policy {
                    name: "port".into(),
                    permissions: vec![Permission::DestinationPort(port)],
                    principals: vec![Principal::Any],
                }],
            })),
            shadow_rules: None,
            shadow_rules_stat_prefix: String::new(),
            enforcement,
            delay_deny: delay,
        })
    }

    fn downstream() -> Downstream {
        Downstream {
            peer: "127.0.0.1:40000".parse().unwrap(),
            local: "127.0.0.1:9000".parse().unwrap(),
            server_name: String::new(),
            tls: None,
            filter_state: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn denied_bytes_are_never_read_and_delay_deny_holds_the_close() {
        let stats = Arc::new(Stats::default());
        let (mut client, server) = tokio::io::duplex(64);
        let filters = [network(
            Action::Deny,
            9000,
            Some(std::time::Duration::from_secs(2)),
        )];
        let rbac = ConnRbac::new(&filters, stats.clone(), downstream());
        let mut guarded = guard(server, &rbac);
        client.write_all(b"secret").await.unwrap();
        let start = tokio::time::Instant::now();
        let mut buf = [0u8; 16];
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(start.elapsed() >= std::time::Duration::from_secs(2));
        // Still closed on later reads.
        assert!(guarded.read(&mut buf).await.is_err());
        assert_eq!(stats.counter("tcp.rbac.denied").get(), 1);
    }

    #[tokio::test]
    async fn allowed_connections_pass_and_count_once() {
        let stats = Arc::new(Stats::default());
        let (mut client, server) = tokio::io::duplex(64);
        let filters = [network(Action::Allow, 9000, None)];
        let rbac = ConnRbac::new(&filters, stats.clone(), downstream());
        let mut guarded = guard(server, &rbac);
        let mut buf = [0u8; 16];
        client.write_all(b"one").await.unwrap();
        let n = guarded.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one");
        client.write_all(b"two").await.unwrap();
        let n = guarded.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"two");
        assert_eq!(stats.counter("tcp.rbac.allowed").get(), 1);
        // No filters: nothing is counted, bytes pass.
        let (mut client, server) = tokio::io::duplex(64);
        let rbac = ConnRbac::new(&[], stats.clone(), downstream());
        let mut plain = guard(server, &rbac);
        client.write_all(b"x").await.unwrap();
        assert_eq!(plain.read(&mut buf).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn the_end_of_the_stream_is_decided_once() {
        for (enforcement, counted) in [
            (Enforcement::OneTimeOnFirstByte, 1),
            // Envoy's filter is called for every read and for the end of the stream.
            (Enforcement::Continuous, 3),
        ] {
            let stats = Arc::new(Stats::default());
            let (mut client, server) = tokio::io::duplex(64);
            let filters = [enforced(Action::Allow, 9000, None, enforcement)];
            let rbac = ConnRbac::new(&filters, stats.clone(), downstream());
            let mut guarded = guard(server, &rbac);
            let mut buf = [0u8; 16];
            client.write_all(b"one").await.unwrap();
            assert_eq!(guarded.read(&mut buf).await.unwrap(), 3);
            client.write_all(b"two").await.unwrap();
            assert_eq!(guarded.read(&mut buf).await.unwrap(), 3);
            drop(client);
            // Reads after the end stay at the end and count nothing more.
            for _ in 0..3 {
                assert_eq!(guarded.read(&mut buf).await.unwrap(), 0);
            }
            assert_eq!(
                stats.counter("tcp.rbac.allowed").get(),
                counted,
                "{enforcement:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_recheck_counts_like_new_data_and_closes_only_the_denied() {
        let stats = Arc::new(Stats::default());
        let (mut client, server) = tokio::io::duplex(64);
        let rbac = ConnRbac::new(
            &[network(Action::Allow, 9000, None)],
            stats.clone(),
            downstream(),
        );
        let mut guarded = guard(server, &rbac);
        let mut buf = [0u8; 16];
        client.write_all(b"one").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 3);
        assert_eq!(stats.counter("tcp.rbac.allowed").get(), 1);
        // A new version that still allows the connection: counted as an
        // evaluation, bytes keep flowing.
        let still = [network(Action::Deny, 9999, None)];
        assert_eq!(rbac.recheck(&still), Recheck::Allowed);
        assert_eq!(stats.counter("tcp.rbac.allowed").get(), 2);
        client.write_all(b"two").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 3);
        // One that denies it.
        let delay = Some(std::time::Duration::from_millis(5));
        let now = [network(Action::Deny, 9000, delay)];
        assert_eq!(rbac.recheck(&now), Recheck::Denied(delay));
        assert_eq!(stats.counter("tcp.rbac.denied").get(), 1);
        assert_eq!(stats.counter("tcp.rbac.allowed").get(), 2);
    }

    #[tokio::test]
    async fn a_recheck_before_the_first_bytes_leaves_the_counting_to_them() {
        let stats = Arc::new(Stats::default());
        let (mut client, server) = tokio::io::duplex(64);
        // Accepted under a policy that would deny it, re-checked under one
        // that allows it before it sent anything: the new policy decides.
        let rbac = ConnRbac::new(
            &[network(Action::Deny, 9000, None)],
            stats.clone(),
            downstream(),
        );
        let mut guarded = guard(server, &rbac);
        assert_eq!(
            rbac.recheck(&[network(Action::Allow, 9000, None)]),
            Recheck::Allowed
        );
        assert_eq!(stats.counter("tcp.rbac.allowed").get(), 0);
        let mut buf = [0u8; 16];
        client.write_all(b"hi").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 2);
        assert_eq!(stats.counter("tcp.rbac.allowed").get(), 1);
        assert_eq!(stats.counter("tcp.rbac.denied").get(), 0);
        // Denied before any byte: counted once, by the re-check.
        let (_client, server) = tokio::io::duplex(64);
        let rbac = ConnRbac::new(&[], stats.clone(), downstream());
        let _guarded = guard(server, &rbac);
        assert_eq!(
            rbac.recheck(&[network(Action::Deny, 9000, None)]),
            Recheck::Denied(None)
        );
        assert_eq!(stats.counter("tcp.rbac.denied").get(), 1);
    }

    #[test]
    fn stat_names_join_like_envoy() {
        assert_eq!(stat_join("http.in.", "rbac."), "http.in.rbac.");
        assert_eq!(stat_join("tcp", "rbac."), "tcp.rbac.");
        assert_eq!(stat_join("", "rbac."), "rbac.");
        assert_eq!(stat_join("http.in.rbac.", ""), "http.in.rbac.");
        let stats = Stats::default();
        let c = RbacCounters {
            stats: &stats,
            base: "http.in.",
            rules_prefix: "",
            shadow_prefix: "istio_dry_run_allow_",
            per_rule: true,
        };
        let v = Verdict {
            allowed: false,
            matched_policy: Some("p".into()),
            log: None,
        };
        c.enforced(&v);
        c.shadow(&v);
        let names: Vec<String> = stats.snapshot().into_iter().map(|(n, _)| n).collect();
        assert!(
            names.contains(&"http.in.rbac.denied".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"http.in.rbac.policy.p.denied".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"http.in.rbac.istio_dry_run_allow_.shadow_denied".to_string()),
            "{names:?}"
        );
    }
}
