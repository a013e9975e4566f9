//! The demo's hosts: a client, the load balancer and three backends in
//! network namespaces on one bridge, with fixed names so an operator can
//! type them (`ip netns exec lb-demo-client ...`) while the demo is kept.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Result;

use crate::netns::{self, Netns};

/// Prefix of every namespace the demo makes.
pub const PREFIX: &str = "lb-demo-";
/// The VIP.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The client's address on the segment.
pub const CLIENT: &str = "198.18.0.1/24";
/// The load balancer's address on the segment.
pub const LB: &str = "198.18.0.2/24";

/// A backend: its name (what its server answers), address, MAC and weight.
pub struct Backend {
    /// What its HTTP server answers.
    pub name: &'static str,
    /// Its address.
    pub addr: Ipv4Addr,
    /// Its MAC.
    pub mac: [u8; 6],
    /// Its weight in the demo's configuration.
    pub weight: u32,
}

/// The three backends.
pub const BACKENDS: [Backend; 3] = [
    Backend {
        name: "backend-1",
        addr: Ipv4Addr::new(198, 18, 0, 11),
        mac: [2, 0, 0, 0, 0, 0x11],
        weight: 1,
    },
    Backend {
        name: "backend-2",
        addr: Ipv4Addr::new(198, 18, 0, 12),
        mac: [2, 0, 0, 0, 0, 0x12],
        weight: 1,
    },
    Backend {
        name: "backend-3",
        addr: Ipv4Addr::new(198, 18, 0, 13),
        mac: [2, 0, 0, 0, 0, 0x13],
        weight: 2,
    },
];

/// The namespaces; dropping the topology deletes them all.
pub struct Topology {
    /// The client.
    pub client: Netns,
    /// The load balancer.
    pub lb: Netns,
    /// The backends, in [`BACKENDS`] order.
    pub backends: Vec<Netns>,
    _switch: Netns,
}

impl Topology {
    /// Builds it. Backends are set up as `lb doctor` asks of a `dsr-l2`
    /// backend: the VIP on `lo`, ARP for it suppressed.
    pub fn build() -> Result<Topology> {
        let name = |role: &str| format!("{PREFIX}{role}");
        let switch = Netns::named(&name("switch"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::named(&name("client"))?;
        let lb = Netns::named(&name("lb"))?;
        netns::plug(&switch, "pcl", &client, "02:00:00:00:00:01", &[CLIENT])?;
        netns::plug(&switch, "plb", &lb, "02:00:00:00:00:02", &[LB])?;
        client.ip(&["route", "add", &format!("{VIP}/32"), "via", "198.18.0.2"])?;
        let mut backends = Vec::new();
        for (i, b) in BACKENDS.iter().enumerate() {
            let ns = Netns::named(&name(&format!("backend{}", i + 1)))?;
            netns::plug(
                &switch,
                &format!("pb{}", i + 1),
                &ns,
                &netns::mac_string(&b.mac),
                &[&format!("{}/24", b.addr)],
            )?;
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
            backends.push(ns);
        }
        Ok(Topology {
            client,
            lb,
            backends,
            _switch: switch,
        })
    }
}

/// Namespaces left by a demo that was killed before it could clean up.
pub fn leftovers() -> Vec<String> {
    std::fs::read_dir(Path::new("/run/netns"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect()
}

/// Deletes namespaces a killed demo left behind (they are the demo's by
/// name). Only while holding the demo's lock: a running demo's are alike.
pub fn remove_leftovers() -> Result<usize> {
    let names = leftovers();
    for n in &names {
        netns::ip(&["netns", "del", n])?;
    }
    Ok(names.len())
}
