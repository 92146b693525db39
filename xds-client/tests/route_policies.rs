//! Conversion of the router's per-route policies: retry policies (a route's
//! own or its virtual host's), mirror policies, idle and stream-duration
//! timeouts, attempt-count headers, and the fault filter with per-route
//! overrides in the shape istiod sends them.

use std::time::Duration;

use ferry_model::fault::{AbortSource, DelaySource};
use ferry_model::{ChainKind, HttpFilterConfig, Route, RouteAction, RouteConfig};
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
              include_request_attempt_count: true
              retry_policy: {retry_on: "connect-failure,refused-stream", num_retries: 2}
              routes:
              - name: own
                match: {prefix: "/own"}
                route:
                  cluster: backend
                  idle_timeout: 3s
                  max_stream_duration: {max_stream_duration: 4s}
                  retry_policy:
                    retry_on: "5xx,retriable-status-codes,unavailable"
                    retriable_status_codes: [418]
                    per_try_timeout: 0.5s
                    retry_back_off: {base_interval: 0.1s}
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
                    host_selection_retry_max_attempts: 5
                  request_mirror_policies:
                  - cluster: shadow
                    runtime_fraction: {default_value: {numerator: 25, denominator: TEN_THOUSAND}}
              - name: inherited
                match: {prefix: "/"}
                route: {cluster: backend}
                typed_per_filter_config:
                  envoy.filters.http.fault:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
                    abort: {http_status: 503, percentage: {numerator: 50, denominator: HUNDRED}}
                    delay: {fixed_delay: 7s, percentage: {numerator: 100}}
          http_filters:
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
              abort: {header_abort: {}, percentage: {numerator: 100}}
              delay: {header_delay: {}, percentage: {numerator: 100}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9090}}}
  - name: shadow
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: shadow
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9091}}}
"#;

fn routes(
    b: &ferry_xds::bootstrap::Bootstrap,
) -> (&ferry_model::HttpConnectionManager, &RouteConfig) {
    let l = b.snapshot.listener("http").expect("listener");
    let ChainKind::Http(h) = &l.filter_chains[0].kind else {
        panic!("expected an HTTP connection manager")
    };
    (h, b.snapshot.route_config(&h.routes).expect("routes"))
}

fn named<'a>(rc: &'a RouteConfig, name: &str) -> &'a Route {
    rc.virtual_hosts[0]
        .routes
        .iter()
        .find(|r| r.name == name)
        .expect("route")
}

#[test]
fn retry_mirror_and_timeouts() {
    let b = parse_bootstrap("test.yaml", BOOTSTRAP).unwrap();
    let (_, rc) = routes(&b);
    let RouteAction::Route {
        retry_policy,
        mirrors,
        idle_timeout,
        max_stream_duration,
        attempt_count,
        ..
    } = &named(rc, "own").action
    else {
        panic!("expected a route action")
    };
    let p = retry_policy.as_deref().unwrap();
    assert!(
        p.retry_on.server_error && p.retry_on.retriable_status_codes && p.retry_on.grpc_unavailable
    );
    assert!(
        !p.retry_on.connect_failure,
        "a route's policy replaces the virtual host's"
    );
    assert_eq!(p.num_retries, 1, "Envoy's default");
    assert_eq!(p.retriable_status_codes, vec![418]);
    assert_eq!(p.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(p.backoff_base, Duration::from_millis(100));
    assert_eq!(p.backoff_max, Duration::from_secs(1), "ten times the base");
    assert!(p.previous_hosts);
    assert_eq!(p.host_selection_max_attempts, 5);
    assert_eq!(mirrors.len(), 1);
    assert_eq!(mirrors[0].cluster, "shadow");
    assert_eq!(
        (
            mirrors[0].fraction.numerator,
            mirrors[0].fraction.denominator
        ),
        (25, 10_000)
    );
    assert_eq!(*idle_timeout, Some(Duration::from_secs(3)));
    assert_eq!(*max_stream_duration, Some(Duration::from_secs(4)));
    assert!(attempt_count.request && !attempt_count.response);

    let RouteAction::Route {
        retry_policy,
        mirrors,
        timeout,
        ..
    } = &named(rc, "inherited").action
    else {
        panic!("expected a route action")
    };
    let p = retry_policy.as_deref().unwrap();
    assert!(p.retry_on.connect_failure && p.retry_on.refused_stream && !p.retry_on.server_error);
    assert_eq!(p.num_retries, 2);
    assert_eq!(p.backoff_base, Duration::from_millis(25));
    assert!(mirrors.is_empty());
    assert_eq!(*timeout, Some(Duration::from_secs(15)));
}

#[test]
fn fault_filter_and_per_route_override() {
    let b = parse_bootstrap("test.yaml", BOOTSTRAP).unwrap();
    assert!(
        b.warnings.0.iter().all(|w| !w.contains("fault")),
        "{:?}",
        b.warnings
    );
    let (hcm, rc) = routes(&b);
    assert_eq!(hcm.http_filters.len(), 1);
    let HttpFilterConfig::Fault(f) = &hcm.http_filters[0].config else {
        panic!("expected the fault filter")
    };
    assert_eq!(hcm.http_filters[0].name, "envoy.filters.http.fault");
    assert_eq!(f.abort.as_ref().unwrap().source, AbortSource::Header);
    assert_eq!(f.delay.as_ref().unwrap().source, DelaySource::Header);

    let r = named(rc, "inherited");
    let o = r.fault_override("envoy.filters.http.fault").unwrap();
    let abort = o.abort.as_ref().unwrap();
    assert_eq!(abort.source, AbortSource::Http(503));
    assert_eq!(
        (abort.percentage.numerator, abort.percentage.denominator),
        (50, 100)
    );
    let delay = o.delay.as_ref().unwrap();
    assert_eq!(delay.source, DelaySource::Fixed(Duration::from_secs(7)));
    assert_eq!(delay.percentage.numerator, 100);
    assert!(
        named(rc, "own")
            .fault_override("envoy.filters.http.fault")
            .is_none()
    );
}

#[test]
fn invalid_policies_name_the_field() {
    let e = parse_bootstrap(
        "test.yaml",
        &BOOTSTRAP.replace(
            "retriable_status_codes: [418]",
            "retriable_status_codes: [1000]",
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("retry_policy.retriable_status_codes[0]"), "{e}");
    let e = parse_bootstrap(
        "test.yaml",
        &BOOTSTRAP.replace("http_status: 503", "http_status: 99"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("typed_per_filter_config") && e.contains("abort.http_status"),
        "{e}"
    );
}
