//! The client's address behind proxies: `x-forwarded-for` is believed only from a peer
//! listed in `RESTOCK_TRUSTED_PROXIES`, so that a client cannot choose the address the
//! API rate limit and the failed-authentication throttle count it under.

use std::net::IpAddr;

/// Addresses and networks (`10.0.0.0/8`, `::1`) whose `x-forwarded-for` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses a comma-separated list; an entry that is neither an address nor a
    /// network is refused, naming it.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut nets = vec![];
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || format!("{entry:?} is not an IP address or a network like 10.0.0.0/8");
            let (addr, bits) = match entry.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (entry, None),
            };
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                Some(bits) => bits
                    .parse::<u8>()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(bad)?,
                None => max,
            };
            nets.push((addr, bits));
        }
        Ok(Self(nets))
    }

    fn trusts(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|(net, bits)| within(addr, *net, *bits))
    }

    /// The client of a call from `peer` with `headers`: the peer, or, when the peer
    /// is a trusted proxy, the last address of `x-forwarded-for` that is not a trusted
    /// proxy too.
    pub fn client_of(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(value) = value.to_str() else { break };
            for hop in value.rsplit(',').map(str::trim) {
                let Ok(hop) = hop.parse::<IpAddr>() else {
                    return client;
                };
                client = hop;
                if !self.trusts(hop) {
                    return client;
                }
            }
        }
        client
    }
}

/// Whether `addr` is in the network `net/bits`.
fn within(addr: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (addr, net, width) = match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (u128::from(a.to_bits()), u128::from(n.to_bits()), 32),
        (IpAddr::V6(a), IpAddr::V6(n)) => (a.to_bits(), n.to_bits(), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    shift >= width || (addr >> shift) == (net >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(proxies: &TrustedProxies, peer: &str, forwarded: &[&str]) -> IpAddr {
        let mut headers = http::HeaderMap::new();
        for value in forwarded {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        proxies.client_of(peer.parse().unwrap(), &headers)
    }

    #[test]
    fn forwarded_for_is_believed_from_a_trusted_proxy_only() {
        let proxies = TrustedProxies::parse("10.0.0.0/8, 192.0.2.1").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client(&proxies, "203.0.113.9", &["1.2.3.4"]),
            ip("203.0.113.9")
        );
        assert_eq!(client(&proxies, "192.0.2.1", &["1.2.3.4"]), ip("1.2.3.4"));
        // The client may write anything on the left; only what trusted proxies added
        // counts, from the right.
        assert_eq!(
            client(&proxies, "10.1.2.3", &["6.6.6.6, 1.2.3.4, 10.9.9.9"]),
            ip("1.2.3.4")
        );
        assert_eq!(client(&proxies, "10.1.2.3", &[]), ip("10.1.2.3"));
    }

    #[test]
    fn a_bad_entry_is_refused() {
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("proxy.local").is_err());
        assert_eq!(
            TrustedProxies::parse("").unwrap(),
            TrustedProxies::default()
        );
        assert!(within("::1".parse().unwrap(), "::1".parse().unwrap(), 128));
        assert!(within(
            "8.8.8.8".parse().unwrap(),
            "0.0.0.0".parse().unwrap(),
            0
        ));
    }
}
