//! Many sidecars' worth of ADS streams against one control plane, the load
//! `benches/pilot.py` puts on ferry-pilot: each client opens a delta ADS
//! stream as istio-agent's bootstrap does (`DELTA_GRPC`), subscribes to every
//! cluster and listener, then to the endpoint assignments of its EDS clusters
//! and the route configurations its listeners name, ACKing every response
//! as Envoy does. It reports when every client holds all four types.
//!
//! Then, for each line on stdin (the harness changes the configuration and
//! writes one), it reports how long until every client received a response
//! again: the push time of that change to all proxies.
//!
//! Prints one JSON object per phase on stdout.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

#[derive(Debug, Parser)]
#[command(version, about = "Delta ADS clients for the control-plane benchmark")]
struct Args {
    /// The control plane's ADS address.
    #[arg(long)]
    addr: SocketAddr,
    /// A file of node ids, one per line (`sidecar~IP~pod.ns~ns.svc.cluster.local`);
    /// client i takes line i modulo their number.
    #[arg(long)]
    nodes: std::path::PathBuf,
    /// How many streams.
    #[arg(long, short = 'c', default_value_t = 1)]
    clients: usize,
    /// How long every client may take to hold every type.
    #[arg(long, default_value = "300s", value_parser = ferry_benches::parse_duration)]
    timeout: Duration,
}

/// What one client has seen.
#[derive(Default)]
struct Progress {
    /// Types answered at least once (bit per type).
    answered: u8,
    /// Responses of any type.
    responses: u64,
    /// Bytes of resources received.
    bytes: u64,
}

fn node(id: &str) -> Node {
    let namespace = id
        .split('~')
        .nth(2)
        .and_then(|p| p.split_once('.'))
        .map(|(_, ns)| ns.to_string())
        .unwrap_or_default();
    let ip = id.split('~').nth(1).unwrap_or_default().to_string();
    let s = |v: String| Value {
        kind: Some(value::Kind::StringValue(v)),
    };
    Node {
        id: id.to_string(),
        cluster: "bench".into(),
        metadata: Some(Struct {
            fields: [
                ("NAMESPACE".to_string(), s(namespace)),
                ("INSTANCE_IPS".to_string(), s(ip)),
            ]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    }
}

fn bit(type_url: &str) -> u8 {
    match type_url {
        CLUSTER => 1,
        LISTENER => 2,
        ENDPOINT => 4,
        ROUTE => 8,
        _ => 0,
    }
}

/// The assignments a cluster response asks for.
fn eds_names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    resp.resources
        .iter()
        .filter_map(|r| Cluster::decode(r.resource.as_ref()?.value.as_slice()).ok())
        .filter(|c| {
            c.cluster_discovery_type == Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
        })
        .map(|c| {
            c.eds_cluster_config
                .map(|e| e.service_name)
                .filter(|s| !s.is_empty())
                .unwrap_or(c.name)
        })
        .collect()
}

/// The route configurations a listener response names.
fn rds_names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut out = Vec::new();
    for r in &resp.resources {
        let Some(l) = r
            .resource
            .as_ref()
            .and_then(|a| Listener::decode(a.value.as_slice()).ok())
        else {
            continue;
        };
        for fc in l
            .filter_chains
            .iter()
            .chain(l.default_filter_chain.as_ref())
        {
            for f in &fc.filters {
                let Some(
                    envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
                        tc,
                    ),
                ) = &f.config_type
                else {
                    continue;
                };
                if tc.type_url != HCM {
                    continue;
                }
                if let Ok(hcm) = HttpConnectionManager::decode(tc.value.as_slice())
                    && let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier
                {
                    out.push(rds.route_config_name);
                }
            }
        }
    }
    out
}

