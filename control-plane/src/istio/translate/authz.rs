//! AuthorizationPolicy → Envoy RBAC, as istiod's authz builder lays it
//! out. The policies that select a proxy (its namespace's and the root
//! namespace's, by `selector` or `targetRef`) are grouped by action; each
//! rule becomes one RBAC policy named `ns[NS]-policy[NAME]-rule[I]` whose
//! permissions come from `to` (and the `when` keys about the destination)
//! and whose principals come from `from` (and the `when` keys about the
//! source). Policies annotated `istio.io/dry-run: "true"` go to the shadow
//! rules. One filter is emitted per action in istiod's order: AUDIT
//! (`LOG`), DENY, ALLOW; CUSTOM policies (see [`super::ext_authz`]) go
//! before them.
//!
//! On a TCP filter chain the HTTP-only fields (hosts, methods, paths,
//! request principals, headers, JWT claims) cannot be evaluated: a rule
//! using them is dropped from an ALLOW policy (it then allows less) and
//! only the field is dropped from a DENY or AUDIT rule (it then denies
//! more), as istiod does.

use envoy_types::pb::envoy::config::core::v3::{CidrRange, TypedExtensionConfig};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, filter};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac as RbacRules, permission, principal,
    rbac::Action as RbacAction,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, header_matcher::HeaderMatchSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    ListMatcher, MetadataMatcher, OrMatcher, PathMatcher, RegexMatcher, StringMatcher,
    ValueMatcher, list_matcher, metadata_matcher, path_matcher, string_matcher::MatchPattern,
    value_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use prost::Message;

use super::listener::{HCM, TCP_PROXY, http_filter, typed_filter};
use super::registry::selects;
use super::route::{CORS_FILTER, FAULT_FILTER};
use super::util::any;
use super::{Mesh, Proxy};
use crate::istio::source::{Resource, Spec};
use crate::istio::types::security::{AuthorizationPolicy, AuthzAction, Rule};

pub const HTTP_RBAC: &str = "envoy.filters.http.rbac";
pub const NETWORK_RBAC: &str = "envoy.filters.network.rbac";
/// The annotation that turns a policy's rules into shadow rules.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
const SHADOW_ALLOW_PREFIX: &str = "istio_dry_run_allow_";
const SHADOW_DENY_PREFIX: &str = "istio_dry_run_deny_";
pub(super) const TCP_STAT_PREFIX: &str = "tcp.";
const ROUTER: &str = "envoy.filters.http.router";
const BLACKHOLE_CHAIN: &str = "virtualInbound-blackhole";
const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";
const SPIFFE: &str = "spiffe://";
/// The label a Kubernetes Gateway API deployment carries, which a
/// `targetRef` of kind `Gateway` selects.
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// One AuthorizationPolicy with the metadata translation needs.
#[derive(Clone, Copy, Debug)]
pub(super) struct PolicyRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub dry_run: bool,
    pub spec: &'a AuthorizationPolicy,
}

/// The policies that apply to one proxy, by action, oldest first as the
/// snapshot lists them.
#[derive(Debug, Default)]
pub(super) struct ProxyPolicies<'a> {
    pub allow: Vec<PolicyRef<'a>>,
    pub deny: Vec<PolicyRef<'a>>,
    pub audit: Vec<PolicyRef<'a>>,
    pub custom: Vec<PolicyRef<'a>>,
}

