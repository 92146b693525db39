//! The TCP proxy's decision fields, proven equal to Envoy's: `max_connect_attempts`
//! (a failed connect moves on to another host), `max_downstream_connection_duration`
//! (the connection is closed at that age, busy or not) and the `source_ip` hash policy
//! (one client, one host). Each scenario runs the same static bootstrap through Ferry
//! and Envoy 1.40 in front of the same `tests/apps/echo.py` TCP echo servers, and also
//! asserts its expectation outright.
//!
//! Envoy comes from `ferry_tests::envoy`; without it a test is skipped with a note,
//! except under `CI=true`, where a missing Envoy fails the test.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, Upstream, free_port, listener, local, static_cluster, tcp_proxy,
};
use serde_json::{Value, json};

/// A bootstrap with one TCP proxy listener on `port` to `cluster`, its `TcpProxy` fields
/// extended by `extra`.
fn config(port: u16, cluster: Value, extra: Value) -> Value {
    let mut tp = tcp_proxy("t", "c");
    if let (Some(tc), Some(e)) = (tp["typed_config"].as_object_mut(), extra.as_object()) {
        tc.extend(e.clone());
    }
    let doc = Bootstrap::new()
        .listener(listener("in", port, vec![json!({"filters": [tp]})]))
        .cluster(cluster)
        .render();
    serde_json::from_str(&doc).unwrap_or(Value::Null)
}

/// Sends a line and reads its echo: `true` when the connection carried it.
fn echo(port: u16) -> Result<bool> {
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    if s.write_all(b"ping\n").is_err() {
        return Ok(false);
    }
    let mut buf = [0u8; 16];
    Ok(matches!(s.read(&mut buf), Ok(n) if n > 0 && buf[..n].starts_with(b"ping")))
}

/// What `observe` sees through Ferry and then Envoy, each on `config(port)`.
fn through_both<T>(
    config: impl Fn(u16) -> Value,
    mut observe: impl FnMut(u16) -> Result<T>,
) -> Result<Option<(T, T)>> {
    let Some(bin) = envoy::bin()? else {
        return Ok(None);
    };
    let port = free_port();
    let ferry = Ferry::start(&config(port).to_string())?;
    let a = observe(port).with_context(|| format!("through ferry; log:\n{}", ferry.log()))?;
    drop(ferry);
    let port = free_port();
    let e = Envoy::start(&bin, &config(port), port)?;
    let b = observe(port).with_context(|| format!("through envoy; log:\n{}", e.log()))?;
    Ok(Some((a, b)))
}

/// Round robin over a closed port and a live echo server: with one connect attempt
/// every other connection fails; with two, the failed attempt moves on to the live host
/// and every connection is carried.
#[test]
fn max_connect_attempts_moves_on_to_another_host() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::mode("tcp")?;
    let dead = free_port();
    for attempts in [1, 2] {
        let cfg = |port| {
            config(
                port,
                static_cluster("c", &[dead, app.port], Upstream::Http1),
                json!({"max_connect_attempts": attempts}),
            )
        };
        let observed = through_both(cfg, |port| {
            (0..6)
                .map(|_| echo(port))
                .collect::<Result<Vec<bool>>>()
                .map(|v| v.iter().filter(|ok| **ok).count())
        })?;
        let Some((ferry, envoy)) = observed else {
            return Ok(());
        };
        assert_eq!(ferry, envoy, "max_connect_attempts {attempts}");
        assert_eq!(ferry, if attempts == 1 { 3 } else { 6 }, "{attempts}");
    }
    Ok(())
}

/// `max_downstream_connection_duration`: a connection still in use is closed at that
/// age, and counted.
#[test]
fn max_downstream_connection_duration_closes_at_that_age() -> Result<()> {
    let _lock = RunLock::shared();
    let app = App::mode("tcp")?;
    let cfg = |port| {
        config(
            port,
            static_cluster("c", &[app.port], Upstream::Http1),
            json!({"max_downstream_connection_duration": "1s"}),
        )
    };
    let observe = |port| -> Result<(bool, bool)> {
        let mut s = TcpStream::connect(local(port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let opened = Instant::now();
        s.write_all(b"ping\n")?;
        let mut buf = [0u8; 64];
        let first = s.read(&mut buf)?;
        let carried = first > 0 && opened.elapsed() < Duration::from_millis(900);
        // Keep it busy: the close comes at the age, not after idling.
        let closed = loop {
            if opened.elapsed() > Duration::from_secs(8) {
                break false;
            }
            if s.write_all(b"ping\n").is_err() {
                break true;
            }
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        Ok((carried, closed))
    };
    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let port = free_port();
    let ferry = Ferry::start(&cfg(port).to_string())?;
    let a = observe(port)?;
    let ferry_count = ferry.stat("tcp.t.max_downstream_connection_duration");
    drop(ferry);
    let port = free_port();
    let e = Envoy::start(&bin, &cfg(port), port)?;
    let b = observe(port)?;
    let envoy_count = e.stat("tcp.t.max_downstream_connection_duration")?;
    assert_eq!(a, b);
    assert_eq!(a, (true, true));
    assert_eq!((ferry_count, envoy_count), (1, 1));
    Ok(())
}

/// `hash_policy` source_ip under ring hash: every connection of one client reaches the
/// same host (the echo servers prefix what they send back with their name).
#[test]
fn source_ip_hash_keeps_a_client_on_one_host() -> Result<()> {
    let _lock = RunLock::shared();
    let one = App::start(&["prefix", &free_port().to_string(), "one"])?;
    let two = App::start(&["prefix", &free_port().to_string(), "two"])?;
    let cfg = |port| {
        let mut c = static_cluster("c", &[one.port, two.port], Upstream::Http1);
        c["lb_policy"] = json!("RING_HASH");
        config(port, c, json!({"hash_policy": [{"source_ip": {}}]}))
    };
    let observe = |port| -> Result<Vec<String>> {
        (0..8)
            .map(|_| {
                let mut s = TcpStream::connect(local(port))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"hi\n")?;
                let mut buf = [0u8; 32];
                let n = s.read(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n])
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string())
            })
            .collect()
    };
    let Some((ferry, envoy)) = through_both(cfg, observe)? else {
        return Ok(());
    };
    for (name, seen) in [("ferry", &ferry), ("envoy", &envoy)] {
        assert!(
            seen.iter().all(|h| h == &seen[0]) && (seen[0] == "one" || seen[0] == "two"),
            "{name}: {seen:?}"
        );
    }
    Ok(())
}
