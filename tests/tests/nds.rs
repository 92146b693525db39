//! Istio's NDS between ferry-pilot's ADS server and Ferry's ADS client, in
//! process on loopback: the client subscribes to the name table (wildcard)
//! only when DNS capture asks for it, takes each version the server pushes,
//! ACKs it, and NACKs one that does not decode (keeping the last good
//! table), over state of the world and delta alike.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::google::protobuf::Any;
use ferry_envoy_json::istio_nds::{NAME_TABLE_TYPE, NameInfo, NameTable};
use ferry_pilot::xds::{CLUSTER, Cache, LISTENER, Server};
use ferry_xds::ads::{AdsConfig, XdsState, XdsTarget};
use prost::Message;
use tokio::sync::watch;

fn table(host: &str, ip: &str) -> Any {
    let mut t = NameTable::default();
    t.table.insert(
        host.into(),
        NameInfo {
            ips: vec![ip.into()],
            registry: "Kubernetes".into(),
            shortname: host.split('.').next().unwrap_or_default().into(),
            namespace: "default".into(),
            alt_hosts: vec![],
        },
    );
    Any {
        type_url: NAME_TABLE_TYPE.into(),
        value: t.encode_to_vec(),
    }
}

async fn run(delta: bool) -> anyhow::Result<()> {
    let cache = Cache::new();
    cache.set(CLUSTER, Vec::<(String, Any)>::new());
    cache.set(LISTENER, Vec::<(String, Any)>::new());
    cache.set(
        NAME_TABLE_TYPE,
        [(
            String::new(),
            table("reviews.default.svc.cluster.local", "10.96.0.7"),
        )],
    );
    let server = Server::new(cache.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener, std::future::pending()).await });

    let node_id = if delta { "nds-delta" } else { "nds-sotw" };
    let (tx, mut rx) = watch::channel(None);
    let config = AdsConfig {
        target: XdsTarget::Tcp(addr.to_string()),
        delta,
        node: envoy_types::pb::envoy::config::core::v3::Node {
            id: node_id.into(),
            ..Default::default()
        },
        initial_fetch_timeout: Duration::from_secs(1),
        tls: None,
        secrets: Default::default(),
        local_secrets: None,
        agent_sds: None,
        name_table: Some(tx),
    };
    let (snap_tx, _snap_rx) = watch::channel(None);
    let state = Arc::new(XdsState::default());
    tokio::spawn(ferry_xds::ads::run(
        config,
        Arc::new(ferry_model::Snapshot::default()),
        state,
        snap_tx,
    ));
    let wait_for = |rx: &mut watch::Receiver<Option<Arc<NameTable>>>, ip: &'static str| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                rx.wait_for(|t| {
                    t.as_ref().is_some_and(|t| {
                        t.table
                            .get("reviews.default.svc.cluster.local")
                            .is_some_and(|n| n.ips == [ip])
                    })
                }),
            )
            .await
            .map(|_| ())
        }
    };
    wait_for(&mut rx, "10.96.0.7").await?;
    server
        .wait_ack(node_id, NAME_TABLE_TYPE, "v1", Duration::from_secs(10))
        .await?;
    // A push reaches the client.
    cache.set(
        NAME_TABLE_TYPE,
        [(
            String::new(),
            table("reviews.default.svc.cluster.local", "10.96.0.8"),
        )],
    );
    wait_for(&mut rx, "10.96.0.8").await?;
    server
        .wait_ack(node_id, NAME_TABLE_TYPE, "v2", Duration::from_secs(10))
        .await?;
    // A table that does not decode is NACKed; the last good one stays.
    cache.set(
        NAME_TABLE_TYPE,
        [(
            String::new(),
            Any {
                type_url: NAME_TABLE_TYPE.into(),
                value: vec![0x0a, 0xff, 0xff],
            },
        )],
    );
    let nack = server
        .wait_nack(node_id, NAME_TABLE_TYPE, Duration::from_secs(10))
        .await?;
    anyhow::ensure!(nack.message.contains("name table"), "{nack:?}");
    let last = rx.borrow().clone();
    anyhow::ensure!(
        last.is_some_and(|t| t.table["reviews.default.svc.cluster.local"].ips == ["10.96.0.8"]),
        "the last good table was replaced"
    );
    Ok(())
}

#[tokio::test]
async fn name_table_over_sotw() -> anyhow::Result<()> {
    run(false).await
}

#[tokio::test]
async fn name_table_over_delta() -> anyhow::Result<()> {
    run(true).await
}
