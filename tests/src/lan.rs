//! One L2 segment in namespaces: a client, the load balancer and backends on
//! a bridge, with IPv4 and IPv6 addresses, the client routing the VIP ranges
//! through the load balancer and every backend holding the VIPs on `lo`
//! (answering no ARP for them, as a `dsr-l2` backend must not).

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use lb::{
    demo::server::NameServer,
    netns::{self, Netns},
};

/// The load balancer's address (the client's route to the VIPs).
pub const LB_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The client's address.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The second client's address ([`Lan::second_client`]).
pub const SECOND_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

/// A backend host.
pub struct Host {
    /// Its namespace.
    pub ns: Netns,
    /// MAC of its `eth0`.
    pub mac: [u8; 6],
    /// IPv4 address.
    pub v4: Ipv4Addr,
    /// IPv6 address.
    pub v6: Ipv6Addr,
}

/// The segment; dropping it removes every namespace.
pub struct Lan {
    /// Backends, in order (`backend-1` first).
    pub backends: Vec<Host>,
    /// The client.
    pub client: Netns,
    /// The load balancer.
    pub lb: Netns,
    /// The bridge's namespace.
    switch: Netns,
}

impl Lan {
    /// Builds the segment with `n` backends at 198.18.0.11.. / 2001:2::11..,
    /// each holding `vips` on its loopback.
    pub fn build(n: u8, vips: &[&str]) -> Result<Lan> {
        let switch = netns::switch()?;
        let client = Netns::new("cl")?;
        let lb = Netns::new("lb")?;
        netns::plug(
            &switch,
            "pcl",
            &client,
            "02:00:00:00:00:01",
            &["198.18.0.1/24", "2001:2::1/64"],
        )?;
        plug_lb(&switch, &lb)?;
        route_vips(&client)?;
        let mut backends = Vec::new();
        for i in 1..=n {
            let h = Host {
                ns: Netns::new(&format!("b{i}"))?,
                mac: [0x02, 0, 0, 0, 0, 0x10 + i],
                v4: Ipv4Addr::new(198, 18, 0, 10 + i),
                v6: Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10 + u16::from(i)),
            };
            let (a4, a6) = (format!("{}/24", h.v4), format!("{}/64", h.v6));
            netns::plug(
                &switch,
                &format!("pb{i}"),
                &h.ns,
                &netns::mac_string(&h.mac),
                &[&a4, &a6],
            )?;
            for vip in vips {
                let mut args = vec!["addr", "add", *vip, "dev", "lo"];
                if vip.contains(':') {
                    args.push("nodad");
                }
                h.ns.ip(&args)?;
            }
            // The VIPs are the backend's own, but only lb may answer for
            // them on the segment (probes through the VIP check it).
            h.ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            h.ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
            backends.push(h);
        }
        Ok(Lan {
            backends,
            client,
            lb,
            switch,
        })
    }
}

/// Routes the VIP ranges of a client through the load balancer.
fn route_vips(client: &Netns) -> Result<()> {
    client.ip(&["route", "add", "198.18.1.0/24", "via", "198.18.0.2"])?;
    client.ip(&["-6", "route", "add", "2001:2:1::/64", "via", "2001:2::2"])
}

/// The load balancer's port on the switch, its MAC and addresses.
const LB_PORT: &str = "plb";
const LB_MAC: &str = "02:00:00:00:00:02";
const LB_ADDRS: [&str; 2] = ["198.18.0.2/24", "2001:2::2/64"];

fn plug_lb(switch: &Netns, lb: &Netns) -> Result<()> {
    netns::plug(switch, LB_PORT, lb, LB_MAC, &LB_ADDRS)
}

impl Lan {
    /// Removes the load balancer's interface (both ends of its veth), as
    /// when a NIC or its driver goes away.
    pub fn unplug_lb(&self) -> Result<()> {
        self.switch.ip(&["link", "del", LB_PORT])
    }

    /// Creates the load balancer's interface again, as before.
    pub fn replug_lb(&self) -> Result<()> {
        plug_lb(&self.switch, &self.lb)
    }

    /// The switch's namespace and its port facing the load balancer (the
    /// peer of the load balancer's `eth0`).
    pub fn lb_port(&self) -> (&Netns, &'static str) {
        (&self.switch, LB_PORT)
    }

    /// Plugs a second client into the segment, at [`SECOND_CLIENT_V4`] and
    /// 2001:2::3, routing the VIPs as the first does. Its namespace goes
    /// when the returned value is dropped.
    pub fn second_client(&self) -> Result<Netns> {
        let client = Netns::new("cl2")?;
        netns::plug(
            &self.switch,
            "pcl2",
            &client,
            "02:00:00:00:00:03",
            &[&format!("{SECOND_CLIENT_V4}/24"), "2001:2::3/64"],
        )?;
        route_vips(&client)?;
        Ok(client)
    }

    /// Starts a name server (`backend-1`, `backend-2`, ...) on `port` of
    /// every backend.
    pub fn serve_names(&self, port: u16) -> Result<Vec<NameServer>> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, h)| NameServer::start(&h.ns, &format!("backend-{}", i + 1), port))
            .collect()
    }
}
