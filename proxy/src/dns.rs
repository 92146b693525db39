//! The agent's DNS proxy (istio-agent's, on 127.0.0.1:15053 over UDP and
//! TCP, where `ferry iptables --redirect-dns` sends the app's queries): it
//! answers A and AAAA questions for the hosts of the name table the control
//! plane sends (NDS), and forwards everything else to the pod's resolvers
//! from resolv.conf, one after the other in random order, each within five
//! seconds, SERVFAIL when none answers. As the agent builds its lookup
//! table: a Kubernetes service also answers as `name.namespace`,
//! `name.namespace.svc` and, in the proxy's namespace, `name`; every host
//! expanded with the first search domain answers with a CNAME to it (what a
//! resolver asks after appending that domain); `*.domain` hosts answer for
//! their subdomains; a known host without an address of the asked family
//! answers with no record (authoritative, NOERROR); answers last 30 s and
//! come in shuffled order. Before the first table, questions get SERVFAIL.
//! Messages are parsed and built with `hickory-proto`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ferry_xds::ads::NameTable;
use hickory_proto::op::{Message, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use rand::seq::SliceRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const TTL: u32 = 30;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct DnsOptions {
    pub addr: SocketAddr,
    /// The pod's resolver configuration.
    pub resolv_conf: std::path::PathBuf,
    /// The proxy's namespace (short names of its own services answer).
    pub namespace: String,
    /// The proxy's domain (`NAMESPACE.svc.cluster.local`).
    pub domain: String,
}

/// The answers, as the agent's `LookupTable`.
#[derive(Debug, Default)]
struct Lookup {
    hosts: HashSet<String>,
    v4: HashMap<String, Vec<Ipv4Addr>>,
    v6: HashMap<String, Vec<Ipv6Addr>>,
    cname: HashMap<String, String>,
}

pub struct DnsProxy {
    lookup: ArcSwapOption<Lookup>,
    table: ArcSwapOption<NameTable>,
    upstreams: Vec<SocketAddr>,
    search: Vec<String>,
    namespace: String,
    /// The domain without the namespace (`svc.cluster.local`).
    domain: String,
    domain_parts: Vec<String>,
}

impl DnsProxy {
    pub fn new(opts: &DnsOptions) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(&opts.resolv_conf).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "DNS proxy: failed to load {}: {e}",
                    opts.resolv_conf.display()
                ),
            )
        })?;
        let rc = crate::resolv_conf::ResolvConf::parse(&text);
        let mut parts: Vec<String> = opts.domain.split('.').map(str::to_string).collect();
        if parts.first() == Some(&opts.namespace) {
            parts.remove(0);
        }
        Ok(Self {
            lookup: ArcSwapOption::empty(),
            table: ArcSwapOption::empty(),
            upstreams: rc
                .nameservers
                .iter()
                .map(|ip| SocketAddr::new(*ip, 53))
                .collect(),
            search: rc.search,
            namespace: opts.namespace.clone(),
            domain: parts.join("."),
            domain_parts: parts,
        })
    }

    /// Takes a new name table (NDS).
    pub fn update(&self, table: Arc<NameTable>) {
        let mut l = Lookup::default();
        for (host, ni) in &table.table {
            let alt = if ni.registry == "Kubernetes" {
                self.alt_hosts(host, ni)
            } else {
                let mut h = host.clone();
                if !h.ends_with('.') {
                    h.push('.');
                }
                HashSet::from([h])
            };
            let v4: Vec<Ipv4Addr> = ni.ips.iter().filter_map(|i| i.parse().ok()).collect();
            let v6: Vec<Ipv6Addr> = ni.ips.iter().filter_map(|i| i.parse().ok()).collect();
            if v4.is_empty() && v6.is_empty() {
                continue;
            }
            for h in &alt {
                let h = h.to_ascii_lowercase();
                l.hosts.insert(h.clone());
                if !v4.is_empty() {
                    l.v4.insert(h.clone(), v4.clone());
                }
                if !v6.is_empty() {
                    l.v6.insert(h.clone(), v6.clone());
                }
                if let Some(first) = self.search.first() {
                    let suffix = format!("{}.", first.trim_end_matches('.'));
                    if !h.ends_with(&suffix) {
                        let expanded = format!("{h}{suffix}").to_ascii_lowercase();
                        if !alt.contains(&expanded) {
                            l.cname.insert(expanded.clone(), h.clone());
                            l.hosts.insert(expanded);
                        }
                    }
                }
            }
        }
        tracing::info!(dns.hosts = l.hosts.len(), "DNS name table updated");
        self.lookup.store(Some(Arc::new(l)));
        self.table.store(Some(table));
    }

    /// The agent's `generateAltHosts`.
    fn alt_hosts(&self, host: &str, ni: &ferry_xds::ads::NameInfo) -> HashSet<String> {
        let mut out = HashSet::new();
        if host.ends_with('.') {
            return out;
        }
        out.insert(format!("{host}."));
        if self.domain.is_empty() || !host.ends_with(&self.domain) {
            return out;
        }
        out.insert(format!("{}.{}.", ni.shortname, ni.namespace));
        if self.namespace == ni.namespace {
            out.insert(format!("{}.", ni.shortname));
        }
        if let Some(first) = self.domain_parts.first() {
            out.insert(format!("{}.{}.{first}.", ni.shortname, ni.namespace));
        }
        for a in &ni.alt_hosts {
            out.insert(format!("{a}."));
        }
        out
    }

    /// Where to listen: the configured address, and, on loopback, its IPv6
    /// twin too when the pod has IPv6 resolvers (the agent's `localhost`
    /// binds both families as its resolvers need).
    pub fn listen_addresses(&self, addr: SocketAddr) -> Vec<SocketAddr> {
        let mut out = vec![addr];
        if addr.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST)
            && self.upstreams.iter().any(|u| u.is_ipv6())
        {
            out.push(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                addr.port(),
            ));
        }
        out
    }

    /// Whether a name table has arrived (readiness waits for it).
    pub fn is_ready(&self) -> bool {
        self.lookup.load().is_some()
    }

    /// The name table as JSON (`/debug/ndsz`).
    pub fn table_json(&self) -> Option<String> {
        let t = self.table.load_full()?;
        let table: serde_json::Map<String, serde_json::Value> = t
            .table
            .iter()
            .map(|(h, ni)| {
                (
                    h.clone(),
                    serde_json::json!({
                        "ips": ni.ips, "registry": ni.registry,
                        "shortname": ni.shortname, "namespace": ni.namespace,
                    }),
                )
            })
            .collect();
        Some(serde_json::json!({ "table": table }).to_string())
    }

    /// The records for a question, when the host is in the table.
    fn lookup(&self, l: &Lookup, qtype: RecordType, qname: &str) -> Option<Vec<Record>> {
        let question = Name::from_ascii(qname).ok()?;
        let mut host = qname.to_string();
        let mut wildcard = false;
        if !l.hosts.contains(&host) {
            let labels: Vec<&str> = qname.trim_end_matches('.').split('.').collect();
            let found = (0..labels.len()).find_map(|i| {
                let w = format!("*.{}.", labels[i + 1..].join("."));
                l.hosts.contains(&w).then_some(w)
            })?;
            host = found;
            wildcard = true;
        }
        let mut out = Vec::new();
        let mut target_name = question.clone();
        if let Some(target) = l.cname.get(&host) {
            let t = Name::from_ascii(target).ok()?;
            out.push(Record::from_rdata(
                question.clone(),
                TTL,
                RData::CNAME(CNAME(t.clone())),
            ));
            host = target.clone();
            target_name = t;
        } else if !wildcard {
            target_name = Name::from_ascii(&host).ok()?;
        }
        match qtype {
            RecordType::A => {
                for ip in l.v4.get(&host).into_iter().flatten() {
                    out.push(Record::from_rdata(
                        target_name.clone(),
                        TTL,
                        RData::A(A(*ip)),
                    ));
                }
            }
            RecordType::AAAA => {
                for ip in l.v6.get(&host).into_iter().flatten() {
                    out.push(Record::from_rdata(
                        target_name.clone(),
                        TTL,
                        RData::AAAA(AAAA(*ip)),
                    ));
                }
            }
            // Other types are the resolvers' business.
            _ => return None,
        }
        // A name without an address of this family: no address either.
        if out.iter().all(|r| r.record_type() == RecordType::CNAME) {
            out.clear();
        }
        Some(out)
    }

    /// The answer to one query message; `None` when it does not parse.
    pub async fn answer(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let req = Message::from_vec(query).ok()?;
        let reply = |code: ResponseCode, answers: Vec<Record>, authoritative: bool| {
            let mut m = Message::new(
                req.metadata.id,
                req.metadata.message_type,
                req.metadata.op_code,
            );
            m.metadata = Metadata::response_from_request(&req.metadata);
            m.metadata.response_code = code;
            m.metadata.authoritative = authoritative;
            if let Some(q) = req.queries.first() {
                m.add_query(q.clone());
            }
            m.add_answers(answers);
            m
        };
        let Some(q) = req.queries.first() else {
            return reply(ResponseCode::ServFail, Vec::new(), false)
                .to_vec()
                .ok();
        };
        let Some(lookup) = self.lookup.load_full() else {
            tracing::debug!(dns.name = %q.name(), "DNS query before the name table arrived");
            return reply(ResponseCode::ServFail, Vec::new(), false)
                .to_vec()
                .ok();
        };
        let qname = q.name().to_lowercase().to_ascii();
        let qname = if qname.ends_with('.') {
            qname
        } else {
            format!("{qname}.")
        };
        if let Some(mut answers) = self.lookup(&lookup, q.query_type(), &qname) {
            // The agent's round robin: address records shuffled.
            let split = answers
                .iter()
                .position(|r| r.record_type() != RecordType::CNAME)
                .unwrap_or(answers.len());
            answers[split..].shuffle(&mut rand::rng());
            let m = reply(ResponseCode::NoError, answers, true);
            let max = if tcp {
                usize::from(u16::MAX)
            } else {
                usize::from(req.max_payload())
            };
            let bytes = m.to_vec().ok()?;
            if bytes.len() > max {
                return m.truncate().to_vec().ok();
            }
            return Some(bytes);
        }
        match self.forward(query, tcp).await {
            Some(r) => Some(r),
            None => reply(ResponseCode::ServFail, Vec::new(), false)
                .to_vec()
                .ok(),
        }
    }

    /// Forwards the query as it came to the pod's resolvers.
    async fn forward(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let mut servers = self.upstreams.clone();
        servers.shuffle(&mut rand::rng());
        for s in servers {
            let r = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                if tcp {
                    exchange_tcp(s, query).await
                } else {
                    exchange_udp(s, query).await
                }
            })
            .await;
            match r {
                Ok(Ok(resp)) => return Some(resp),
                Ok(Err(e)) => tracing::info!(dns.upstream = %s, error = %e, "upstream failure"),
                Err(_) => tracing::info!(dns.upstream = %s, "upstream timed out"),
            }
        }
        None
    }
}

