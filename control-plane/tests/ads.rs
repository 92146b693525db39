//! The ADS server against a tonic client on real sockets: state of the world
//! (wildcard and named subscriptions, ACK/NACK, pushes, stale nonces), delta
//! (initial_resource_versions, removed_resources, subscribe/unsubscribe,
//! NACK), the status view and its HTTP endpoint.

use crate::common;

use common::*;
use ferry_pilot::xds::{
    self, CLUSTER, Cache, ENDPOINT, LISTENER, Protocol, ROUTE, SyncState, resource_version,
};

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn sotw_wildcard_lds_cds_and_ack() {
    let cache = Cache::new();
    cache.set(CLUSTER, [cluster("a", 250), cluster("b", 250)]);
    cache.set(LISTENER, [listener("l1", 10001), listener("l2", 10002)]);
    let (server, addr) = start(cache).await;
    let mut c = Sotw::connect(addr, "sotw-wildcard").await;

    // Empty resource_names on CDS/LDS: the legacy wildcard.
    c.request(CLUSTER, &[], "", "").await;
    let cds = c.recv().await;
    assert_eq!(cds.type_url, CLUSTER);
    assert_eq!(cds.version_info, "v1");
    assert!(!cds.nonce.is_empty());
    assert_eq!(names(&cds), ["a", "b"]);
    assert_eq!(
        cds.control_plane.as_ref().map(|c| c.identifier.as_str()),
        Some("ferry-pilot")
    );
    c.ack(&cds, &[]).await;
    c.quiet().await;
    server
        .wait_ack("sotw-wildcard", CLUSTER, "v1", WAIT)
        .await
        .unwrap();

    c.request(LISTENER, &[], "", "").await;
    let lds = c.recv().await;
    assert_eq!(names(&lds), ["l1", "l2"]);
    c.ack(&lds, &[]).await;
    server
        .wait_ack("sotw-wildcard", LISTENER, "v1", WAIT)
        .await
        .unwrap();
    c.quiet().await;

    let status = server.status();
    assert_eq!(status.len(), 1);
    let s = &status[0];
    assert_eq!(s.node_id, "sotw-wildcard");
    assert_eq!(s.node_cluster, "test-cluster");
    assert_eq!(s.protocol, Protocol::Sotw);
    let cds_status = &s.types[CLUSTER];
    assert!(cds_status.wildcard);
    assert_eq!(cds_status.state, SyncState::Synced);
    assert_eq!(cds_status.acks, 1);
    assert_eq!(cds_status.nacks, 0);
    assert_eq!(cds_status.sent_resources, 2);

    // An explicit "*" is a wildcard too.
    let mut star = Sotw::connect(addr, "sotw-star").await;
    star.request(LISTENER, &["*"], "", "").await;
    assert_eq!(names(&star.recv().await), ["l1", "l2"]);

    // A closed stream leaves the status.
    drop(c);
    server
        .wait_for(WAIT, |s| {
            s.iter().all(|p| p.node_id != "sotw-wildcard").then_some(())
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn sotw_named_rds_and_eds() {
    let cache = Cache::new();
    cache.set(
        ENDPOINT,
        [endpoints("a", 1), endpoints("b", 2), endpoints("c", 3)],
    );
    cache.set(ROUTE, [route("r1", "a"), route("r2", "b")]);
    let (server, addr) = start(cache).await;
    let mut c = Sotw::connect(addr, "sotw-named").await;

    // Only named resources that exist.
    c.request(ENDPOINT, &["a", "missing"], "", "").await;
    let eds = c.recv().await;
    assert_eq!(names(&eds), ["a"]);
    c.ack(&eds, &["a", "missing"]).await;
    c.quiet().await;

    // A new name on the ACK: the full subscribed set comes back.
    c.request(ENDPOINT, &["a", "b"], &eds.version_info, &eds.nonce)
        .await;
    let eds2 = c.recv().await;
    assert_eq!(names(&eds2), ["a", "b"]);
    assert_eq!(eds2.version_info, "v1");
    assert_ne!(eds2.nonce, eds.nonce);
    c.ack(&eds2, &["a", "b"]).await;
    // Dropping a name needs no answer.
    c.request(ENDPOINT, &["b"], &eds2.version_info, &eds2.nonce)
        .await;
    c.quiet().await;

    c.request(ROUTE, &["r2"], "", "").await;
    let rds = c.recv().await;
    assert_eq!(names(&rds), ["r2"]);
    c.ack(&rds, &["r2"]).await;
    server
        .wait_ack("sotw-named", ROUTE, "v1", WAIT)
        .await
        .unwrap();
    let s = &server.status()[0];
    assert_eq!(s.types[ENDPOINT].acks, 2);
    assert_eq!(s.types[ENDPOINT].subscribed, ["b"]);
    assert!(!s.types[ENDPOINT].wildcard);
    assert_eq!(s.types[ROUTE].subscribed, ["r2"]);

    // A change is pushed with the subscribed set.
    server.cache().apply(ENDPOINT, [endpoints("b", 20)], []);
    let eds3 = c.recv().await;
    assert_eq!(eds3.version_info, "v2");
    assert_eq!(names(&eds3), ["b"]);
}

#[tokio::test]
async fn sotw_nack_is_recorded_and_not_answered() {
    let cache = Cache::new();
    cache.set(CLUSTER, [cluster("a", 250)]);
    let (server, addr) = start(cache.clone()).await;
    let mut c = Sotw::connect(addr, "sotw-nack").await;
    c.request(CLUSTER, &[], "", "").await;
    let v1 = c.recv().await;
    c.ack(&v1, &[]).await;

    cache.set(CLUSTER, [cluster("a", 500)]);
    let v2 = c.recv().await;
    assert_eq!(v2.version_info, "v2");
    c.nack(&v2, &[], "v1", "cluster a: bad timeout").await;
    // The same version is not sent again.
    c.quiet().await;

    let nack = server.wait_nack("sotw-nack", CLUSTER, WAIT).await.unwrap();
    assert_eq!(nack.version, "v2");
    assert_eq!(nack.client_version, "v1");
    assert_eq!(nack.nonce, v2.nonce);
    assert_eq!(nack.code, 3);
    assert_eq!(nack.message, "cluster a: bad timeout");
    let t = server.status()[0].types[CLUSTER].clone();
    assert_eq!(t.state, SyncState::Nacked);
    assert_eq!((t.acks, t.nacks), (1, 1));
    assert_eq!(t.acked_version.as_deref(), Some("v1"));

    // The next version goes out, and its ACK syncs the stream again.
    // The server times a response's send to its ACK.
    let before_send = std::time::Instant::now();
    cache.set(CLUSTER, [cluster("a", 750)]);
    let v3 = c.recv().await;
    assert_eq!(v3.version_info, "v3");
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    c.ack(&v3, &[]).await;
    server
        .wait_ack("sotw-nack", CLUSTER, "v3", WAIT)
        .await
        .unwrap();
    let t = server.status()[0].types[CLUSTER].clone();
    assert_eq!(t.state, SyncState::Synced);
    assert_eq!(t.last_nack.map(|n| n.version).as_deref(), Some("v2"));
    let latency = std::time::Duration::from_micros(t.ack_latency_us.unwrap());
    assert!(
        latency >= std::time::Duration::from_millis(30),
        "{latency:?}"
    );
    assert!(latency <= before_send.elapsed(), "{latency:?}");
}

#[tokio::test]
async fn sotw_push_on_change_and_stale_nonces() {
    let cache = Cache::new();
    cache.set(LISTENER, [listener("l1", 10001), listener("l2", 10002)]);
    cache.set(ENDPOINT, [endpoints("a", 1), endpoints("b", 2)]);
    let (server, addr) = start(cache.clone()).await;
    let mut c = Sotw::connect(addr, "sotw-push").await;
    c.request(LISTENER, &[], "", "").await;
    let v1 = c.recv().await;
    c.ack(&v1, &[]).await;

    // Removing a listener: the next full state no longer carries it.
    cache.apply(LISTENER, [], ["l2".to_string()]);
    let v2 = c.recv().await;
    assert_eq!(
        (v2.version_info.as_str(), names(&v2)),
        ("v2", vec!["l1".to_string()])
    );
    // A second change before the client answered: v2's nonce goes stale.
    cache.apply(LISTENER, [listener("l3", 10003)], []);
    let v3 = c.recv().await;
    assert_eq!(names(&v3), ["l1", "l3"]);
    c.ack(&v2, &[]).await;
    c.quiet().await;
    c.ack(&v3, &[]).await;
    server
        .wait_ack("sotw-push", LISTENER, "v3", WAIT)
        .await
        .unwrap();
    assert_eq!(server.status()[0].types[LISTENER].state, SyncState::Synced);

    // A stale request does not change the subscription.
    c.request(ENDPOINT, &["a"], "", "").await;
    let e1 = c.recv().await;
    c.ack(&e1, &["a"]).await;
    cache.apply(ENDPOINT, [endpoints("a", 10)], []);
    let e2 = c.recv().await;
    c.request(ENDPOINT, &["a", "b"], &e1.version_info, &e1.nonce)
        .await;
    c.quiet().await;
    c.request(ENDPOINT, &["a", "b"], &e2.version_info, &e2.nonce)
        .await;
    assert_eq!(names(&c.recv().await), ["a", "b"]);
}

#[tokio::test]
async fn sotw_requires_type_url() {
    let (_server, addr) = start(Cache::new()).await;
    let mut c = Sotw::connect(addr, "sotw-bad").await;
    c.request("", &[], "", "").await;
    let status = c.recv_status().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn delta_initial_versions_and_removed_resources() {
    let cache = Cache::new();
    cache.set(
        LISTENER,
        [
            listener("l1", 10001),
            listener("l2", 10002),
            listener("l3", 10003),
        ],
    );
    let (server, addr) = start(cache.clone()).await;
    let l1_version = cache.snapshot(LISTENER).resources["l1"].version.to_string();

    let mut d = Delta::connect(addr, "delta-initial").await;
    let mut first = envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
        type_url: LISTENER.to_string(),
        ..Default::default()
    };
    // A reconnecting client: it holds l1 (current), l2 (outdated) and "gone".
    first
        .initial_resource_versions
        .insert("l1".into(), l1_version.clone());
    first
        .initial_resource_versions
        .insert("l2".into(), "0000".into());
    first
        .initial_resource_versions
        .insert("gone".into(), "0000".into());
    d.send(first).await;
    let r1 = d.recv().await;
    assert_eq!(r1.type_url, LISTENER);
    assert_eq!(r1.system_version_info, "v1");
    let got: Vec<&str> = r1.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(got, ["l2", "l3"]);
    assert_eq!(r1.removed_resources, ["gone"]);
    for r in &r1.resources {
        let any = r.resource.as_ref().unwrap();
        assert_eq!(r.version, resource_version(any));
        assert_eq!(resource_name(any), r.name);
    }
    d.ack(&r1).await;
    server
        .wait_ack("delta-initial", LISTENER, "v1", WAIT)
        .await
        .unwrap();
    d.quiet().await;

    // Only what changed, and what went away.
    cache.apply(LISTENER, [listener("l1", 20001)], ["l3".to_string()]);
    let r2 = d.recv().await;
    assert_eq!(r2.system_version_info, "v2");
    let got: Vec<&str> = r2.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(got, ["l1"]);
    assert_ne!(r2.resources[0].version, l1_version);
    assert_eq!(r2.removed_resources, ["l3"]);
    d.ack(&r2).await;
    server
        .wait_ack("delta-initial", LISTENER, "v2", WAIT)
        .await
        .unwrap();

    // Setting identical content changes nothing the client holds.
    cache.apply(LISTENER, [listener("l1", 20001)], []);
    d.quiet().await;

    let s = &server.status()[0];
    assert_eq!(s.protocol, Protocol::Delta);
    assert!(s.types[LISTENER].wildcard);
    assert_eq!(s.types[LISTENER].acks, 2);
}

#[tokio::test]
async fn delta_named_subscribe_and_unsubscribe() {
    let cache = Cache::new();
    cache.set(ENDPOINT, [endpoints("a", 1), endpoints("b", 2)]);
    let (server, addr) = start(cache.clone()).await;
    let mut d = Delta::connect(addr, "delta-named").await;

    d.subscribe(ENDPOINT, &["a", "missing"], &[]).await;
    let r = d.recv().await;
    let got: Vec<&str> = r.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(got, ["a"]);
    // A subscribed name that does not exist is reported as removed.
    assert_eq!(r.removed_resources, ["missing"]);
    d.ack(&r).await;
    server
        .wait_ack("delta-named", ENDPOINT, "v1", WAIT)
        .await
        .unwrap();

    // Not subscribed: not sent.
    cache.apply(ENDPOINT, [endpoints("b", 20)], []);
    d.quiet().await;
    d.subscribe(ENDPOINT, &["b"], &[]).await;
    let r = d.recv().await;
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "b");
    assert!(r.removed_resources.is_empty());
    d.ack(&r).await;

    // Unsubscribing needs no answer, and later changes are not sent ...
    d.subscribe(ENDPOINT, &[], &["a"]).await;
    d.quiet().await;
    cache.apply(ENDPOINT, [endpoints("a", 10)], []);
    d.quiet().await;
    // ... until the client subscribes again.
    d.subscribe(ENDPOINT, &["a"], &[]).await;
    let r = d.recv().await;
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "a");
    d.ack(&r).await;

    // The missing resource appears: it is pushed.
    cache.apply(ENDPOINT, [endpoints("missing", 3)], []);
    let r = d.recv().await;
    assert_eq!(r.resources[0].name, "missing");
    // A subscribed resource is deleted: removed_resources.
    cache.apply(ENDPOINT, [], ["b".to_string()]);
    let r2 = d.recv().await;
    assert!(r2.resources.is_empty());
    assert_eq!(r2.removed_resources, ["b"]);

    let t = &server.status()[0].types[ENDPOINT];
    assert!(!t.wildcard);
    assert_eq!(t.subscribed, ["a", "b", "missing"]);
}

#[tokio::test]
async fn delta_nack_and_explicit_wildcard() {
    let cache = Cache::new();
    cache.set(CLUSTER, [cluster("a", 250)]);
    let (server, addr) = start(cache.clone()).await;
    let mut d = Delta::connect(addr, "delta-nack").await;
    d.subscribe(CLUSTER, &["*"], &[]).await;
    let r1 = d.recv().await;
    assert_eq!(r1.resources.len(), 1);
    d.ack(&r1).await;

    cache.apply(CLUSTER, [cluster("b", 250)], []);
    let r2 = d.recv().await;
    assert_eq!(r2.resources[0].name, "b");
    d.nack(&r2, "cluster b: rejected").await;
    d.quiet().await;
    let nack = server.wait_nack("delta-nack", CLUSTER, WAIT).await.unwrap();
    assert_eq!(nack.version, "v2");
    assert_eq!(nack.nonce, r2.nonce);
    assert_eq!(nack.message, "cluster b: rejected");
    let t = server.status()[0].types[CLUSTER].clone();
    assert_eq!(t.state, SyncState::Nacked);
    assert_eq!((t.acks, t.nacks), (1, 1));
    assert_eq!(t.acked_version.as_deref(), Some("v1"));

    // Unsubscribing "*" ends the wildcard.
    d.subscribe(CLUSTER, &[], &["*"]).await;
    d.quiet().await;
    cache.apply(CLUSTER, [cluster("c", 250)], []);
    d.quiet().await;
    server
        .wait_for(WAIT, |s| (!s[0].types[CLUSTER].wildcard).then_some(()))
        .await
        .unwrap();
}

#[tokio::test]
async fn wait_hooks_time_out_with_the_node_status() {
    let (server, addr) = start(Cache::new()).await;
    let mut c = Sotw::connect(addr, "waiter").await;
    c.request(LISTENER, &[], "", "").await;
    let r = c.recv().await;
    assert_eq!(r.version_info, "v0");
    assert!(r.resources.is_empty());
    let err = server
        .wait_ack(
            "waiter",
            LISTENER,
            "v0",
            std::time::Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("waiter") && text.contains("STALE"), "{text}");
}

#[tokio::test]
async fn status_endpoint_serves_json() {
    let cache = Cache::new();
    cache.set(CLUSTER, [cluster("a", 250)]);
    let (server, addr) = start(cache).await;
    let status_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let status_addr = status_listener.local_addr().unwrap();
    tokio::spawn(xds::http::serve_status(
        server.clone(),
        status_listener,
        std::future::pending(),
    ));

    let mut c = Sotw::connect(addr, "status-node").await;
    c.request(CLUSTER, &[], "", "").await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    server
        .wait_ack("status-node", CLUSTER, "v1", WAIT)
        .await
        .unwrap();

    let (code, body) = http_get(status_addr, "/debug/syncz").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let proxy = &v[0];
    assert_eq!(proxy["node_id"], "status-node");
    assert_eq!(proxy["protocol"], "sotw");
    assert_eq!(proxy["types"][CLUSTER]["state"], "SYNCED");
    assert_eq!(proxy["types"][CLUSTER]["acked_version"], "v1");
    assert_eq!(proxy["types"][CLUSTER]["acks"], 1);

    let (code, body) = http_get(status_addr, "/debug/cache").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[CLUSTER]["version"], "v1");
    assert_eq!(
        sorted(
            v[CLUSTER]["resources"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        ),
        ["a"]
    );
    assert_eq!(http_get(status_addr, "/nope").await.0, 404);
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let cache = Cache::new();
    cache.set(CLUSTER, [cluster("a", 250)]);
    let server = ferry_pilot::xds::Server::new(cache);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = server.clone();
    let serving = tokio::spawn(async move {
        s.serve(listener, async {
            let _ = stopped.await;
        })
        .await
    });
    let mut c = Sotw::connect(addr, "shutdown").await;
    c.request(CLUSTER, &[], "", "").await;
    c.recv().await;
    stop.send(()).unwrap();
    let result = tokio::time::timeout(WAIT, serving).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
    assert!(server.status().is_empty());
}
