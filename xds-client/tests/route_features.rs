//! Conversion of the router features beyond paths and headers: query
//! parameter, gRPC and runtime-fraction matches, cluster_header, regex and
//! host rewrites, header value formatters, and the CORS and local rate
//! limit filters with their per-route configurations; every bad input is
//! an error naming the resource and the field.

use ferry_model::{ChainKind, HttpFilterConfig, RouteConfig, Snapshot};
use ferry_xds::bootstrap::parse_bootstrap;
use http::HeaderMap;

/// A bootstrap with one listener whose only virtual host holds `routes`
/// (YAML list items indented for `routes:`) and `filters` before the router.
fn bootstrap(routes: &str, filters: &str, vhost_extra: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}
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
{vhost_extra}
              routes:
{routes}
          http_filters:
{filters}
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
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9090}}}}}}
"#
    )
}

fn load(text: &str) -> Snapshot {
    match parse_bootstrap("test.yaml", text) {
        Ok(b) => b.snapshot,
        Err(e) => panic!("{e}\n{text}"),
    }
}

fn err(text: &str) -> String {
    match parse_bootstrap("test.yaml", text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn table(s: &Snapshot) -> std::sync::Arc<RouteConfig> {
    let l = s.listener("http").expect("listener");
    let ChainKind::Http(h) = &l.filter_chains[0].kind else {
        panic!("expected HCM")
    };
    s.route_config(&h.routes).expect("routes").clone()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, v.parse().expect("value"));
    }
    h
}

const QUERY_ROUTES: &str = r#"              - name: exact
                match:
                  prefix: /
                  query_parameters:
                  - {name: debug, string_match: {exact: "on", ignore_case: true}}
                direct_response: {status: 200}
              - name: present
                match:
                  prefix: /
                  query_parameters: [{name: trace, present_match: true}]
                direct_response: {status: 201}
              - name: bare
                match:
                  prefix: /
                  query_parameters: [{name: flag}]
                direct_response: {status: 202}
              - name: regex
                match:
                  prefix: /
                  query_parameters: [{name: v, string_match: {safe_regex: {regex: "[0-9]+"}}}]
                direct_response: {status: 203}
              - name: grpc
                match: {prefix: /, grpc: {}}
                direct_response: {status: 205}
              - name: none
                match:
                  prefix: /
                  runtime_fraction: {default_value: {numerator: 0}, runtime_key: k}
                direct_response: {status: 206}
              - name: absent
                match:
                  prefix: /
                  query_parameters: [{name: never, present_match: false}]
                direct_response: {status: 204}
              - name: fallback
                match: {prefix: /}
                direct_response: {status: 299}
"#;

#[test]
fn query_parameters_grpc_and_runtime_fraction() {
    let s = load(&bootstrap(QUERY_ROUTES, "", ""));
    let rc = table(&s);
    let h = HeaderMap::new();
    let name = |path: &str, h: &HeaderMap| {
        rc.find_route_rolled("x", path, h, 7)
            .expect("route")
            .name
            .clone()
    };
    assert_eq!(name("/a?debug=ON", &h), "exact");
    assert_eq!(name("/a?debug=off&never", &h), "fallback");
    // Only the first value of a repeated parameter counts.
    assert_eq!(name("/a?debug=off&debug=on&never", &h), "fallback");
    assert_eq!(name("/a?x=1&trace", &h), "present");
    assert_eq!(name("/a?flag=", &h), "bare");
    assert_eq!(name("/a?v=123", &h), "regex");
    assert_eq!(name("/a?v=12a&never", &h), "fallback");
    // present_match: false asks for the parameter's absence.
    assert_eq!(name("/a?never=1", &h), "fallback");
    assert_eq!(name("/a?x=1", &h), "absent");
    let grpc = headers(&[("content-type", "application/grpc+proto")]);
    assert_eq!(name("/a", &grpc), "grpc");
    let web = headers(&[("content-type", "application/grpc-web")]);
    assert_eq!(name("/a?never", &web), "fallback");
}