/// Go's `strconv.ParseBool`, which istiod uses on the dry-run annotation;
/// anything else counts as false.
fn parse_bool(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

impl Mesh {
    /// The AuthorizationPolicies selecting `proxy`: those of the root
    /// namespace and of the proxy's namespace without a selector, with a
    /// selector matching its labels, or with a `targetRef` naming the
    /// Gateway it runs for.
    pub(super) fn policies_for<'a>(&'a self, proxy: &Proxy) -> ProxyPolicies<'a> {
        let mut out = ProxyPolicies::default();
        for r in &self.authorization_policies {
            let Spec::AuthorizationPolicy(ap) = &r.spec else {
                continue;
            };
            if !self.policy_selects(r, ap, proxy) {
                continue;
            }
            let p = PolicyRef {
                namespace: &r.meta.namespace,
                name: &r.meta.name,
                dry_run: r
                    .meta
                    .annotations
                    .get(DRY_RUN_ANNOTATION)
                    .is_some_and(|v| parse_bool(v)),
                spec: ap,
            };
            match ap.action.unwrap_or(AuthzAction::Allow) {
                AuthzAction::Allow => out.allow.push(p),
                AuthzAction::Deny => out.deny.push(p),
                AuthzAction::Audit => out.audit.push(p),
                AuthzAction::Custom => out.custom.push(p),
            }
        }
        out
    }

    fn policy_selects(&self, r: &Resource, ap: &AuthorizationPolicy, proxy: &Proxy) -> bool {
        let ns = r.meta.namespace.as_str();
        let root = ns == self.options.root_namespace;
        if ns != proxy.namespace && !root {
            return false;
        }
        let refs: Vec<_> = ap.target_ref.iter().chain(&ap.target_refs).collect();
        if !refs.is_empty() {
            // Only Gateway targets concern the proxies served here (Service
            // targets are for waypoints).
            return refs.iter().any(|t| {
                t.kind == "Gateway"
                    && t.namespace.as_deref().unwrap_or(ns) == proxy.namespace
                    && ns == proxy.namespace
                    && proxy
                        .labels
                        .get(GATEWAY_NAME_LABEL)
                        .is_some_and(|n| *n == t.name)
            });
        }
        ap.selector
            .as_ref()
            .is_none_or(|s| selects(&s.match_labels, &proxy.labels))
    }

    /// The trust domain and its aliases, the local one first.
    pub(super) fn trust_domains(&self) -> Vec<String> {
        let mut tds = vec![self.options.trust_domain.clone()];
        for a in &self.options.trust_domain_aliases {
            if !tds.contains(a) {
                tds.push(a.clone());
            }
        }
        tds
    }

    /// The HTTP filters enforcing the AuthorizationPolicies that select
    /// `proxy`, in istiod's order (CUSTOM, then AUDIT, DENY, ALLOW);
    /// empty when none applies.
    pub fn authz_http_filters(&self, proxy: &Proxy) -> Vec<HttpFilter> {
        let policies = self.policies_for(proxy);
        let tds = self.trust_domains();
        let mut out = super::ext_authz::http_filters(self, &policies.custom, &tds);
        for (set, action) in [
            (&policies.audit, RbacAction::Log),
            (&policies.deny, RbacAction::Deny),
            (&policies.allow, RbacAction::Allow),
        ] {
            if let Some(b) = build(set, action, false, &tds, None) {
                let cfg = HttpRbac {
                    shadow_rules_stat_prefix: shadow_prefix(b.shadow.as_ref()).into(),
                    rules: b.rules,
                    shadow_rules: b.shadow,
                    ..Default::default()
                };
                out.push(http_filter(HTTP_RBAC, any(&cfg)));
            }
        }
        out
    }

    /// The network filters enforcing the AuthorizationPolicies that select
    /// `proxy` on a TCP filter chain, in the same order.
    pub fn authz_network_filters(&self, proxy: &Proxy) -> Vec<Filter> {
        let policies = self.policies_for(proxy);
        let tds = self.trust_domains();
        let mut out = super::ext_authz::network_filters(self, &policies.custom, &tds);
        for (set, action) in [
            (&policies.audit, RbacAction::Log),
            (&policies.deny, RbacAction::Deny),
            (&policies.allow, RbacAction::Allow),
        ] {
            if let Some(b) = build(set, action, true, &tds, None) {
                let cfg = NetworkRbac {
                    stat_prefix: TCP_STAT_PREFIX.into(),
                    shadow_rules_stat_prefix: shadow_prefix(b.shadow.as_ref()).into(),
                    rules: b.rules,
                    shadow_rules: b.shadow,
                    ..Default::default()
                };
                out.push(typed_filter(NETWORK_RBAC, any(&cfg)));
            }
        }
        out
    }
}

/// Adds the authorization filters to one server filter chain: `http`
/// before the traffic filters and the router of its HTTP connection
/// manager, `network` before its TCP proxy. The blackhole chain is left
/// alone.
pub(super) fn apply(chain: &mut FilterChain, http: &[HttpFilter], network: &[Filter]) {
    if let Some(i) = chain.filters.iter().position(|f| f.name == TCP_PROXY) {
        if !network.is_empty() && chain.name != BLACKHOLE_CHAIN {
            chain.filters.splice(i..i, network.iter().cloned());
        }
        return;
    }
    if http.is_empty() {
        return;
    }
    for f in &mut chain.filters {
        if f.name != HCM {
            continue;
        }
        let Some(filter::ConfigType::TypedConfig(cfg)) = &mut f.config_type else {
            continue;
        };
        let Ok(mut hcm) = HttpConnectionManager::decode(cfg.value.as_slice()) else {
            continue;
        };
        // istiod puts authorization before the traffic filters (CORS,
        // fault injection) and the router.
        let at = hcm
            .http_filters
            .iter()
            .position(|h| {
                [ROUTER, FAULT_FILTER, CORS_FILTER, "istio.stats"].contains(&h.name.as_str())
            })
            .unwrap_or(hcm.http_filters.len());
        hcm.http_filters.splice(at..at, http.iter().cloned());
        *cfg = any(&hcm);
    }
}

/// istiod names the shadow statistics after the shadow rules' action, and
/// reads ALLOW when there are none.
fn shadow_prefix(shadow: Option<&RbacRules>) -> &'static str {
    match shadow.map_or(RbacAction::Allow as i32, |s| s.action) {
        a if a == RbacAction::Allow as i32 => SHADOW_ALLOW_PREFIX,
        a if a == RbacAction::Deny as i32 => SHADOW_DENY_PREFIX,
        _ => "",
    }
}

