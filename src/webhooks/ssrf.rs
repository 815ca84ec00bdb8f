//! Which webhook targets may be called (SPEC §6 SSRF guard).
//!
//! A tenant chooses the URL; the server makes the request. Without a guard a tenant could
//! make the server call its own admin port, a metadata service or a private network. So:
//! - at registration: https only (unless `allow_http`), no credentials in the URL, and
//!   every address the host resolves to must be public (unless `allow_private_targets`);
//! - at delivery: the HTTP client resolves names through `GuardedResolver`, which drops
//!   forbidden addresses at connection time (DNS may have changed since registration, or
//!   answer differently per query), literal IP hosts are checked before sending, no proxy
//!   is used (it would resolve for us), and redirects are not followed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Longest URL accepted.
pub const URL_BYTES_MAX: usize = 2048;
/// Registration gives DNS this long.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a URL is refused (the message is shown to the tenant).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// An address a webhook may not reach unless private targets are allowed: loopback,
/// private, carrier-grade NAT, link-local, multicast, unspecified, broadcast,
/// documentation and reserved ranges, and their IPv4-mapped IPv6 forms.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let seg0 = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg0 & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (seg0 & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (seg0 & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
                || seg0 == 0x2001 && v6.segments()[1] == 0x0db8 // documentation
                || v6.segments()[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible ::a.b.c.d
                || seg0 == 0x0064 && v6.segments()[1] == 0xff9b // NAT64 64:ff9b::/96
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // carrier-grade NAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240 // reserved
}

/// Checks a URL's form; returns it parsed. Hosts are resolved separately.
pub fn check_url(raw: &str, allow_http: bool) -> Result<url::Url, Refused> {
    if raw.len() > URL_BYTES_MAX {
        return Err(Refused(format!("url is longer than {URL_BYTES_MAX} bytes")));
    }
    let u = url::Url::parse(raw).map_err(|e| Refused(format!("url is not valid: {e}")))?;
    match u.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => return Err(Refused("url must use https".into())),
        s => return Err(Refused(format!("url scheme {s} is not allowed"))),
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(Refused("url must not carry credentials".into()));
    }
    if u.host().is_none() {
        return Err(Refused("url has no host".into()));
    }
    if u.fragment().is_some() {
        return Err(Refused("url must not have a fragment".into()));
    }
    Ok(u)
}

/// The literal address of a URL's host, if it is one.
fn literal(u: &url::Url) -> Option<IpAddr> {
    match u.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

/// Checks a literal IP host (names are checked by resolution).
pub fn check_literal(u: &url::Url, allow_private: bool) -> Result<(), Refused> {
    match literal(u) {
        Some(ip) if !allow_private && is_forbidden(ip) => Err(Refused(format!(
            "address {ip} is not allowed (loopback, private, link-local or reserved)"
        ))),
        _ => Ok(()),
    }
}

/// Registration: the URL's form, then every address its host resolves to.
pub async fn check_target(
    raw: &str,
    allow_http: bool,
    allow_private: bool,
) -> Result<url::Url, Refused> {
    let u = check_url(raw, allow_http)?;
    check_literal(&u, allow_private)?;
    if literal(&u).is_some() || allow_private {
        return Ok(u);
    }
    let host = u.host_str().unwrap_or_default().to_owned();
    let port = u.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        RESOLVE_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => return Err(Refused(format!("host {host} does not resolve: {e}"))),
        Err(_) => return Err(Refused(format!("host {host} did not resolve in time"))),
    };
    if addrs.is_empty() {
        return Err(Refused(format!("host {host} has no address")));
    }
    if let Some(bad) = addrs.iter().find(|a| is_forbidden(a.ip())) {
        return Err(Refused(format!(
            "host {host} resolves to {} which is not allowed (loopback, private, \
             link-local or reserved)",
            bad.ip()
        )));
    }
    Ok(u)
}

/// The delivery client's resolver: the system's answer without forbidden addresses.
pub struct GuardedResolver {
    /// Keep private addresses (config `allow_private_targets`).
    pub allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || !is_forbidden(a.ip()))
                .collect();
            if found.is_empty() {
                return Err(format!("{host}: no allowed address (SSRF guard)").into());
            }
            Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The client deliveries use: guarded resolution, no proxy, no redirects, a deadline.
pub fn client(allow_private: bool, timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver { allow_private }))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("reelbatch-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
}

#[cfg(test)]
fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<std::net::Ipv6Addr>().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
        ] {
            assert!(is_forbidden(a.parse().unwrap()), "{a}");
        }
        for a in [
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_forbidden(v6(a)), "{a}");
        }
        for a in ["8.8.8.8", "1.1.1.1", "93.184.216.34"] {
            assert!(!is_forbidden(a.parse().unwrap()), "{a}");
        }
        assert!(!is_forbidden(v6("2606:4700:4700::1111")));
    }

    #[test]
    fn url_rules() {
        assert!(check_url("https://example.com/hook", false).is_ok());
        assert!(check_url("http://example.com/hook", false).is_err());
        assert!(check_url("http://example.com/hook", true).is_ok());
        assert!(check_url("ftp://example.com/", true).is_err());
        assert!(check_url("https://user:pw@example.com/", false).is_err());
        assert!(check_url("not a url", false).is_err());
        assert!(check_url(&format!("https://e.com/{}", "a".repeat(3000)), false).is_err());
        let u = check_url("https://127.0.0.1/x", false).unwrap();
        assert!(check_literal(&u, false).is_err());
        assert!(check_literal(&u, true).is_ok());
        let u = check_url("https://[::1]/x", false).unwrap();
        assert!(check_literal(&u, false).is_err());
    }

    #[test]
    fn localhost_is_refused_at_registration() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(check_target("https://localhost:9/x", false, false));
        assert!(r.is_err(), "{r:?}");
        let r = rt.block_on(check_target("http://localhost:9/x", true, true));
        assert!(r.is_ok(), "{r:?}");
    }
}
