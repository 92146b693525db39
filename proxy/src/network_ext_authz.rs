//! `envoy.filters.network.ext_authz`: a TCP connection is checked with
//! the external authorizer (gRPC `Authorization/Check`, a `CheckRequest`
//! with the connection's source and destination) when its first bytes
//! arrive, as Envoy does; the bytes wait for the verdict. A denial — or a
//! failed check without `failure_mode_allow` — closes the connection.
//! Counters `ext_authz.<stat_prefix>.total`/`ok`/`denied`/`error`/
//! `failure_mode_allowed`/`cx_closed`/`disabled`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::auth::v3 as auth;
use ferry_model::ext_authz::NetworkExtAuthz;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::ext_authz::{Verdict, grpc, socket};
use crate::rbac::ConnRbac;
use crate::run::Runtime;

type Check = Pin<Box<dyn Future<Output = bool> + Send>>;

enum State {
    /// No byte yet (or nothing to check).
    First,
    /// The first bytes wait for the verdict.
    Checking {
        held: Vec<u8>,
        check: Check,
    },
    /// Allowed: `held` goes first, then the stream.
    Open {
        held: Vec<u8>,
        at: usize,
    },
    Closed,
}

/// A downstream stream behind the chain's network ext_authz filters.
pub struct Gated<S> {
    inner: S,
    state: State,
    /// What the check needs, taken once.
    pending: Option<Pending>,
}

struct Pending {
    rt: Arc<Runtime>,
    filters: Vec<Arc<NetworkExtAuthz>>,
    rbac: Arc<ConnRbac>,
}

/// Puts `io` behind `filters` (none: passes everything through).
pub fn gate<S>(
    io: S,
    rt: &Arc<Runtime>,
    filters: &[Arc<NetworkExtAuthz>],
    rbac: &Arc<ConnRbac>,
) -> Gated<S> {
    let pending = (!filters.is_empty()).then(|| Pending {
        rt: rt.clone(),
        filters: filters.to_vec(),
        rbac: rbac.clone(),
    });
    Gated {
        inner: io,
        state: if pending.is_some() {
            State::First
        } else {
            State::Open {
                held: Vec::new(),
                at: 0,
            }
        },
        pending,
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "external authorization denied the connection",
    )
}

/// Runs the filters in order; `false` closes the connection.
async fn check_all(
    rt: Arc<Runtime>,
    filters: Vec<Arc<NetworkExtAuthz>>,
    rbac: Arc<ConnRbac>,
) -> bool {
    let metadata = rbac.metadata();
    let d = rbac.downstream();
    for f in &filters {
        let counter = |n: &str| {
            rt.stats
                .counter(&format!("ext_authz.{}.{n}", f.stat_prefix))
                .inc()
        };
        if let Some(m) = &f.filter_enabled_metadata
            && !m.matches(&metadata)
        {
            counter("disabled");
            continue;
        }
        counter("total");
        let principal = d.tls_peer().map(|t| {
            t.uri_sans
                .first()
                .or(t.dns_sans.first())
                .cloned()
                .unwrap_or_else(|| t.subject.to_string())
        });
        let local_principal = d
            .tls
            .as_ref()
            .and_then(|t| t.client_cert.as_ref())
            .and_then(|c| c.by.first().cloned());
        use auth::attribute_context as ac;
        let request = auth::CheckRequest {
            attributes: Some(auth::AttributeContext {
                source: Some(ac::Peer {
                    address: Some(socket(d.peer)),
                    principal: principal.unwrap_or_default(),
                    ..Default::default()
                }),
                destination: Some(ac::Peer {
                    address: Some(socket(d.local)),
                    principal: local_principal.unwrap_or_default(),
                    ..Default::default()
                }),
                tls_session: (f.include_tls_session && d.tls.is_some()).then(|| ac::TlsSession {
                    sni: d.server_name.clone(),
                }),
                ..Default::default()
            }),
        };
        let asked = grpc(
            &rt,
            f.timeout,
            &f.cluster,
            &f.authority,
            &f.metadata,
            request,
        );
        let verdict = match tokio::time::timeout(f.timeout, asked).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => Verdict::Error(e),
            Err(_) => Verdict::Error("no answer in time".into()),
        };
        let allowed = match verdict {
            Verdict::Ok(_) => {
                counter("ok");
                true
            }
            Verdict::Denied { .. } => {
                counter("denied");
                false
            }
            Verdict::Error(e) => {
                counter("error");
                tracing::debug!(error = %e, src.addr = %d.peer, "external authorization of a connection failed");
                if f.failure_mode_allow {
                    counter("failure_mode_allowed");
                }
                f.failure_mode_allow
            }
        };
        if !allowed {
            counter("cx_closed");
            tracing::debug!(src.addr = %d.peer, "external authorization closed the connection");
            return false;
        }
    }
    true
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Closed => return Poll::Ready(Err(closed())),
                State::Open { held, at } => {
                    if *at < held.len() {
                        let n = (held.len() - *at).min(buf.remaining());
                        buf.put_slice(&held[*at..*at + n]);
                        *at += n;
                        if *at == held.len() {
                            *held = Vec::new();
                            *at = 0;
                        }
                        return Poll::Ready(Ok(()));
                    }
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                State::First => {
                    let mut chunk = [0u8; 16 * 1024];
                    let mut rb = ReadBuf::new(&mut chunk);
                    std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    let got = rb.filled().to_vec();
                    let Some(Pending { rt, filters, rbac }) = this.pending.take() else {
                        this.state = State::Open { held: got, at: 0 };
                        continue;
                    };
                    // The end of the stream is arriving data too: a
                    // connection closed before any byte is checked, as
                    // Envoy's filter does.
                    this.state = State::Checking {
                        held: got,
                        check: Box::pin(check_all(rt, filters, rbac)),
                    };
                }
                State::Checking { held, check } => {
                    let allowed = std::task::ready!(check.as_mut().poll(cx));
                    this.state = if allowed {
                        State::Open {
                            held: std::mem::take(held),
                            at: 0,
                        }
                    } else {
                        State::Closed
                    };
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
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
}