/// The enforced and the dry-run rules of one action.
#[derive(Debug, Default)]
pub(super) struct Built {
    pub rules: Option<RbacRules>,
    pub shadow: Option<RbacRules>,
}

/// The RBAC policy name of rule `i`, with the CUSTOM provider's prefix.
pub(super) fn policy_name(p: &PolicyRef<'_>, i: usize, provider: Option<&str>) -> String {
    let prefix = provider.map_or(String::new(), |pr| format!("istio-ext-authz-{pr}-"));
    format!("{prefix}ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name)
}

/// Builds the rules of `policies` for `action`; `None` without policies.
pub(super) fn build(
    policies: &[PolicyRef<'_>],
    action: RbacAction,
    for_tcp: bool,
    trust_domains: &[String],
    provider: Option<&str>,
) -> Option<Built> {
    if policies.is_empty() {
        return None;
    }
    let empty = || RbacRules {
        action: action as i32,
        ..Default::default()
    };
    let (mut rules, mut shadow) = (None::<RbacRules>, None::<RbacRules>);
    for p in policies {
        let target = if p.dry_run {
            shadow.get_or_insert_with(empty)
        } else {
            rules.get_or_insert_with(empty)
        };
        if p.spec.rules.is_empty() {
            // No rule at all matches nothing, explicitly.
            target
                .policies
                .insert(policy_name(p, 0, provider), match_never());
            continue;
        }
        for (i, rule) in p.spec.rules.iter().enumerate() {
            let name = policy_name(p, i, provider);
            let mut model = match Model::new(p.namespace, rule) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(authz.policy = %name, error = %e, "skipped rule");
                    continue;
                }
            };
            model.migrate_trust_domain(trust_domains);
            match model.generate(for_tcp, action) {
                Ok(policy) => {
                    target.policies.insert(name, policy);
                }
                Err(e) => {
                    tracing::debug!(authz.policy = %name, error = %e, "skipped rule");
                }
            }
        }
    }
    Some(Built { rules, shadow })
}

fn match_never() -> Policy {
    Policy {
        permissions: vec![perm_not(perm_any())],
        principals: vec![id_not(id_any())],
        ..Default::default()
    }
}

/// What a rule condition is about: the destination (a permission) or the
/// source (a principal), and how values become matchers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Attr {
    // Permissions.
    Host,
    Method,
    Path,
    DestPort,
    DestIp,
    Sni,
    /// `experimental.envoy.filters.FILTER[KEY]`.
    EnvoyFilter(String, String),
    // Principals.
    SrcIp,
    RemoteIp,
    SrcNamespace,
    SrcServiceAccount,
    SrcPrincipal,
    TrustDomain,
    RequestPrincipal,
    Audiences,
    Presenter,
    Header(String),
    Claims(Vec<String>),
}

impl Attr {
    fn http_only(&self) -> bool {
        matches!(
            self,
            Attr::Host
                | Attr::Method
                | Attr::Path
                | Attr::RequestPrincipal
                | Attr::Audiences
                | Attr::Presenter
                | Attr::Header(_)
                | Attr::Claims(_)
        )
    }

    /// Attributes whose values make one matcher together (istiod's
    /// "extended" generators) rather than one matcher each.
    fn combined(&self) -> bool {
        matches!(
            self,
            Attr::EnvoyFilter(..)
                | Attr::RequestPrincipal
                | Attr::Audiences
                | Attr::Presenter
                | Attr::Claims(_)
        )
    }
}

#[derive(Clone, Debug)]
struct Cond {
    attr: Attr,
    values: Vec<String>,
    not_values: Vec<String>,
}

/// One rule, split into alternative permission and principal sets: each
/// `to` makes one permission, each `from` one principal; `when` keys are
/// added to all of them.
#[derive(Debug)]
struct Model {
    permissions: Vec<Vec<Cond>>,
    principals: Vec<Vec<Cond>>,
}

/// Why one value or rule could not be translated.
#[derive(Debug, thiserror::Error)]
pub(super) enum GenError {
    #[error("unknown attribute {0:?}")]
    UnknownAttribute(String),
    #[error("{0:?} is HTTP only")]
    HttpOnly(String),
    #[error("invalid IP address or CIDR {0:?}")]
    InvalidCidr(String),
    #[error("invalid port {0:?}")]
    InvalidPort(String),
    #[error("invalid key {0:?}")]
    InvalidKey(String),
}

fn push(list: &mut Vec<Cond>, front: bool, attr: Attr, values: &[String], not_values: &[String]) {
    if values.is_empty() && not_values.is_empty() {
        return;
    }
    let c = Cond {
        attr,
        values: values.to_vec(),
        not_values: not_values.to_vec(),
    };
    if front {
        list.insert(0, c);
    } else {
        list.push(c);
    }
}

