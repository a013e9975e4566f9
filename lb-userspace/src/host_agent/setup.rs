//! The backend host's side of each service it serves, in one place: the
//! VIP on `lo`, the ARP settings `dsr-l2` needs, and for `ipip`/`gue` the
//! decapsulator, judged by `lb doctor --backend`'s rules
//! ([`doctor::assess_backend`]) and, when asked, put right.
//!
//! A host whose setup fails takes no traffic: its agent does not register
//! it (lb's packets would be dropped, or its ARP answers would steal the
//! VIP from the load balancers).

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::{
    config::Mode,
    dataplane::DEFAULT_DECAP_PIN_DIR,
    decap,
    doctor::{self, Finding, Level},
};

/// One service this host serves, as the fleet's services describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Its VIP.
    pub vip: IpAddr,
    /// Its forwarding mode.
    pub mode: Mode,
}

/// The ARP settings a `dsr-l2` backend needs, as `/proc/sys` paths and
/// values: answer ARP only for addresses on the asking interface, and
/// never announce the VIP as a source.
const ARP_SETTINGS: [(&str, &str); 2] = [
    ("net/ipv4/conf/all/arp_ignore", "1"),
    ("net/ipv4/conf/all/arp_announce", "2"),
];

/// Loose reverse-path filtering, so decapsulated packets from clients
/// anywhere are taken.
const RP_FILTER: [(&str, &str); 1] = [("net/ipv4/conf/all/rp_filter", "2")];

/// What `lb doctor --backend` finds for each served service.
pub fn findings(served: &BTreeMap<String, Served>) -> Vec<Finding> {
    served
        .values()
        .flat_map(|s| doctor::assess_backend(&doctor::backend_facts(s.vip), s.mode))
        .collect()
}

/// Whether the host can take the services' traffic.
pub fn passes(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.level != Level::Fail)
}

/// One change that puts a finding right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    /// Add the VIP to `lo`.
    VipOnLo(IpAddr),
    /// Write these sysctls.
    Sysctls(&'static [(&'static str, &'static str)]),
    /// Apply the decapsulator's file (`lb decap apply`).
    Decap,
}

impl std::fmt::Display for Fix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fix::VipOnLo(vip) => {
                let len = if vip.is_ipv4() { 32 } else { 128 };
                write!(f, "add {vip}/{len} to lo")
            }
            Fix::Sysctls(list) => {
                let set: Vec<String> = list
                    .iter()
                    .map(|(p, v)| format!("{}={v}", p.replace('/', ".")))
                    .collect();
                write!(f, "sysctl {}", set.join(" "))
            }
            Fix::Decap => write!(f, "lb decap apply {}", decap::DEFAULT_DECAP_FILE),
        }
    }
}

/// The changes that put the failing findings of `served` right, each once.
pub fn fixes(served: &BTreeMap<String, Served>) -> Vec<Fix> {
    let mut out = Vec::new();
    for s in served.values() {
        let facts = doctor::backend_facts(s.vip);
        for f in doctor::assess_backend(&facts, s.mode) {
            if f.level != Level::Fail {
                continue;
            }
            let fix = if f.check.ends_with(": on lo") {
                Fix::VipOnLo(s.vip)
            } else if f.check.ends_with(": arp") {
                Fix::Sysctls(&ARP_SETTINGS)
            } else if f.check.ends_with(": rp_filter") {
                Fix::Sysctls(&RP_FILTER)
            } else {
                Fix::Decap
            };
            if !out.contains(&fix) {
                out.push(fix);
            }
        }
    }
    out
}

/// Applies `fix`.
pub async fn apply(fix: &Fix) -> Result<()> {
    match fix {
        Fix::VipOnLo(vip) => add_to_lo(*vip).await,
        Fix::Sysctls(list) => {
            for (path, value) in *list {
                let path = Path::new("/proc/sys").join(path);
                std::fs::write(&path, value)
                    .with_context(|| format!("writing {value} to {}", path.display()))?;
            }
            Ok(())
        }
        Fix::Decap => {
            let file = Path::new(decap::DEFAULT_DECAP_FILE);
            if !file.exists() {
                bail!(
                    "{} does not exist: write it (examples/decap.toml, docs/decap.md) with this \
                     host's VIPs and the load balancers' tunnel sources",
                    file.display()
                );
            }
            let config = decap::read(file)?;
            decap::apply(&config, Path::new(DEFAULT_DECAP_PIN_DIR))?;
            Ok(())
        }
    }
}

async fn add_to_lo(vip: IpAddr) -> Result<()> {
    // SAFETY: the name is a NUL-terminated literal.
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if index == 0 {
        bail!("this host has no lo: {}", std::io::Error::last_os_error());
    }
    let (connection, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    let task = tokio::spawn(connection);
    let len = if vip.is_ipv4() { 32 } else { 128 };
    let added = handle
        .address()
        .add(index, vip, len)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding {vip}/{len} to lo"));
    task.abort();
    added
}