#[test]
fn match_errors_name_the_field() {
    let routes = r#"              - match:
                  prefix: /
                  dynamic_metadata: [{filter: f, path: [{key: k}], value: {string_match: {exact: v}}}]
                direct_response: {status: 200}
"#;
    let e = err(&bootstrap(routes, "", ""));
    assert!(
        e.contains("routes[0].match.dynamic_metadata") && e.contains("not supported"),
        "{e}"
    );
    let routes = r#"              - match:
                  prefix: /
                  query_parameters: [{name: q, string_match: {safe_regex: {regex: "(["}}}]
                direct_response: {status: 200}
"#;
    let e = err(&bootstrap(routes, "", ""));
    assert!(
        e.contains("routes[0].match.query_parameters[0].string_match.safe_regex.regex"),
        "{e}"
    );
}

#[test]
fn actions_cluster_header_and_rewrites() {
    let routes = r#"              - name: by-header
                match: {prefix: /h}
                route: {cluster_header: X-Cluster}
              - name: regex
                match: {prefix: /r}
                route:
                  cluster: backend
                  regex_rewrite:
                    pattern: {regex: "^/r/([^/]+)/(.*)$"}
                    substitution: "/\\2/by/\\1"
                  host_rewrite_header: X-Host
              - name: host-regex
                match: {prefix: /p}
                route:
                  cluster: backend
                  host_rewrite_path_regex:
                    pattern: {regex: "^/p/([^/]+).*$"}
                    substitution: "\\1.example.com"
"#;
    let s = load(&bootstrap(routes, "", ""));
    let rc = table(&s);
    let h = headers(&[("x-cluster", "backend")]);
    let r = rc.find_route("x", "/h", &h).expect("route");
    let ferry_model::RouteAction::Route { cluster, .. } = &r.action else {
        panic!("route action")
    };
    assert_eq!(cluster.pick(0, &h), "backend");
    assert_eq!(cluster.pick(0, &HeaderMap::new()), "");

    let r = rc.find_route("x", "/r/a/b/c", &h).expect("route");
    let ferry_model::RouteAction::Route {
        regex_rewrite: Some(rw),
        host_rewrite: Some(ferry_model::HostRewrite::Header(hh)),
        ..
    } = &r.action
    else {
        panic!("regex rewrite: {:?}", r.action)
    };
    assert_eq!(rw.apply("/r/a/b/c"), "/b/c/by/a");
    assert_eq!(hh.as_str(), "x-host");

    let r = rc.find_route("x", "/p/svc/x", &h).expect("route");
    let ferry_model::RouteAction::Route {
        host_rewrite: Some(ferry_model::HostRewrite::PathRegex(rw)),
        ..
    } = &r.action
    else {
        panic!("host regex: {:?}", r.action)
    };
    assert_eq!(rw.apply("/p/svc/x"), "svc.example.com");

    let bad = r#"              - match: {prefix: /}
                route:
                  cluster: backend
                  regex_rewrite: {pattern: {regex: "^/(a)$"}, substitution: "/\\2"}
"#;
    let e = err(&bootstrap(bad, "", ""));
    assert!(
        e.contains("routes[0].route.regex_rewrite.substitution") && e.contains("group 2"),
        "{e}"
    );
    let both = r#"              - match: {prefix: /}
                route:
                  cluster: backend
                  prefix_rewrite: /x
                  regex_rewrite: {pattern: {regex: "a"}, substitution: "b"}
"#;
    let e = err(&bootstrap(both, "", ""));
    assert!(e.contains("routes[0].route.regex_rewrite"), "{e}");
}

