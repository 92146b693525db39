//! Typed forms of the configuration resources the control plane reads: the
//! Kubernetes objects it needs for service discovery ([`kube`]), Istio's
//! traffic resources ([`networking`]), its security resources
//! ([`security`]) and its Telemetry resource ([`telemetry`]), plus the small value types they share (object metadata,
//! durations, percentages). Istio specs reject unknown fields so a typo in a
//! field name is reported instead of silently ignored; Kubernetes objects
//! accept anything, since only a handful of their fields matter here.

pub mod kube;
pub mod mesh;
pub mod networking;
pub mod security;
pub mod telemetry;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

/// The part of a Kubernetes object's `metadata` the control plane uses.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    pub name: String,
    /// Empty when the manifest leaves it out; [`crate::istio::source`] fills
    /// in `default`, as `kubectl apply` would.
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Identifies one resource in messages: `VirtualService default/reviews`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// A protobuf `Duration` as Istio's CRDs accept it: a Go duration string
/// such as `7s`, `0.5s`, `1m` or `1h30m`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Parses Go's duration syntax: a sequence of decimal numbers, each with
    /// a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`). Negative durations are
    /// rejected: no Istio field accepts one. Kept by hand rather than
    /// humantime: Go's grammar has fractions (`0.5s`) and `µs`, which
    /// humantime refuses, and no spaces, which humantime accepts.
    pub fn parse(s: &str) -> Result<Self, String> {
        let text = s.trim();
        if text.is_empty() {
            return Err("empty duration".to_string());
        }
        if text == "0" {
            return Ok(Self::default());
        }
        let mut nanos: f64 = 0.0;
        let mut rest = text;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| format!("duration {s:?} lacks a unit (e.g. \"{s}s\")"))?;
            if num_len == 0 {
                return Err(format!("invalid duration {s:?}"));
            }
            let value: f64 = rest[..num_len]
                .parse()
                .map_err(|_| format!("invalid number in duration {s:?}"))?;
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale = match &rest[..unit_len] {
                "ns" => 1.0,
                "us" | "µs" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "h" => 3600e9,
                unit => return Err(format!("unknown unit {unit:?} in duration {s:?}")),
            };
            nanos += value * scale;
            rest = &rest[unit_len..];
        }
        // Whole nanoseconds: the float only carries fractions such as `0.5s`.
        Ok(Self(std::time::Duration::from_nanos(nanos.round() as u64)))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Istio's `Percent`: a value between 0 and 100, fractions allowed.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Percent {
    pub value: f64,
}

/// A Kubernetes `IntOrString` (a `targetPort` is a number or a port name).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        let secs = |s: &str| Duration::parse(s).map(|d| d.0.as_secs_f64());
        assert_eq!(secs("7s"), Ok(7.0));
        assert_eq!(secs("0.5s"), Ok(0.5));
        assert_eq!(secs("1m"), Ok(60.0));
        assert_eq!(secs("1h30m"), Ok(5400.0));
        assert_eq!(secs("8ms"), Ok(0.008));
        assert!(Duration::parse("5").is_err());
        assert!(Duration::parse("5x").is_err());
        assert!(Duration::parse("").is_err());
    }
}
