//! Replays over ADS: the configuration istiod sent a real Istio 1.18 sidecar
//! (a captured `/config_dump`, in `../shared/istio-config-dumps/` when checked
//! out beside this repository), and the static resources of a bootstrap,
//! through the library and through the `ferry-pilot` binary.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ferry_pilot::replay::{self, ReplayOptions};
use ferry_pilot::xds::{CLUSTER, Cache, ENDPOINT, LISTENER, ROUTE, SECRET};

const DUMP: &str = "../../shared/istio-config-dumps/istio-1.18.2-sidecar-hotelreservation-geo.json";

/// The captured dump; its tests are ignored when Istio's material is absent (see build.rs),
/// and fail here under `CI=true`.
fn dump_path() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DUMP);
    assert!(
        path.exists(),
        "{} is missing (Istio's material, ../shared beside the repository)",
        path.display()
    );
    Some(path)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn names_of(items: &[(String, envoy_types::pb::google::protobuf::Any)]) -> Vec<&str> {
    items.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn istio_dump_loads() {
    let Some(path) = dump_path() else { return };
    let r = replay::load_config_dump(&path, ReplayOptions::default()).unwrap();
    // 140 active dynamic listeners, virtualInbound (listed twice, both times
    // only in error_state: the Lua filter Envoy rejected is served as sent)
    // and the two static ones (15090, 15021): 144 entries, 143 names.
    assert_eq!(r.listeners.len(), 143);
    assert!(names_of(&r.listeners).contains(&"virtualInbound"));
    assert!(names_of(&r.listeners).contains(&"virtualOutbound"));
    assert!(names_of(&r.listeners).contains(&"0.0.0.0_15090"));
    assert_eq!(r.clusters.len(), 143, "138 dynamic + 5 static");
    assert_eq!(r.routes.len(), 92, "90 dynamic + 2 static");
    // One assignment per EDS cluster.
    assert_eq!(r.endpoints.len(), 122);
    assert_eq!(names_of(&r.secrets), ["default", "ROOTCA"]);
    for (name, any) in r.by_type().iter().flat_map(|(_, items)| items.iter()) {
        assert_eq!(&resource_name(any), name);
    }

    let dynamic = replay::load_config_dump(
        &path,
        ReplayOptions {
            include_static: false,
        },
    )
    .unwrap();
    assert_eq!(
        (
            dynamic.listeners.len(),
            dynamic.clusters.len(),
            dynamic.routes.len(),
            dynamic.endpoints.len()
        ),
        (141, 138, 90, 122)
    );
}

#[tokio::test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
async fn istio_dump_is_served_over_ads() {
    let Some(path) = dump_path() else { return };
    let r = replay::load_config_dump(&path, ReplayOptions::default()).unwrap();
    let cache = Cache::new();
    r.load_into(&cache);
    let (server, addr) = start(cache).await;

    let mut c = Sotw::connect(addr, "replay-sotw").await;
    c.request(CLUSTER, &[], "", "").await;
    let cds = c.recv().await;
    assert_eq!(cds.resources.len(), 143);
    c.ack(&cds, &[]).await;
    let eds_names: Vec<&str> = names_of(&r.endpoints);
    c.request(ENDPOINT, &eds_names, "", "").await;
    assert_eq!(c.recv().await.resources.len(), 122);
    c.request(LISTENER, &[], "", "").await;
    let lds = c.recv().await;
    assert_eq!(lds.resources.len(), 143);
    let route_names: Vec<&str> = names_of(&r.routes);
    c.request(ROUTE, &route_names, "", "").await;
    let rds = c.recv().await;
    assert_eq!(rds.resources.len(), 92);
    c.ack(&rds, &route_names).await;
    c.request(SECRET, &["default", "ROOTCA"], "", "").await;
    assert_eq!(c.recv().await.resources.len(), 2);
    server
        .wait_ack("replay-sotw", ROUTE, "v1", WAIT)
        .await
        .unwrap();

    let mut d = Delta::connect(addr, "replay-delta").await;
    d.subscribe(LISTENER, &[], &[]).await;
    let l = d.recv().await;
    assert_eq!(l.resources.len(), 143);
    assert!(l.removed_resources.is_empty());
    d.subscribe(ENDPOINT, &eds_names, &[]).await;
    assert_eq!(d.recv().await.resources.len(), 122);
}

/// A `ferry-pilot` process, killed on drop.
struct Pilot(Child);

impl Drop for Pilot {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pilot(args: &[&str]) -> Pilot {
    Pilot(
        Command::new(env!("CARGO_BIN_EXE_ferry-pilot"))
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start ferry-pilot"),
    )
}

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr}");
}