/// The name inside `[...]` right after `prefix`: `request.headers[X-Foo]`.
fn bracketed(key: &str, prefix: &str) -> Result<String, GenError> {
    key.strip_prefix(prefix)
        .and_then(|k| k.strip_prefix('['))
        .and_then(|k| k.strip_suffix(']'))
        .filter(|k| !k.is_empty() && !k.contains(['[', ']']))
        .map(str::to_string)
        .ok_or_else(|| GenError::InvalidKey(key.into()))
}

/// `request.auth.claims[a][b]` → `[a, b]`; `[a.b]` stays one claim.
fn claims(key: &str) -> Result<Vec<String>, GenError> {
    let rest = key
        .strip_prefix("request.auth.claims")
        .ok_or_else(|| GenError::InvalidKey(key.into()))?;
    let mut out = Vec::new();
    let mut s = rest;
    while !s.is_empty() {
        let inner = s
            .strip_prefix('[')
            .and_then(|t| t.split_once(']'))
            .filter(|(name, _)| !name.is_empty() && !name.contains('['));
        let Some((name, tail)) = inner else {
            return Err(GenError::InvalidKey(key.into()));
        };
        out.push(name.to_string());
        s = tail;
    }
    if out.is_empty() {
        return Err(GenError::InvalidKey(key.into()));
    }
    Ok(out)
}

impl Model {
    fn new(namespace: &str, rule: &Rule) -> Result<Self, GenError> {
        let mut base_perm = Vec::new();
        let mut base_prin = Vec::new();
        for w in &rule.when {
            let k = w.key.as_str();
            let (perm, attr) = match k {
                "destination.ip" => (true, Attr::DestIp),
                "destination.port" => (true, Attr::DestPort),
                "connection.sni" => (true, Attr::Sni),
                _ if k.starts_with("experimental.envoy.filters.") => {
                    let inner = k.trim_start_matches("experimental.");
                    let (filter, key) = inner
                        .strip_suffix(']')
                        .and_then(|s| s.split_once('['))
                        .ok_or_else(|| GenError::InvalidKey(k.into()))?;
                    (true, Attr::EnvoyFilter(filter.into(), key.into()))
                }
                "source.ip" => (false, Attr::SrcIp),
                "remote.ip" => (false, Attr::RemoteIp),
                "source.namespace" => (false, Attr::SrcNamespace),
                "source.serviceAccount" => (false, Attr::SrcServiceAccount),
                "source.principal" => (false, Attr::SrcPrincipal),
                "request.auth.principal" => (false, Attr::RequestPrincipal),
                "request.auth.audiences" => (false, Attr::Audiences),
                "request.auth.presenter" => (false, Attr::Presenter),
                _ if k.starts_with("request.headers") => {
                    (false, Attr::Header(bracketed(k, "request.headers")?))
                }
                _ if k.starts_with("request.auth.claims") => (false, Attr::Claims(claims(k)?)),
                _ => return Err(GenError::UnknownAttribute(k.into())),
            };
            let list = if perm { &mut base_perm } else { &mut base_prin };
            push(list, false, attr, &w.values, &w.not_values);
        }
        let mut principals = Vec::new();
        for from in &rule.from {
            let s = &from.source;
            let mut m = base_prin.clone();
            // Inserted at the front one by one: the last one ends up first.
            push(&mut m, true, Attr::SrcIp, &s.ip_blocks, &s.not_ip_blocks);
            push(
                &mut m,
                true,
                Attr::RemoteIp,
                &s.remote_ip_blocks,
                &s.not_remote_ip_blocks,
            );
            push(
                &mut m,
                true,
                Attr::SrcNamespace,
                &s.namespaces,
                &s.not_namespaces,
            );
            push(
                &mut m,
                true,
                Attr::TrustDomain,
                &s.trust_domains,
                &s.not_trust_domains,
            );
            let sa = |v: &[String]| -> Vec<String> {
                v.iter()
                    .map(|a| {
                        if a.contains('/') {
                            a.clone()
                        } else {
                            format!("{namespace}/{a}")
                        }
                    })
                    .collect()
            };
            push(
                &mut m,
                true,
                Attr::SrcServiceAccount,
                &sa(&s.service_accounts),
                &sa(&s.not_service_accounts),
            );
            push(
                &mut m,
                true,
                Attr::RequestPrincipal,
                &s.request_principals,
                &s.not_request_principals,
            );
            push(
                &mut m,
                true,
                Attr::SrcPrincipal,
                &s.principals,
                &s.not_principals,
            );
            principals.push(m);
        }
        if rule.from.is_empty() {
            principals.push(base_prin);
        }
        // `when: source.serviceAccount` values without a namespace are the
        // policy's namespace too.
        for list in &mut principals {
            for c in list.iter_mut() {
                if c.attr == Attr::SrcServiceAccount {
                    for v in c.values.iter_mut().chain(c.not_values.iter_mut()) {
                        if !v.contains('/') {
                            *v = format!("{namespace}/{v}");
                        }
                    }
                }
            }
        }
        let mut permissions = Vec::new();
        for to in &rule.to {
            let o = &to.operation;
            let mut m = base_perm.clone();
            push(&mut m, true, Attr::DestPort, &o.ports, &o.not_ports);
            push(&mut m, true, Attr::Path, &o.paths, &o.not_paths);
            push(&mut m, true, Attr::Method, &o.methods, &o.not_methods);
            push(&mut m, true, Attr::Host, &o.hosts, &o.not_hosts);
            permissions.push(m);
        }
        if rule.to.is_empty() {
            permissions.push(base_perm);
        }
        Ok(Self {
            permissions,
            principals,
        })
    }

