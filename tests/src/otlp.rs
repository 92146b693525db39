//! An OTLP/gRPC trace collector for tests (`TraceService/Export` on `opentelemetry-proto`):
//! serves on a listener the caller binds (in a pod's namespace, or on loopback) from a
//! runtime of its own and keeps every span it is sent, with its resource's attributes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

/// A span as received.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace: String,
    pub id: String,
    pub parent: Option<String>,
    pub name: String,
    /// `SERVER`, `CLIENT`, or `kind N`.
    pub kind: String,
    /// Attributes, string values as they are, others in their debug form.
    pub tags: BTreeMap<String, String>,
    /// The resource's attributes (`service.name`, …).
    pub resource: BTreeMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// The spans received so far; shared with the serving task.
#[derive(Clone, Default)]
pub struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for rs in &req.get_ref().resource_spans {
            let resource: BTreeMap<String, String> = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .map(|a| (a.key.clone(), text(a.value.as_ref())))
                .collect();
            for s in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                spans.push(Span {
                    trace: hex(&s.trace_id),
                    id: hex(&s.span_id),
                    parent: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    name: s.name.clone(),
                    kind: match s.kind {
                        2 => "SERVER".into(),
                        3 => "CLIENT".into(),
                        k => format!("kind {k}"),
                    },
                    tags: s
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(a.value.as_ref())))
                        .collect(),
                    resource: resource.clone(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves OTLP/gRPC on `listener` (already bound, wherever) until the process ends.
    pub fn serve(listener: std::net::TcpListener) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let me = Collector::default();
        let service = me.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(l) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let incoming = tonic::transport::server::TcpIncoming::from(l);
                let _ = tonic::transport::Server::builder()
                    .serve_with_incoming(TraceServiceServer::new(service), incoming)
                    .await;
            });
        });
        Ok(me)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `want` accepts the spans received (exporters flush on their own
    /// schedule), then returns them; an error naming what came after `timeout`.
    pub fn wait(&self, timeout: Duration, want: impl Fn(&[Span]) -> bool) -> Result<Vec<Span>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.spans();
            if want(&got) {
                return Ok(got);
            }
            if Instant::now() >= deadline {
                bail!("the spans never came; received {got:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