#[tokio::test]
async fn serve_static_binary_serves_the_bootstrap() {
    let listen = free_addr();
    let status = free_addr();
    let bootstrap = fixture("bootstrap-static.yaml");
    let _pilot = pilot(&[
        "serve-static",
        "--bootstrap",
        bootstrap.to_str().unwrap(),
        "--listen",
        &listen.to_string(),
        "--status-addr",
        &status.to_string(),
        "--log-level",
        "warn",
    ]);
    wait_listening(listen).await;
    let mut c = Sotw::connect(listen, "static-client").await;
    c.request(LISTENER, &[], "", "").await;
    let lds = c.recv().await;
    assert_eq!(names(&lds), ["127.0.0.1_18081", "http"]);
    c.ack(&lds, &[]).await;
    c.request(CLUSTER, &[], "", "").await;
    assert_eq!(names(&c.recv().await), ["backend"]);

    wait_listening(status).await;
    let mut synced = false;
    for _ in 0..100 {
        let (code, body) = http_get(status, "/debug/syncz").await;
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v[0]["types"][LISTENER]["state"] == "SYNCED" {
            assert_eq!(v[0]["node_id"], "static-client");
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(synced, "the status endpoint shows the ACK");
}

#[tokio::test]
async fn sighup_reloads_and_pushes_only_the_types_that_changed() {
    let dir = std::env::temp_dir().join(format!("ferry-pilot-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bootstrap = dir.join("bootstrap.yaml");
    let text = std::fs::read_to_string(fixture("bootstrap-static.yaml")).unwrap();
    std::fs::write(&bootstrap, &text).unwrap();
    let listen = free_addr();
    let pilot = pilot(&[
        "serve-static",
        "--bootstrap",
        bootstrap.to_str().unwrap(),
        "--listen",
        &listen.to_string(),
        "--log-level",
        "warn",
    ]);
    wait_listening(listen).await;
    let mut c = Sotw::connect(listen, "reload-client").await;
    c.request(LISTENER, &[], "", "").await;
    let lds = c.recv().await;
    c.ack(&lds, &[]).await;
    c.request(CLUSTER, &[], "", "").await;
    let cds = c.recv().await;
    c.ack(&cds, &[]).await;
    c.quiet().await;

    // The backend's endpoint moves: the clusters change, the listeners do not.
    let moved = text.replace("port_value: 18090", "port_value: 18091");
    assert_ne!(moved, text, "the fixture's backend port is 18090");
    std::fs::write(&bootstrap, moved).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &pilot.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let next = c.recv().await;
    assert_eq!(next.type_url, CLUSTER, "only the clusters are pushed");
    assert_ne!(next.version_info, cds.version_info);
    let backend: envoy_types::pb::envoy::config::cluster::v3::Cluster =
        prost::Message::decode(next.resources[0].value.as_slice()).unwrap();
    let port = backend.load_assignment.unwrap().endpoints[0].lb_endpoints[0]
        .clone()
        .host_identifier;
    assert!(format!("{port:?}").contains("18091"), "{port:?}");
    c.ack(&next, &[]).await;
    c.quiet().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
async fn replay_binary_serves_the_dump() {
    let Some(path) = dump_path() else { return };
    let listen = free_addr();
    let _pilot = pilot(&[
        "replay",
        "--dump",
        path.to_str().unwrap(),
        "--listen",
        &listen.to_string(),
        "--log-level",
        "warn",
    ]);
    wait_listening(listen).await;
    let mut d = Delta::connect(listen, "replay-binary").await;
    d.subscribe(CLUSTER, &["*"], &[]).await;
    assert_eq!(d.recv().await.resources.len(), 143);
}