    /// Source principals written with the local trust domain, an alias or
    /// `cluster.local` match all of them.
    fn migrate_trust_domain(&mut self, tds: &[String]) {
        for list in &mut self.principals {
            for c in list.iter_mut() {
                match c.attr {
                    Attr::SrcPrincipal => {
                        c.values = expand_principals(&c.values, tds);
                        c.not_values = expand_principals(&c.not_values, tds);
                    }
                    Attr::TrustDomain => {
                        c.values = expand_trust_domains(&c.values, tds);
                        c.not_values = expand_trust_domains(&c.not_values, tds);
                    }
                    _ => {}
                }
            }
        }
    }

    fn generate(&self, for_tcp: bool, action: RbacAction) -> Result<Policy, GenError> {
        let allow = action == RbacAction::Allow;
        let mut permissions = Vec::new();
        for list in &self.permissions {
            let mut and = Vec::new();
            for c in list {
                and.extend(cond_permissions(c, for_tcp, allow)?);
            }
            if and.is_empty() {
                and.push(perm_any());
            }
            permissions.push(perm_and(and));
        }
        let mut principals = Vec::new();
        for list in &self.principals {
            let mut and = Vec::new();
            for c in list {
                and.extend(cond_principals(c, for_tcp, allow)?);
            }
            if and.is_empty() {
                and.push(id_any());
            }
            principals.push(id_and(and));
        }
        Ok(Policy {
            permissions,
            principals,
            ..Default::default()
        })
    }
}

/// istiod's rule for a value it cannot translate: an ALLOW policy loses the
/// whole rule, a DENY or AUDIT policy only the value.
fn tolerate<T>(r: Result<T, GenError>, allow: bool) -> Result<Option<T>, GenError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if allow => Err(e),
        Err(_) => Ok(None),
    }
}

fn cond_permissions(c: &Cond, tcp: bool, allow: bool) -> Result<Vec<Permission>, GenError> {
    let mut out = Vec::new();
    if c.attr.combined() {
        if !c.values.is_empty()
            && let Some(p) = tolerate(combined_permission(&c.attr, &c.values, tcp), allow)?
        {
            out.push(p);
        }
        if !c.not_values.is_empty()
            && let Some(p) = tolerate(combined_permission(&c.attr, &c.not_values, tcp), allow)?
        {
            out.push(perm_not(p));
        }
        return Ok(out);
    }
    for (vals, negate) in [(&c.values, false), (&c.not_values, true)] {
        let mut or = Vec::new();
        for v in vals {
            if let Some(p) = tolerate(permission(&c.attr, v, tcp), allow)? {
                or.push(p);
            }
        }
        if !or.is_empty() {
            let p = perm_or(or);
            out.push(if negate { perm_not(p) } else { p });
        }
    }
    Ok(out)
}

fn cond_principals(c: &Cond, tcp: bool, allow: bool) -> Result<Vec<Principal>, GenError> {
    let mut out = Vec::new();
    if c.attr.combined() {
        if !c.values.is_empty()
            && let Some(p) = tolerate(combined_principal(&c.attr, &c.values, tcp), allow)?
        {
            out.push(p);
        }
        if !c.not_values.is_empty()
            && let Some(p) = tolerate(combined_principal(&c.attr, &c.not_values, tcp), allow)?
        {
            out.push(id_not(p));
        }
        return Ok(out);
    }
    for (vals, negate) in [(&c.values, false), (&c.not_values, true)] {
        let mut or = Vec::new();
        for v in vals {
            if let Some(p) = tolerate(principal_of(&c.attr, v, tcp), allow)? {
                or.push(p);
            }
        }
        if !or.is_empty() {
            let p = id_or(or);
            out.push(if negate { id_not(p) } else { p });
        }
    }
    Ok(out)
}

