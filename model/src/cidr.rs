//! CIDR ranges as filter chains match destination and source addresses.

use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrRange {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl CidrRange {
    /// Builds a range, rejecting a prefix length longer than the address.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix_len <= max).then_some(Self { addr, prefix_len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(net) ^ u32::from(ip);
                self.prefix_len == 0 || bits >> (32 - u32::from(self.prefix_len)) == 0
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u128::from(net) ^ u128::from(ip);
                self.prefix_len == 0 || bits >> (128 - u32::from(self.prefix_len)) == 0
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for CidrRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("invalid IP address {ip:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            Some(len) => len
                .parse::<u8>()
                .map_err(|_| format!("invalid prefix length {len:?}"))?,
            None => max,
        };
        Self::new(addr, prefix_len)
            .ok_or_else(|| format!("prefix length {prefix_len} exceeds {max}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_v4_and_v6() {
        let r: CidrRange = "10.1.0.0/16".parse().unwrap();
        assert!(r.contains("10.1.2.3".parse().unwrap()));
        assert!(!r.contains("10.2.0.1".parse().unwrap()));
        assert!(!r.contains("::1".parse().unwrap()));
        let all: CidrRange = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6: CidrRange = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<CidrRange>().is_err());
    }
}