async fn client(
    addr: SocketAddr,
    id: String,
    progress: Arc<std::sync::Mutex<Progress>>,
    changed: watch::Sender<u64>,
) -> Result<()> {
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .context("connecting")?
        .max_decoding_message_size(1 << 30);
    let (tx, rx) = mpsc::channel(16);
    let mut first = Some(node(&id));
    let mut subscribe = |type_url: &str, names: Vec<String>| DeltaDiscoveryRequest {
        node: first.take(),
        type_url: type_url.into(),
        resource_names_subscribe: names,
        ..Default::default()
    };
    tx.send(subscribe(CLUSTER, vec!["*".into()])).await?;
    tx.send(subscribe(LISTENER, vec!["*".into()])).await?;
    let mut stream = ads
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .context("opening the delta stream")?
        .into_inner();
    let (mut eds, mut rds) = (BTreeSet::new(), BTreeSet::new());
    while let Some(resp) = stream.message().await? {
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        tx.send(ack).await?;
        let (new, set, type_url) = match resp.type_url.as_str() {
            CLUSTER => (eds_names(&resp), &mut eds, ENDPOINT),
            LISTENER => (rds_names(&resp), &mut rds, ROUTE),
            _ => (Vec::new(), &mut eds, ""),
        };
        let new: Vec<String> = new.into_iter().filter(|n| set.insert(n.clone())).collect();
        if !new.is_empty() {
            tx.send(subscribe(type_url, new)).await?;
        }
        {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            p.answered |= bit(&resp.type_url);
            p.responses += 1;
            p.bytes += resp
                .resources
                .iter()
                .filter_map(|r| r.resource.as_ref())
                .map(|a| a.value.len() as u64)
                .sum::<u64>();
        }
        changed.send_modify(|n| *n += 1);
    }
    bail!("{id}: the stream ended")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ids: Vec<String> = std::fs::read_to_string(&args.nodes)
        .with_context(|| format!("{}", args.nodes.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        bail!("{}: no node ids", args.nodes.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (changed, mut seen) = watch::channel(0u64);
        let failures = Arc::new(AtomicU64::new(0));
        let mut all = Vec::new();
        let t0 = Instant::now();
        for i in 0..args.clients {
            let p = Arc::new(std::sync::Mutex::new(Progress::default()));
            all.push(p.clone());
            let (id, changed, failures) = (
                ids[i % ids.len()].clone(),
                changed.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                if let Err(e) = client(args.addr, id, p, changed).await {
                    failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("client {i}: {e:#}");
                }
            });
        }
        let snapshot = |all: &[Arc<std::sync::Mutex<Progress>>]| {
            all.iter()
                .map(|p| {
                    let p = p.lock().unwrap_or_else(|e| e.into_inner());
                    (p.answered, p.responses, p.bytes)
                })
                .collect::<Vec<_>>()
        };
        // Every type answered, then quiet for a moment (the last
        // assignments of a large mesh arrive in several responses).
        let quiet = Duration::from_millis(500);
        let mut done_at = None;
        loop {
            if failures.load(Ordering::Relaxed) > 0 {
                bail!("a client failed");
            }
            let all_types = snapshot(&all).iter().all(|(a, _, _)| *a == 15);
            match tokio::time::timeout(quiet, seen.changed()).await {
                Ok(_) => {
                    if all_types {
                        done_at = Some(Instant::now());
                    }
                }
                Err(_) if all_types => break,
                Err(_) => {}
            }
            if t0.elapsed() > args.timeout {
                bail!("not every client held every type after {:?}", args.timeout);
            }
        }
        let synced = done_at.unwrap_or_else(Instant::now) - t0;
        let snap = snapshot(&all);
        let bytes: u64 = snap.iter().map(|s| s.2).sum();
        writeln!(
            std::io::stdout(),
            "{{\"phase\":\"sync\",\"clients\":{},\"ms\":{:.1},\"responses\":{},\"mib\":{:.1}}}",
            args.clients,
            synced.as_secs_f64() * 1000.0,
            snap.iter().map(|s| s.1).sum::<u64>(),
            bytes as f64 / (1 << 20) as f64
        )?;
        std::io::stdout().flush()?;
        // Each stdin line: a change was made; time until every client got
        // a response after it.
        let (line_tx, mut lines) = mpsc::channel::<()>(1);
        std::thread::spawn(move || {
            for l in std::io::stdin().lock().lines() {
                if l.is_err() || line_tx.blocking_send(()).is_err() {
                    return;
                }
            }
        });
        while lines.recv().await.is_some() {
            let before: Vec<u64> = snapshot(&all).iter().map(|s| s.1).collect();
            let t = Instant::now();
            loop {
                let now: Vec<u64> = snapshot(&all).iter().map(|s| s.1).collect();
                if now.iter().zip(&before).all(|(n, b)| n > b) {
                    break;
                }
                if t.elapsed() > args.timeout {
                    bail!("not every client got the change after {:?}", args.timeout);
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), seen.changed()).await;
            }
            writeln!(
                std::io::stdout(),
                "{{\"phase\":\"update\",\"clients\":{},\"ms\":{:.1}}}",
                args.clients,
                t.elapsed().as_secs_f64() * 1000.0
            )?;
            std::io::stdout().flush()?;
        }
        Ok(())
    })
}