fn attr_name(a: &Attr) -> String {
    match a {
        Attr::Host => "hosts".into(),
        Attr::Method => "methods".into(),
        Attr::Path => "paths".into(),
        Attr::RequestPrincipal => "request.auth.principal".into(),
        Attr::Audiences => "request.auth.audiences".into(),
        Attr::Presenter => "request.auth.presenter".into(),
        Attr::Header(h) => format!("request.headers[{h}]"),
        Attr::Claims(c) => format!("request.auth.claims[{}]", c.join("][")),
        other => format!("{other:?}"),
    }
}

fn permission(attr: &Attr, v: &str, tcp: bool) -> Result<Permission, GenError> {
    if tcp && attr.http_only() {
        return Err(GenError::HttpOnly(attr_name(attr)));
    }
    let rule = match attr {
        Attr::Host => permission::Rule::Header(header_matcher(":authority", v, true)),
        Attr::Method => permission::Rule::Header(header_matcher(":method", v, false)),
        Attr::Path => {
            if v.contains("{*}") || v.contains("{**}") {
                let template = v.replace("{**}", "**").replace("{*}", "*");
                permission::Rule::UriTemplate(TypedExtensionConfig {
                    name: "uri-template".into(),
                    typed_config: Some(any(&UriTemplateMatchConfig {
                        path_template: template,
                    })),
                })
            } else {
                permission::Rule::UrlPath(PathMatcher {
                    rule: Some(path_matcher::Rule::Path(string_matcher(v))),
                })
            }
        }
        Attr::DestPort => permission::Rule::DestinationPort(port(v)?),
        Attr::DestIp => permission::Rule::DestinationIp(cidr(v)?),
        Attr::Sni => permission::Rule::RequestedServerName(string_matcher(v)),
        _ => return Err(GenError::UnknownAttribute(attr_name(attr))),
    };
    Ok(Permission { rule: Some(rule) })
}

#[allow(deprecated)]
fn combined_permission(attr: &Attr, values: &[String], _tcp: bool) -> Result<Permission, GenError> {
    let Attr::EnvoyFilter(filter, key) = attr else {
        return Err(GenError::UnknownAttribute(attr_name(attr)));
    };
    let matchers = values
        .iter()
        .map(
            |v| match v.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                Some(inner) => value_list(value_string(string_matcher(inner))),
                None => value_string(string_matcher(v)),
            },
        )
        .collect();
    Ok(Permission {
        rule: Some(permission::Rule::Metadata(metadata(
            filter,
            std::slice::from_ref(key),
            value_or(matchers),
        ))),
    })
}

fn principal_of(attr: &Attr, v: &str, tcp: bool) -> Result<Principal, GenError> {
    if tcp && attr.http_only() {
        return Err(GenError::HttpOnly(attr_name(attr)));
    }
    let id = match attr {
        Attr::SrcIp => principal::Identifier::DirectRemoteIp(cidr(v)?),
        Attr::RemoteIp => principal::Identifier::RemoteIp(cidr(v)?),
        Attr::SrcNamespace => {
            authenticated(regex(format!(".*/ns/{}/.*", quote_wildcards(v, ".*"))))
        }
        Attr::SrcServiceAccount => {
            let (ns, sa) = v.split_once('/').unwrap_or(("", v));
            authenticated(regex(format!(
                "spiffe://.+/ns/{}/(.+/|)sa/{}(/.+)?",
                quote_meta(ns),
                quote_meta(sa)
            )))
        }
        Attr::SrcPrincipal => authenticated(string_matcher_with_prefix(v, SPIFFE)),
        Attr::TrustDomain => {
            if v.contains('*') {
                authenticated(regex(format!(
                    "spiffe://{}/.*",
                    quote_wildcards(v, "[^/]*")
                )))
            } else {
                authenticated(prefix(format!("spiffe://{v}/"), false))
            }
        }
        Attr::Header(h) => principal::Identifier::Header(header_matcher(h, v, false)),
        _ => return Err(GenError::UnknownAttribute(attr_name(attr))),
    };
    Ok(Principal {
        identifier: Some(id),
    })
}

#[allow(deprecated)]
fn combined_principal(attr: &Attr, values: &[String], tcp: bool) -> Result<Principal, GenError> {
    if tcp && attr.http_only() {
        return Err(GenError::HttpOnly(attr_name(attr)));
    }
    let meta = |m: MetadataMatcher| Principal {
        identifier: Some(principal::Identifier::Metadata(m)),
    };
    let claim_list = |claims: &[String]| {
        let mut path = vec!["payload".to_string()];
        path.extend(claims.iter().cloned());
        let or = value_or(
            values
                .iter()
                .map(|v| value_string(string_matcher(v)))
                .collect(),
        );
        // A claim may be a string or a list of strings.
        metadata(
            JWT_FILTER,
            &path,
            value_or(vec![value_list(or.clone()), or]),
        )
    };
    match attr {
        Attr::RequestPrincipal => {
            let mut or: Vec<Principal> = values.iter().map(|v| request_principal(v)).collect();
            Ok(if or.len() == 1 {
                or.remove(0)
            } else {
                id_or(or)
            })
        }
        Attr::Audiences => Ok(meta(claim_list(&["aud".into()]))),
        Attr::Presenter => Ok(meta(claim_list(&["azp".into()]))),
        Attr::Claims(c) => Ok(meta(claim_list(c))),
        _ => Err(GenError::UnknownAttribute(attr_name(attr))),
    }
}

