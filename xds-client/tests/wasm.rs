//! Wasm filters: Ferry runs no Wasm. Istio's built-in null-VM plugins
//! (metadata exchange, stats) are what Ferry does natively and are accepted
//! with a warning; a plugin that fails open is skipped with a warning (Envoy
//! lets traffic through when such a plugin cannot run); any other plugin is
//! refused by name, since skipping a plugin that fails closed would let
//! through what it stops.

use ferry_xds::bootstrap::parse_bootstrap;

/// A bootstrap with one HTTP filter before the router and one network
/// filter before the connection manager (YAML list items, indented).
fn bootstrap(http_filter: &str, network_filter: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}
    filter_chains:
    - filters:
{network_filter}
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
{http_filter}
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

/// A Wasm filter of `kind` ("http" or "network") with `plugin` (YAML
/// fields of its PluginConfig, indented for `config:`), at `indent`.
fn wasm(kind: &str, name: &str, plugin: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let text = format!(
        r#"- name: {name}
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.{kind}.wasm.v3.Wasm
    config:
{plugin}"#
    );
    text.lines()
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Istio's null-VM plugin `code` as istiod 1.18 writes it.
fn null_vm(code: &str) -> String {
    format!(
        r#"      root_id: x
      vm_config:
        vm_id: x
        runtime: envoy.wasm.runtime.null
        code: {{local: {{inline_string: {code}}}}}"#
    )
}

/// A real plugin fetched from a file, with an optional failure policy.
fn plugin(failure: &str) -> String {
    format!(
        r#"      name: auth
      {failure}
      vm_config:
        runtime: envoy.wasm.runtime.v8
        code: {{local: {{filename: /etc/istio/auth.wasm}}}}"#
    )
}

fn accepted(text: &str) -> Vec<String> {
    match parse_bootstrap("test.yaml", text) {
        Ok(b) => b.warnings.0.clone(),
        Err(e) => panic!("refused: {e}\n{text}"),
    }
}

fn refused(text: &str) -> String {
    match parse_bootstrap("test.yaml", text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn istio_built_in_plugins_are_done_natively() {
    let text = bootstrap(
        &wasm(
            "http",
            "istio.metadata_exchange",
            &null_vm("envoy.wasm.metadata_exchange"),
            10,
        ),
        &wasm("network", "istio.stats", &null_vm("envoy.wasm.stats"), 6),
    );
    let warnings = accepted(&text);
    for code in ["envoy.wasm.metadata_exchange", "envoy.wasm.stats"] {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(code) && w.contains("natively")),
            "{code}: {warnings:?}"
        );
    }
}

#[test]
fn a_plugin_that_fails_closed_is_refused_by_name() {
    for failure in ["", "failure_policy: FAIL_CLOSED", "fail_open: false"] {
        let e = refused(&bootstrap(&wasm("http", "authn", &plugin(failure), 10), ""));
        assert!(
            e.contains("authn") && e.contains("fails closed") && e.contains("http_filters[0]"),
            "{failure}: {e}"
        );
        let e = refused(&bootstrap(
            "",
            &wasm("network", "tcp-authn", &plugin(failure), 6),
        ));
        assert!(
            e.contains("tcp-authn") && e.contains("fails closed") && e.contains("filters[0]"),
            "{failure}: {e}"
        );
    }
    // A built-in's name on another runtime is a real plugin.
    let mut real = null_vm("envoy.wasm.metadata_exchange");
    real = real.replace("envoy.wasm.runtime.null", "envoy.wasm.runtime.v8");
    let e = refused(&bootstrap(&wasm("http", "mx", &real, 10), ""));
    assert!(e.contains("fails closed"), "{e}");
    // An unknown null-VM plugin too.
    let e = refused(&bootstrap(
        &wasm("http", "other", &null_vm("example.plugin"), 10),
        "",
    ));
    assert!(e.contains("fails closed"), "{e}");
}

#[test]
fn a_plugin_that_fails_open_is_skipped_with_a_warning() {
    for failure in ["failure_policy: FAIL_OPEN", "fail_open: true"] {
        let warnings = accepted(&bootstrap(
            &wasm("http", "headers", &plugin(failure), 10),
            "",
        ));
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("headers") && w.contains("fails open")),
            "{failure}: {warnings:?}"
        );
    }
}
