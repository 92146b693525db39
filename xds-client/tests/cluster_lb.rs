//! Conversion of the cluster-manager settings of Envoy clusters and routes:
//! load balancing policies and their configs, priorities and localities of
//! endpoints, outlier detection, circuit breakers and route hash policies.

use std::time::Duration;

use ferry_model::cluster::{
    EndpointHealth, HashPolicyKind, LbConfig, OutlierDetection, Thresholds,
};
use ferry_model::{ClusterKind, LbPolicy};
use ferry_xds::bootstrap::parse_bootstrap;

const BOOTSTRAP: &str = r#"
static_resources:
  listeners:
  - name: http
    address: {socket_address: {address: 127.0.0.1, port_value: 8080}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route:
                  cluster: ring
                  hash_policy:
                  - header: {header_name: X-User}
                    terminal: true
                  - cookie: {name: sticky, ttl: 60s, path: /}
                  - connection_properties: {source_ip: true}
                  - query_parameter: {name: user}
                  - filter_state: {key: some.key}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: ring
    connect_timeout: 1s
    type: STATIC
    lb_policy: RING_HASH
    ring_hash_lb_config: {minimum_ring_size: 64, maximum_ring_size: 4096}
    common_lb_config: {locality_weighted_lb_config: {}}
    outlier_detection:
      consecutive_5xx: 3
      interval: 2s
      base_ejection_time: 20s
      max_ejection_percent: 50
      split_external_local_origin_errors: true
    circuit_breakers:
      thresholds:
      - {max_connections: 10, max_pending_requests: 5, max_requests: 7, max_retries: 1}
      - {priority: HIGH, max_requests: 99, retry_budget: {budget_percent: {value: 25}, min_retry_concurrency: 2}}
    load_assignment:
      cluster_name: ring
      policy: {overprovisioning_factor: 200}
      endpoints:
      - priority: 1
        load_balancing_weight: 3
        lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9002}}}
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9000}}}
          load_balancing_weight: 5
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9001}}}
          health_status: UNHEALTHY
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9003}}}
          health_status: DEGRADED
  - name: lr
    connect_timeout: 1s
    type: STATIC
    lb_policy: LEAST_REQUEST
    least_request_lb_config: {choice_count: 3}
    load_assignment:
      cluster_name: lr
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9000}}}
"#;

#[test]
fn cluster_settings_are_converted() {
    let b = parse_bootstrap("test.yaml", BOOTSTRAP).unwrap();
    let c = b.snapshot.cluster("ring").unwrap();
    assert_eq!(c.lb_policy, LbPolicy::RingHash);
    assert_eq!(
        c.lb,
        LbConfig {
            min_ring_size: 64,
            max_ring_size: 4096,
            locality_weighted: true,
            overprovisioning_factor: 200,
            ..LbConfig::default()
        }
    );
    let od = *c.outlier_detection.clone().unwrap();
    assert_eq!(
        od,
        OutlierDetection {
            consecutive_5xx: 3,
            interval: Duration::from_secs(2),
            base_ejection_time: Duration::from_secs(20),
            max_ejection_percent: 50,
            split_external_local_origin_errors: true,
            ..OutlierDetection::default()
        }
    );
    assert_eq!(
        c.circuit_breakers.default,
        Thresholds {
            max_connections: 10,
            max_pending_requests: 5,
            max_requests: 7,
            max_retries: 1,
            retry_budget: None,
            track_remaining: false,
        }
    );
    assert_eq!(c.circuit_breakers.high.max_requests, 99);
    assert_eq!(c.circuit_breakers.high.max_retries, 3);
    let budget = c.circuit_breakers.high.retry_budget.expect("retry budget");
    assert_eq!(budget.budget_ppm, 250_000);
    assert_eq!(budget.min_retry_concurrency, 2);
    // A quarter of the requests in flight, at least two.
    assert_eq!(budget.allowed(0), 2);
    assert_eq!(budget.allowed(40), 10);

    // Every priority is kept, most preferred first; health is marked.
    let ClusterKind::Static(eps) = &c.kind else {
        panic!("static cluster expected")
    };
    let ports: Vec<(u16, u32, u32)> = eps
        .iter()
        .map(|e| (e.address.ip().map_or(0, |a| a.port()), e.priority, e.weight))
        .collect();
    assert_eq!(
        ports,
        vec![(9000, 0, 5), (9001, 0, 1), (9003, 0, 1), (9002, 1, 1)]
    );
    let health: Vec<EndpointHealth> = eps.iter().map(|e| e.health).collect();
    assert_eq!(
        health,
        vec![
            EndpointHealth::Healthy,
            EndpointHealth::Unhealthy,
            EndpointHealth::Degraded,
            EndpointHealth::Healthy
        ]
    );
    assert_eq!(eps[3].locality_weight, 3);
    assert_ne!(eps[0].locality, eps[3].locality);

    let lr = b.snapshot.cluster("lr").unwrap();
    assert_eq!(lr.lb_policy, LbPolicy::LeastRequest);
    assert_eq!(lr.lb.choice_count, 3);
    assert!(lr.outlier_detection.is_none());
    assert_eq!(lr.circuit_breakers.default, Thresholds::default());
}

#[test]
fn route_hash_policies_are_converted() {
    let b = parse_bootstrap("test.yaml", BOOTSTRAP).unwrap();
    let l = b.snapshot.listener("http").unwrap();
    let ferry_model::ChainKind::Http(h) = &l.filter_chains[0].kind else {
        panic!("expected HCM")
    };
    let rc = b.snapshot.route_config(&h.routes).unwrap();
    let route = rc.find_route("x", "/", &http::HeaderMap::new()).unwrap();
    let kinds: Vec<(HashPolicyKind, bool)> = route
        .hash_policy
        .iter()
        .map(|p| (p.kind.clone(), p.terminal))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (HashPolicyKind::Header("x-user".into()), true),
            (
                HashPolicyKind::Cookie {
                    name: "sticky".into(),
                    ttl: Some(Duration::from_secs(60)),
                    path: Some("/".into()),
                },
                false
            ),
            (HashPolicyKind::SourceIp, false),
            (HashPolicyKind::QueryParameter("user".into()), false),
            (HashPolicyKind::FilterState("some.key".into()), false),
        ]
    );
}

#[test]
fn invalid_lb_settings_are_rejected_with_the_field() {
    let e = parse_bootstrap(
        "test.yaml",
        &BOOTSTRAP.replace("choice_count: 3", "choice_count: 1"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("choice_count"), "{e}");
    let e = parse_bootstrap(
        "test.yaml",
        &BOOTSTRAP.replace(
            "ring_hash_lb_config: {minimum_ring_size: 64, maximum_ring_size: 4096}",
            "maglev_lb_config: {table_size: 1000}",
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("table_size"), "{e}");
    let e = parse_bootstrap(
        "test.yaml",
        &BOOTSTRAP.replace(
            "budget_percent: {value: 25}",
            "budget_percent: {value: 250}",
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("circuit_breakers.thresholds[1].retry_budget.budget_percent"),
        "{e}"
    );
}