/// `ISS/SUB` of a JWT (the issuer may itself contain `/`), each side
/// matched with the request's `iss` and `sub` claims.
#[allow(deprecated)]
fn request_principal(v: &str) -> Principal {
    let any_value = || regex(".+".into());
    let (iss, sub, found) = match v.rfind('/') {
        Some(i) => (&v[..i], &v[i + 1..], true),
        None => (v, "", false),
    };
    let (mi, ms) = if v == "*" {
        (any_value(), any_value())
    } else if let Some(rest) = v.strip_prefix('*') {
        if found {
            let mi = if iss == "*" {
                any_value()
            } else {
                suffix(iss.trim_start_matches('*').into(), false)
            };
            (mi, exact(sub.into(), false))
        } else {
            (any_value(), suffix(rest.into(), false))
        }
    } else if let Some(rest) = v.strip_suffix('*') {
        if found {
            let ms = if sub == "*" {
                any_value()
            } else {
                prefix(sub.trim_end_matches('*').into(), false)
            };
            (exact(iss.into(), false), ms)
        } else {
            (prefix(rest.into(), false), any_value())
        }
    } else {
        (exact(iss.into(), false), exact(sub.into(), false))
    };
    let claim = |name: &str, m: StringMatcher| Principal {
        identifier: Some(principal::Identifier::Metadata(metadata(
            JWT_FILTER,
            &["payload".into(), name.into()],
            value_string(m),
        ))),
    };
    id_and(vec![claim("iss", mi), claim("sub", ms)])
}

/// istiod's principal alias expansion: a principal naming the local trust
/// domain, an alias or `cluster.local` is repeated for each of them.
fn expand_principals(values: &[String], tds: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for p in values {
        let parts: Vec<&str> = p.split('/').collect();
        if parts.len() != 5 || parts[0] == "*" {
            out.push(p.clone());
            continue;
        }
        let td = parts[0];
        if !(td_list_match(td, tds) || td == crate::istio::names::DEFAULT_DOMAIN) {
            out.push(p.clone());
            continue;
        }
        let mut these: Vec<String> = Vec::new();
        for t in tds {
            let candidate = if suffix_match(t, td) {
                p.clone()
            } else {
                format!("{t}/{}", parts[1..].join("/"))
            };
            if !these.contains(&candidate) {
                these.push(candidate);
            }
        }
        out.extend(these);
    }
    out
}

/// `trustDomains` naming the local trust domain or an alias match all.
fn expand_trust_domains(values: &[String], tds: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        let add: Vec<String> = if tds.contains(v) {
            tds.to_vec()
        } else {
            vec![v.clone()]
        };
        for a in add {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

fn prefix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_suffix('*').is_some_and(|p| a.starts_with(p))
}

fn suffix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_prefix('*').is_some_and(|p| a.ends_with(p))
}

fn td_list_match(a: &str, list: &[String]) -> bool {
    list.iter().any(|s| {
        a == s
            || s == "*"
            || prefix_match(a, s)
            || prefix_match(s, a)
            || suffix_match(a, s)
            || suffix_match(s, a)
    })
}