#[test]
fn header_formatters_compile_once_and_unknown_ones_are_errors() {
    let routes = r#"              - match: {prefix: /}
                route: {cluster: backend}
                request_headers_to_add:
                - header: {key: x-client, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
                - header: {key: x-pct, value: "100%%"}
                response_headers_to_add:
                - header: {key: x-up, value: "%UPSTREAM_REMOTE_ADDRESS%"}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
"#;
    let s = load(&bootstrap(routes, "", ""));
    let rc = table(&s);
    let r = rc.find_route("x", "/", &HeaderMap::new()).expect("route");
    assert_eq!(r.request_headers.ops.len(), 2);
    assert_eq!(r.response_headers.ops.len(), 1);
    let mut h = HeaderMap::new();
    let ctx = ferry_model::format::FormatContext {
        downstream_remote: Some("10.1.2.3:4444".parse().expect("addr")),
        downstream_local: None,
        downstream_local_internal: None,
        upstream_remote: None,
        protocol: "HTTP/1.1",
        hostname: "h",
        start_time: std::time::SystemTime::now(),
    };
    r.request_headers.apply(&mut h, &ctx, None);
    assert_eq!(h["x-client"], "10.1.2.3");
    assert_eq!(h["x-pct"], "100%");

    // Host (and pseudo-headers, which are no header names here) may not be changed.
    let host = routes.replace("key: x-pct", "key: Host");
    let e = err(&bootstrap(&host, "", ""));
    assert!(
        e.contains("routes[0].request_headers_to_add[1].header.key")
            && e.contains("host headers may not be modified"),
        "{e}"
    );
    let colon = routes.replace("key: x-pct", "key: \":path\"");
    let e = err(&bootstrap(&colon, "", ""));
    assert!(
        e.contains("routes[0].request_headers_to_add[1].header.key"),
        "{e}"
    );
    let bad = routes.replace("%UPSTREAM_REMOTE_ADDRESS%", "%UPSTREAM_NOPE%");
    let e = err(&bootstrap(&bad, "", ""));
    assert!(
        e.contains("routes[0].response_headers_to_add[0].header.value")
            && e.contains("%UPSTREAM_NOPE%"),
        "{e}"
    );
}

const CORS_FILTER: &str = r#"          - name: envoy.filters.http.cors
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: rl
              token_bucket: {max_tokens: 2, fill_interval: 60s}
              filter_enabled: {default_value: {numerator: 100}}
              filter_enforced: {default_value: {numerator: 100}}
              status: {code: 503}"#;

const VHOST_CORS: &str = r#"              typed_per_filter_config:
                envoy.filters.http.cors:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
                  allow_origin_string_match: [{suffix: ".example.com"}]
                  allow_methods: GET
                  max_age: "60""#;

#[test]
fn cors_and_local_ratelimit_filters_with_overrides() {
    let routes = r#"              - match: {prefix: /own}
                route: {cluster: backend}
                typed_per_filter_config:
                  envoy.filters.http.cors:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
                    allow_methods: POST
                  envoy.filters.http.local_ratelimit:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
                    stat_prefix: own
                    token_bucket: {max_tokens: 5, tokens_per_fill: 5, fill_interval: 1s}
              - match: {prefix: /}
                route: {cluster: backend}
"#;
    let s = load(&bootstrap(routes, CORS_FILTER, VHOST_CORS));
    let l = s.listener("http").expect("listener");
    let ChainKind::Http(h) = &l.filter_chains[0].kind else {
        panic!("expected HCM")
    };
    assert!(matches!(h.http_filters[0].config, HttpFilterConfig::Cors));
    let HttpFilterConfig::LocalRateLimit(rl) = &h.http_filters[1].config else {
        panic!("local rate limit")
    };
    assert_eq!(rl.status.as_u16(), 503);
    assert_eq!(rl.bucket.as_ref().map(|b| b.max_tokens), Some(2));
    let rc = table(&s);
    let own = rc
        .find_route("x", "/own", &HeaderMap::new())
        .expect("route");
    let policies = own.cors_policies("envoy.filters.http.cors");
    assert_eq!(policies.len(), 2, "route then virtual host");
    assert_eq!(policies[0].allow_methods, "POST");
    assert_eq!(policies[1].max_age, "60");
    let o = own
        .ratelimit_override("envoy.filters.http.local_ratelimit")
        .expect("override");
    assert_eq!(o.stat_prefix, "own");
    // Unset fractions are Envoy's safe defaults: not enabled, not enforced.
    assert_eq!(o.filter_enabled.numerator, 0);
    let other = rc.find_route("x", "/x", &HeaderMap::new()).expect("route");
    assert_eq!(other.cors_policies("envoy.filters.http.cors").len(), 1);
    assert!(
        other
            .ratelimit_override("envoy.filters.http.local_ratelimit")
            .is_none()
    );

    let e = err(&bootstrap(
        "              - match: {prefix: /}\n                route: {cluster: backend}\n",
        &CORS_FILTER.replace("fill_interval: 60s", "fill_interval: 0.01s"),
        "",
    ));
    assert!(
        e.contains("http_filters[1].typed_config.token_bucket.fill_interval"),
        "{e}"
    );
    let e = err(&bootstrap(
        "              - match: {prefix: /}\n                route: {cluster: backend}\n",
        &CORS_FILTER.replace("stat_prefix: rl", "stat_prefix: \"\""),
        "",
    ));
    assert!(
        e.contains("http_filters[1].typed_config.stat_prefix"),
        "{e}"
    );
}

/// Istio's EnvoyFilter recipes wrap the per-route rate limit in a TypedStruct.
#[test]
fn typed_struct_wrapped_local_ratelimit_override() {
    let routes = r#"              - match: {prefix: /}
                route: {cluster: backend}
                typed_per_filter_config:
                  envoy.filters.http.local_ratelimit:
                    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
                    type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
                    value:
                      stat_prefix: http_local_rate_limiter
                      token_bucket: {max_tokens: 3, tokens_per_fill: 3, fill_interval: 60s}
                      filter_enabled: {runtime_key: e, default_value: {numerator: 100, denominator: HUNDRED}}
                      filter_enforced: {runtime_key: f, default_value: {numerator: 100, denominator: HUNDRED}}
"#;
    let s = load(&bootstrap(routes, CORS_FILTER, ""));
    let rc = table(&s);
    let r = rc.find_route("x", "/", &HeaderMap::new()).expect("route");
    let o = r
        .ratelimit_override("envoy.filters.http.local_ratelimit")
        .expect("override");
    assert_eq!(o.bucket.as_ref().map(|b| b.max_tokens), Some(3));
    assert_eq!(o.filter_enforced.numerator, 100);
}

/// `host_rewrite` (a format string) arrives over xDS as a proto field; the JSON descriptor
/// set of bootstraps predates it.
#[test]
fn host_rewrite_format_over_xds() {
    use envoy_types::pb::envoy::config::route::v3 as r;
    let action = r::RouteAction {
        cluster_specifier: Some(r::route_action::ClusterSpecifier::Cluster("backend".into())),
        host_rewrite_specifier: Some(r::route_action::HostRewriteSpecifier::HostRewrite(
            "svc-%REQ(x-tenant)%".into(),
        )),
        ..Default::default()
    };
    let route = r::Route {
        r#match: Some(r::RouteMatch {
            path_specifier: Some(r::route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(r::route::Action::Route(action)),
        ..Default::default()
    };
    let mut rc = r::RouteConfiguration {
        name: "rds".into(),
        virtual_hosts: vec![r::VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![route],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut w = ferry_xds::Warnings::default();
    let table = ferry_xds::convert::route_config(&rc, &mut w).expect("converts");
    let found = table
        .find_route("x", "/", &HeaderMap::new())
        .expect("route");
    let ferry_model::RouteAction::Route {
        host_rewrite: Some(ferry_model::HostRewrite::Format(f)),
        ..
    } = &found.action
    else {
        panic!("{:?}", found.action)
    };
    let ctx = ferry_model::format::FormatContext {
        downstream_remote: None,
        downstream_local: None,
        downstream_local_internal: None,
        upstream_remote: None,
        protocol: "HTTP/1.1",
        hostname: "h",
        start_time: std::time::SystemTime::now(),
    };
    assert_eq!(f.render(&ctx, &headers(&[("x-tenant", "t1")])), "svc-t1");

    // A bad format names the route table and the field.
    if let Some(r::route::Action::Route(a)) = &mut rc.virtual_hosts[0].routes[0].action {
        a.host_rewrite_specifier = Some(r::route_action::HostRewriteSpecifier::HostRewrite(
            "%NOPE%".into(),
        ));
    }
    let e = ferry_xds::convert::route_config(&rc, &mut w)
        .expect_err("unknown command")
        .to_string();
    assert!(
        e.contains("route_configuration \"rds\"")
            && e.contains("virtual_hosts[0].routes[0].route.host_rewrite"),
        "{e}"
    );
}

/// istiod matches methods and authorities with pseudo-header matchers.
#[test]
fn pseudo_header_matchers_are_accepted() {
    let routes = r#"              - name: post
                match:
                  prefix: /
                  headers: [{name: ":method", string_match: {exact: POST}}]
                direct_response: {status: 200}
              - name: other
                match: {prefix: /}
                direct_response: {status: 200}
"#;
    let s = load(&bootstrap(routes, "", ""));
    let rc = table(&s);
    let h = HeaderMap::new();
    let pseudo = |method| ferry_model::Pseudo {
        method,
        path: "/",
        authority: "x",
        scheme: "http",
    };
    let name = |m| {
        rc.find_route_for(&pseudo(m), &h, 0)
            .expect("route")
            .name
            .clone()
    };
    assert_eq!(name("POST"), "post");
    assert_eq!(name("GET"), "other");
    let e = err(&bootstrap(
        &routes.replace("\":method\"", "\":bogus\""),
        "",
        "",
    ));
    assert!(e.contains("routes[0].match.headers[0].name"), "{e}");
}

/// Route rate limit actions and filter descriptors, and the errors for what is not
/// supported.
#[test]
fn rate_limit_actions_and_descriptors() {
    let routes = r#"              - match: {prefix: /}
                route:
                  cluster: backend
                  rate_limits:
                  - actions:
                    - remote_address: {}
                    - header_value_match:
                        descriptor_value: page
                        headers: [{name: ":path", string_match: {prefix: /p}}]
                typed_per_filter_config:
                  envoy.filters.http.local_ratelimit:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
                    stat_prefix: r
                    descriptors:
                    - entries: [{key: header_match, value: page}]
                      token_bucket: {max_tokens: 1, fill_interval: 1s}
"#;
    let s = load(&bootstrap(routes, CORS_FILTER, ""));
    let rc = table(&s);
    let r = rc.find_route("x", "/", &HeaderMap::new()).expect("route");
    assert_eq!(r.rate_limits.len(), 1);
    assert_eq!(r.rate_limits[0].actions.len(), 2);
    let o = r
        .ratelimit_override("envoy.filters.http.local_ratelimit")
        .expect("override");
    assert_eq!(o.descriptors.len(), 1);
    assert!(o.always_consume_default);

    let bad = routes.replace("- remote_address: {}", "- source_cluster: {}");
    let e = err(&bootstrap(&bad, CORS_FILTER, ""));
    assert!(
        e.contains("routes[0].route.rate_limits[0].actions[0]"),
        "{e}"
    );
    let wildcard = routes.replace("value: page}]\n", "value: \"\"}]\n");
    let e = err(&bootstrap(&wildcard, CORS_FILTER, ""));
    assert!(e.contains("descriptors[0].entries[0]"), "{e}");
}
