//! Next-hop MACs from the kernel's routing and neighbour tables, never from
//! constants. A backend's next hop is the backend itself when on-link, else
//! its gateway. Resolution is triggered with a datagram to the discard port
//! when the kernel does not know the neighbour yet.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use tokio::process::Command;

/// The discard service (RFC 863): a datagram to it makes the kernel resolve
/// the neighbour without asking the backend for anything.
const DISCARD_PORT: u16 = 9;
/// How long to wait for the kernel to resolve a neighbour.
const RESOLVE_WAIT: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
struct Route {
    gateway: Option<IpAddr>,
    dev: Option<String>,
}

#[derive(Deserialize)]
struct Neighbor {
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

async fn ip_json(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .await
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

async fn lookup(next_hop: IpAddr, dev: &str) -> Result<Option<[u8; 6]>> {
    let text = ip_json(&["neigh", "show", "to", &next_hop.to_string(), "dev", dev]).await?;
    let neighbors: Vec<Neighbor> = serde_json::from_str(text.trim()).unwrap_or_default();
    Ok(neighbors
        .iter()
        .filter(|n| !n.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE"))
        .find_map(|n| n.lladdr.as_deref().and_then(parse_mac)))
}

/// Where frames to a backend go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// The MAC of the backend, or of its gateway when not on-link.
    pub mac: [u8; 6],
    /// The address that MAC answers for: the backend's, or its gateway's.
    pub addr: IpAddr,
    /// The interface the route leaves by.
    pub dev: String,
}

/// `backend`'s next hop.
pub async fn resolve(backend: IpAddr) -> Result<NextHop> {
    let text = ip_json(&["route", "get", &backend.to_string()]).await?;
    let routes: Vec<Route> = serde_json::from_str(text.trim()).context("parsing ip route get")?;
    let route = routes
        .into_iter()
        .next()
        .context("no route to the backend")?;
    let next_hop = route.gateway.unwrap_or(backend);
    let dev = route.dev.context("route without a device")?;
    if let Some(mac) = lookup(next_hop, &dev).await? {
        return Ok(NextHop {
            mac,
            addr: next_hop,
            dev,
        });
    }
    let any: std::net::SocketAddr = if next_hop.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()?;
    let s = tokio::net::UdpSocket::bind(any).await?;
    let _ = s.send_to(b"", (next_hop, DISCARD_PORT)).await;
    let deadline = tokio::time::Instant::now() + RESOLVE_WAIT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(mac) = lookup(next_hop, &dev).await? {
            return Ok(NextHop {
                mac,
                addr: next_hop,
                dev,
            });
        }
    }
    bail!("{next_hop} on {dev} did not answer neighbour resolution")
}

/// Resolves every address concurrently; unresolved ones are left out (their
/// backends stay out of the tables until a later attempt succeeds).
pub async fn resolve_all(addrs: impl IntoIterator<Item = IpAddr>) -> BTreeMap<IpAddr, NextHop> {
    let tasks: Vec<_> = addrs
        .into_iter()
        .map(|ip| tokio::spawn(async move { (ip, resolve(ip).await) }))
        .collect();
    let mut hops = BTreeMap::new();
    for t in tasks {
        match t.await {
            Ok((ip, Ok(hop))) => {
                hops.insert(ip, hop);
            }
            Ok((ip, Err(e))) => {
                tracing::warn!(backend = %ip, error = %format!("{e:#}"), "next-hop MAC unresolved");
            }
            Err(_) => {}
        }
    }
    hops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:00:0a:ff:00:11"),
            Some([2, 0, 0x0a, 0xff, 0, 0x11])
        );
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:11:22"), None);
        assert_eq!(parse_mac("zz:00:0a:ff:00:11"), None);
    }
}