/// Go's `regexp.QuoteMeta`.
fn quote_meta(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Quotes `s` for a regex, each `*` becoming `wildcard`.
fn quote_wildcards(s: &str, wildcard: &str) -> String {
    s.split('*')
        .map(quote_meta)
        .collect::<Vec<_>>()
        .join(wildcard)
}

fn port(v: &str) -> Result<u32, GenError> {
    v.parse::<u16>()
        .map(u32::from)
        .map_err(|_| GenError::InvalidPort(v.into()))
}

fn cidr(v: &str) -> Result<CidrRange, GenError> {
    let net = crate::istio::types::security::ip_block(v)
        .ok_or_else(|| GenError::InvalidCidr(v.into()))?;
    // The address as written (istiod keeps it so), the length as parsed.
    let addr = v.split_once('/').map_or(v, |(a, _)| a);
    Ok(CidrRange {
        address_prefix: addr.into(),
        prefix_len: Some(UInt32Value {
            value: u32::from(net.prefix_len()),
        }),
    })
}

fn sm(p: MatchPattern, ignore_case: bool) -> StringMatcher {
    StringMatcher {
        ignore_case,
        match_pattern: Some(p),
    }
}

fn exact(s: String, ic: bool) -> StringMatcher {
    sm(MatchPattern::Exact(s), ic)
}

fn prefix(s: String, ic: bool) -> StringMatcher {
    sm(MatchPattern::Prefix(s), ic)
}

fn suffix(s: String, ic: bool) -> StringMatcher {
    sm(MatchPattern::Suffix(s), ic)
}

fn regex(r: String) -> StringMatcher {
    sm(
        MatchPattern::SafeRegex(RegexMatcher {
            regex: r,
            ..Default::default()
        }),
        false,
    )
}

/// Istio's value syntax: `*` (anything non-empty), `*suffix`, `prefix*`,
/// else exact.
fn string_matcher(v: &str) -> StringMatcher {
    string_matcher_with_prefix(v, "")
}

fn string_matcher_with_prefix(v: &str, pre: &str) -> StringMatcher {
    if v == "*" {
        regex(".+".into())
    } else if let Some(rest) = v.strip_prefix('*') {
        if pre.is_empty() {
            suffix(rest.into(), false)
        } else {
            regex(format!("{}.*{}", quote_meta(pre), quote_meta(rest)))
        }
    } else if let Some(rest) = v.strip_suffix('*') {
        prefix(format!("{pre}{rest}"), false)
    } else {
        exact(format!("{pre}{v}"), false)
    }
}

/// A header matcher in Istio's value syntax; `*` means present.
fn header_matcher(name: &str, v: &str, ignore_case: bool) -> HeaderMatcher {
    let spec = if v == "*" {
        HeaderMatchSpecifier::PresentMatch(true)
    } else if let Some(rest) = v.strip_prefix('*') {
        HeaderMatchSpecifier::StringMatch(suffix(rest.into(), ignore_case))
    } else if let Some(rest) = v.strip_suffix('*') {
        HeaderMatchSpecifier::StringMatch(prefix(rest.into(), ignore_case))
    } else {
        HeaderMatchSpecifier::StringMatch(exact(v.into(), ignore_case))
    };
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

fn value_string(m: StringMatcher) -> ValueMatcher {
    ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::StringMatch(m)),
    }
}

fn value_list(one_of: ValueMatcher) -> ValueMatcher {
    ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::ListMatch(Box::new(
            ListMatcher {
                match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(one_of))),
            },
        ))),
    }
}

/// One matcher stays as it is; several are OR-ed.
fn value_or(mut ms: Vec<ValueMatcher>) -> ValueMatcher {
    if ms.len() == 1 {
        return ms.remove(0);
    }
    ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::OrMatch(OrMatcher {
            value_matchers: ms,
        })),
    }
}

fn metadata(filter: &str, path: &[String], value: ValueMatcher) -> MetadataMatcher {
    MetadataMatcher {
        filter: filter.into(),
        path: path
            .iter()
            .map(|k| metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key(k.clone())),
            })
            .collect(),
        value: Some(value),
        ..Default::default()
    }
}

fn authenticated(m: StringMatcher) -> principal::Identifier {
    principal::Identifier::Authenticated(principal::Authenticated {
        principal_name: Some(m),
    })
}

fn perm_any() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn perm_and(rules: Vec<Permission>) -> Permission {
    Permission {
        rule: Some(permission::Rule::AndRules(permission::Set { rules })),
    }
}

fn perm_or(rules: Vec<Permission>) -> Permission {
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set { rules })),
    }
}

fn perm_not(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

fn id_any() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn id_and(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
    }
}

fn id_or(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
    }
}

fn id_not(p: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(p))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_expand_to_trust_domain_aliases() {
        let tds = vec!["td1".to_string(), "cluster.local".into()];
        assert_eq!(
            expand_principals(&["cluster.local/ns/a/sa/b".into()], &tds),
            ["td1/ns/a/sa/b", "cluster.local/ns/a/sa/b"]
        );
        let tds = vec![
            "new-td".to_string(),
            "old-td".into(),
            "some-trustdomain".into(),
        ];
        assert_eq!(
            expand_principals(&["*-td/ns/foo/sa/x".into()], &tds),
            ["*-td/ns/foo/sa/x", "some-trustdomain/ns/foo/sa/x"]
        );
        assert_eq!(
            expand_principals(&["*/ns/foo/sa/x".into(), "plain".into()], &tds),
            ["*/ns/foo/sa/x", "plain"]
        );
    }

    #[test]
    fn values_follow_istio_wildcards() {
        assert_eq!(string_matcher("*"), regex(".+".into()));
        assert_eq!(string_matcher("*.com"), suffix(".com".into(), false));
        assert_eq!(
            string_matcher_with_prefix("*/ns/a[0]", SPIFFE),
            regex(r"spiffe://.*/ns/a\[0\]".into())
        );
        assert_eq!(quote_wildcards("bad*", "[^/]*"), "bad[^/]*");
        assert!(cidr("10.0.0.0/33").is_err());
        assert_eq!(
            claims("request.auth.claims[a][b]").expect("claims"),
            ["a", "b"]
        );
        assert!(claims("request.auth.claims[a").is_err());
    }
}
