//! Micro-benchmarks of the per-request work that does not touch a socket:
//! route matching over a large table, the connection manager's header
//! handling, a load balancer pick per policy, and Istio's metrics of one
//! request (metadata exchange headers, label set lookup, counters).
//!
//! `cargo bench -p ferry-benches --bench micro`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ferry_model::cluster::{LbConfig, LbPolicy};
use ferry_model::{
    DomainMatcher, HeaderMatcher, PathMatch, Route, RouteAction, RouteConfig, RouteMatch,
    StringMatcher, VirtualHost,
};
use ferry_proxy::lb::{Balancer, HostMeta, LbHost};
use http::{HeaderMap, HeaderName, HeaderValue};

fn route(i: usize) -> Route {
    Route {
        name: format!("r{i}"),
        route_match: RouteMatch {
            ignore_path_parameters: false,
            path: PathMatch::Prefix(format!("/svc{i}/")),
            case_sensitive: true,
            headers: vec![HeaderMatcher {
                name: HeaderName::from_static("x-version").into(),
                matcher: Some(StringMatcher::Exact(format!("v{}", i % 3))),
                ignore_case: false,
                invert: false,
                present: true,
                treat_missing_as_empty: false,
            }],
            query_parameters: Vec::new(),
            grpc: false,
            runtime_fraction: None,
        },
        action: RouteAction::DirectResponse {
            status: http::StatusCode::OK,
            body: None,
        },
        request_headers: Default::default(),
        response_headers: Default::default(),
        hash_policy: Vec::new(),
        fault_overrides: Vec::new(),
        cors: Default::default(),
        ratelimit_overrides: Vec::new(),
        rbac_overrides: Vec::new(),
        jwt_overrides: Vec::new(),
        ext_authz_overrides: Vec::new(),
        compressor_overrides: Vec::new(),
        rate_limits: Vec::new(),
        vhost_rate_limits: Default::default(),
        upgrades: Vec::new(),
        connect_terminate: false,
        request_body_buffer_limit: None,
        decorator: None,
    }
}

fn table(routes: usize) -> RouteConfig {
    RouteConfig {
        name: "bench".into(),
        virtual_hosts: vec![VirtualHost {
            name: "svc".into(),
            domains: vec![
                DomainMatcher::parse("svc.bench.svc.cluster.local"),
                DomainMatcher::parse("*"),
            ],
            routes: (0..routes).map(route).collect(),
            require_tls: Default::default(),
        }],
        ignore_port_in_host_matching: true,
        validate_clusters: false,
        internal_only_headers: Vec::new(),
    }
}

fn route_matching(c: &mut Criterion) {
    let rc = table(1000);
    let mut h = HeaderMap::new();
    h.insert("x-version", HeaderValue::from_static("v0"));
    c.bench_function("route_match_1k_routes_hit_990", |b| {
        b.iter(|| {
            rc.find_route(
                black_box("svc.bench.svc.cluster.local"),
                black_box("/svc990/items?id=7"),
                &h,
            )
        })
    });
    let rc20 = table(20);
    c.bench_function("route_match_20_routes_hit_18", |b| {
        b.iter(|| rc20.find_route(black_box("svc"), black_box("/svc18/items"), &h))
    });
}

fn header_handling(c: &mut Criterion) {
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "reviews.default.svc.cluster.local:9080"),
        ("user-agent", "curl/7.88.1"),
        ("accept", "*/*"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("cookie", "session=abc; user=jason"),
    ] {
        base.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    c.bench_function("prepare_request_headers", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                ferry_filters::http::headers::prepare_request(&mut h, "http", true);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

struct Host(String);

impl LbHost for Host {
    fn id(&self) -> String {
        self.0.clone()
    }
    fn available(&self) -> bool {
        true
    }
    fn active(&self) -> u64 {
        0
    }
}

fn lb_pick(c: &mut Criterion) {
    for (name, policy) in [
        ("round_robin", LbPolicy::RoundRobin),
        ("least_request", LbPolicy::LeastRequest),
        ("random", LbPolicy::Random),
        ("ring_hash", LbPolicy::RingHash),
        ("maglev", LbPolicy::Maglev),
    ] {
        let hosts = (0..100)
            .map(|i| {
                (
                    Host(format!("10.0.{}.{}:9080", i / 250, i % 250)),
                    HostMeta::default(),
                )
            })
            .collect();
        let lb = Balancer::new(policy, &LbConfig::default(), hosts);
        let mut key = 0u64;
        c.bench_function(&format!("lb_pick_{name}_100_hosts"), |b| {
            b.iter(|| {
                key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                lb.pick(Some(black_box(key))).map(|h| h.0.len())
            })
        });
    }
}

/// What `istio.stats` adds to one request on the client side of a
/// keep-alive connection: announce this node, take the server's exchange
/// headers off the response, find the connection's label set, count.
fn istio_metrics(c: &mut Criterion) {
    use ferry_proxy::metrics::{
        ConnMetrics, IstioMetrics, LocalNode, RequestOutcome, Workload, take_peer,
    };
    let workload = |name: &str, sa: &str| Workload {
        workload: name.into(),
        namespace: "default".into(),
        app: name.into(),
        version: "v1".into(),
        canonical_service: name.into(),
        canonical_revision: "v1".into(),
        service_account: sa.into(),
        principal: format!("spiffe://cluster.local/ns/default/sa/{sa}"),
        ..Workload::default()
    };
    let node = LocalNode::new(
        workload("client", "sleep"),
        "sidecar~client",
        "cluster.local",
    );
    let server = LocalNode::new(
        workload("server", "server"),
        "sidecar~server",
        "cluster.local",
    );
    let metrics = std::sync::Arc::new(IstioMetrics::new(node));
    let conn = ConnMetrics::new(
        metrics.clone(),
        ferry_model::IstioStats {
            reporter: ferry_model::Reporter::Source,
            disable_host_header_fallback: false,
        },
        None,
        false,
    );
    let mut req = HeaderMap::new();
    let mut resp = HeaderMap::new();
    c.bench_function("istio_metrics_http_request", |b| {
        b.iter(|| {
            metrics.local.announce(&mut req);
            server.announce(&mut resp);
            let peer = take_peer(&mut resp);
            let set = conn.label_set(
                black_box("server.default.svc.cluster.local"),
                peer.as_ref(),
                "http",
            );
            metrics.record_request(
                &set,
                &RequestOutcome {
                    status: black_box(200),
                    grpc_status: None,
                    flags: "",
                    duration: std::time::Duration::from_micros(1500),
                    request_bytes: 0,
                    response_bytes: 512,
                },
            );
        })
    });
    c.bench_function("istio_metrics_scrape_1_series", |b| {
        b.iter(|| {
            let mut out = String::new();
            metrics.render(&mut out);
            out.len()
        })
    });
}

criterion_group!(
    micro,
    route_matching,
    header_handling,
    lb_pick,
    istio_metrics
);
criterion_main!(micro);
