//! The pod's resolver configuration (`/etc/resolv.conf`): its name servers
//! (where the DNS proxy forwards what it does not know, and what DNS
//! capture redirects) and its search domains (the first one expands the
//! name table's hosts, as the agent does).

use std::net::IpAddr;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
}

impl ResolvConf {
    /// Reads `nameserver` and `search`/`domain` lines (the last of those
    /// two wins, as the resolver does); comments and other options are
    /// ignored, as is a name server that is not an IP.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words.next().and_then(|w| {
                        // A scoped IPv6 address (`fe80::1%eth0`) keeps its address.
                        w.split('%').next().and_then(|a| a.parse().ok())
                    }) {
                        out.nameservers.push(ip);
                    }
                }
                Some("search") => out.search = words.map(str::to_string).collect(),
                Some("domain") => out.search = words.take(1).map(str::to_string).collect(),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_and_search() {
        let r = ResolvConf::parse(
            "# comment\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver bogus\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n",
        );
        assert_eq!(
            r.nameservers,
            vec![
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        assert_eq!(r.search, ["default.svc.cluster.local", "svc.cluster.local"]);
    }
}