async fn exchange_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = match server.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(query).await?;
    let id = query.get(..2);
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Only the answer to this query (same id).
        if buf.get(..2) == id {
            return Ok(buf[..n].to_vec());
        }
    }
}

async fn exchange_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server).await?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(query).await?;
    let n = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Binds UDP and TCP on the address; then serves until the process ends.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(addr).await?;
    let tcp = crate::listener::bind(addr)?;
    Ok((udp, tcp))
}

pub async fn serve_udp(proxy: Arc<DnsProxy>, sock: UdpSocket) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (proxy, sock) = (proxy.clone(), sock.clone());
        tokio::spawn(async move {
            if let Some(resp) = proxy.answer(&query, false).await {
                let _ = sock.send_to(&resp, peer).await;
            }
        });
    }
}

pub async fn serve_tcp(proxy: Arc<DnsProxy>, listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            // One connection may carry several queries.
            while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(30), s.read_u16()).await
            {
                let mut q = vec![0u8; usize::from(n)];
                if s.read_exact(&mut q).await.is_err() {
                    return;
                }
                let Some(resp) = proxy.answer(&q, true).await else {
                    return;
                };
                let Ok(len) = u16::try_from(resp.len()) else {
                    return;
                };
                if s.write_all(&len.to_be_bytes()).await.is_err()
                    || s.write_all(&resp).await.is_err()
                {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_xds::ads::NameInfo;
    use hickory_proto::op::{MessageType, OpCode, Query};

    fn proxy(search: &str) -> DnsProxy {
        let dir = std::env::temp_dir().join(format!("ferry-dns-{}-{search}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rc = dir.join("resolv.conf");
        std::fs::write(&rc, format!("nameserver 192.0.2.53\nsearch {search}\n")).unwrap();
        let p = DnsProxy::new(&DnsOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            resolv_conf: rc,
            namespace: "default".into(),
            domain: "default.svc.cluster.local".into(),
        })
        .unwrap();
        let mut t = NameTable::default();
        t.table.insert(
            "reviews.default.svc.cluster.local".into(),
            NameInfo {
                ips: vec!["10.96.0.7".into()],
                registry: "Kubernetes".into(),
                shortname: "reviews".into(),
                namespace: "default".into(),
                alt_hosts: vec![],
            },
        );
        t.table.insert(
            "*.wiki.example".into(),
            NameInfo {
                ips: vec!["240.240.0.9".into(), "2001:db8::9".into()],
                registry: "External".into(),
                ..NameInfo::default()
            },
        );
        p.update(Arc::new(t));
        p
    }

    async fn ask(p: &DnsProxy, name: &str, t: RecordType) -> Message {
        let mut q = Message::new(7, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        q.metadata.recursion_desired = true;
        Message::from_vec(&p.answer(&q.to_vec().unwrap(), false).await.unwrap()).unwrap()
    }

    fn ips(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                RData::AAAA(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn kubernetes_names_as_the_agent_answers_them() {
        let p = proxy("default.svc.cluster.local");
        for name in [
            "reviews.default.svc.cluster.local.",
            "reviews.default.svc.",
            "reviews.default.",
            "reviews.",
            "REVIEWS.default.svc.cluster.local.",
        ] {
            let m = ask(&p, name, RecordType::A).await;
            assert_eq!(ips(&m), ["10.96.0.7"], "{name}");
            assert!(m.metadata.authoritative && m.metadata.id == 7);
            assert_eq!(m.metadata.message_type, MessageType::Response);
        }
        // Expanded with the first search domain: a CNAME to the host.
        let m = ask(
            &p,
            "reviews.default.default.svc.cluster.local.",
            RecordType::A,
        )
        .await;
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(ips(&m), ["10.96.0.7"]);
        // Known, no IPv6: an empty authoritative answer.
        let m = ask(&p, "reviews.default.svc.cluster.local.", RecordType::AAAA).await;
        assert!(m.answers.is_empty() && m.metadata.response_code == ResponseCode::NoError);
        // Wildcards answer for subdomains, with the asked name.
        let m = ask(&p, "en.wiki.example.", RecordType::AAAA).await;
        assert_eq!(ips(&m), ["2001:db8::9"]);
        assert_eq!(m.answers[0].name.to_ascii(), "en.wiki.example.");
    }

    #[test]
    fn ipv6_resolvers_add_the_ipv6_loopback() {
        let p = proxy("svc.cluster.local");
        let v4: SocketAddr = "127.0.0.1:15053".parse().unwrap();
        assert_eq!(p.listen_addresses(v4), vec![v4]);
        let mut p = p;
        p.upstreams.push("[fd00::53]:53".parse().unwrap());
        assert_eq!(
            p.listen_addresses(v4),
            vec![v4, "[::1]:15053".parse().unwrap()]
        );
    }

    #[tokio::test]
    async fn before_the_table_and_unreachable_resolvers_fail() {
        let p = proxy("svc.cluster.local");
        p.lookup.store(None);
        let m = ask(&p, "reviews.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
}
