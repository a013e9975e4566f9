//! The decapsulator's side of the kernel (`lb decap`): the `lb_decap`
//! program and its maps, loaded without the load balancer and pinned under
//! a directory of their own, so a backend runs it without the daemon.
//!
//! Everything in these maps is written again from `lb decap`'s file on each
//! apply, so a pin of another shape (another version) is replaced, never
//! refused.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{
        HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{Xdp, XdpMode, links::FdLink},
};
use lb_common::{
    AddrKey, SOURCE_FAMILY_BITS, SourceKey, addr_ip, counters::DecapCounter, maps as names,
};

use super::{
    EBPF_OBJECT, UNUSED_LB_CAPACITY, attach_xdp, ensure_bpffs, load_program, pins, take,
    xdp_program,
};

/// Where `lb decap` pins its maps and links by default.
pub const DEFAULT_DECAP_PIN_DIR: &str = "/sys/fs/bpf/lb-decap";

/// The decapsulator's maps.
pub(super) const DECAP_MAPS: [&str; 4] = [
    names::DECAP_ADDRS,
    names::DECAP_SOURCES,
    names::DECAP_VIPS,
    names::DECAP_COUNTERS,
];

/// Prefix of the link pins' names in the pin directory: `link_<interface>`.
const LINK_PIN_PREFIX: &str = "link_";

/// A source prefix: an address and how many of its leading bits count.
pub type Prefix = (IpAddr, u8);

/// What the decapsulator's maps hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecapTables {
    /// This host's tunnel endpoints: the outer destinations it decapsulates.
    pub endpoints: BTreeSet<IpAddr>,
    /// The prefixes tunnel packets may come from (the load balancers').
    pub sources: BTreeSet<Prefix>,
    /// The VIPs an inner packet may be addressed to.
    pub vips: BTreeSet<IpAddr>,
    /// The UDP port GUE packets come to (0: none are taken).
    pub gue_port: u16,
}

/// Typed handles on the decapsulator's maps.
struct Maps {
    endpoints: HashMap<MapData, AddrKey, u32>,
    sources: LpmTrie<MapData, SourceKey, u32>,
    vips: HashMap<MapData, AddrKey, u32>,
    counters: PerCpuArray<MapData, u64>,
}

/// The trie key of `prefix`.
fn source_key((ip, len): Prefix) -> Key<SourceKey> {
    Key::new(SOURCE_FAMILY_BITS + u32::from(len), SourceKey::new(ip))
}

/// One key added by [`Maps::write`], to take back if a later one fails.
enum Added {
    /// With the GUE port it had, if it was there already.
    Endpoint(AddrKey, Option<u32>),
    Source(Key<SourceKey>),
    Vip(AddrKey),
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Maps {
            endpoints: take(ebpf, names::DECAP_ADDRS)?,
            sources: take(ebpf, names::DECAP_SOURCES)?,
            vips: take(ebpf, names::DECAP_VIPS)?,
            counters: take(ebpf, names::DECAP_COUNTERS)?,
        })
    }

    fn from_pins(dir: &Path) -> Result<Self> {
        fn open<T>(dir: &Path, name: &str) -> Result<T>
        where
            T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
        {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!("opening {} (has `lb decap apply` run?)", path.display())
            })?;
            let map = match name {
                names::DECAP_SOURCES => aya::maps::Map::LpmTrie(data),
                names::DECAP_COUNTERS => aya::maps::Map::PerCpuArray(data),
                _ => aya::maps::Map::HashMap(data),
            };
            T::try_from(map).with_context(|| format!("{} has an unexpected type", path.display()))
        }
        Ok(Maps {
            endpoints: open(dir, names::DECAP_ADDRS)?,
            sources: open(dir, names::DECAP_SOURCES)?,
            vips: open(dir, names::DECAP_VIPS)?,
            counters: open(dir, names::DECAP_COUNTERS)?,
        })
    }

    fn tables(&self) -> Result<DecapTables> {
        let addrs = |map: &HashMap<MapData, AddrKey, u32>| -> Result<BTreeSet<IpAddr>> {
            map.keys()
                .map(|k| k.map(|k| addr_ip(&k.addr, k.family)).map_err(Into::into))
                .collect()
        };
        let sources = self
            .sources
            .keys()
            .map(|k| {
                let k = k.context("listing the accepted sources")?;
                let data = k.data();
                let len = k.prefix_len().saturating_sub(SOURCE_FAMILY_BITS) as u8;
                Ok((addr_ip(&data.addr, data.family), len))
            })
            .collect::<Result<_>>()?;
        // Every endpoint holds the same port.
        let gue_port = match self.endpoints.iter().next() {
            Some(entry) => entry.context("reading a tunnel endpoint")?.1 as u16,
            None => 0,
        };
        Ok(DecapTables {
            endpoints: addrs(&self.endpoints).context("listing the tunnel endpoints")?,
            sources,
            vips: addrs(&self.vips).context("listing the VIPs")?,
            gue_port,
        })
    }

    /// The counters' totals. A map pinned by an older version holds fewer
    /// (until `lb decap apply` replaces it): those it lacks read 0.
    fn counters(&self) -> Result<[u64; DecapCounter::COUNT as usize]> {
        let mut out = [0; DecapCounter::COUNT as usize];
        let held = self.counters.len() as usize;
        for (i, v) in out.iter_mut().enumerate().take(held) {
            *v = self
                .counters
                .get(&(i as u32), 0)
                .context("reading the decap counters")?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// Makes the maps hold `want`: what is new is added first and what is
    /// gone removed after, so a packet that either table accepts is never
    /// dropped in between. An add that fails takes back the adds before it.
    fn write(&mut self, want: &DecapTables) -> Result<()> {
        let have = self.tables()?;
        let mut added = Vec::new();
        let result = self.add(&have, want, &mut added);
        if let Err(e) = result {
            for key in added.iter().rev() {
                let _ = match key {
                    Added::Endpoint(k, Some(port)) => self.endpoints.insert(k, port, 0),
                    Added::Endpoint(k, None) => self.endpoints.remove(k),
                    Added::Source(k) => self.sources.remove(k),
                    Added::Vip(k) => self.vips.remove(k),
                };
            }
            return Err(e.context("nothing changed"));
        }
        for ip in have.endpoints.difference(&want.endpoints) {
            self.endpoints.remove(&AddrKey::new(*ip))?;
        }
        for p in have.sources.difference(&want.sources) {
            self.sources.remove(&source_key(*p))?;
        }
        for ip in have.vips.difference(&want.vips) {
            self.vips.remove(&AddrKey::new(*ip))?;
        }
        Ok(())
    }

    fn add(
        &mut self,
        have: &DecapTables,
        want: &DecapTables,
        added: &mut Vec<Added>,
    ) -> Result<()> {
        // A new GUE port is written to every endpoint.
        let port = u32::from(want.gue_port);
        for ip in &want.endpoints {
            let had = have
                .endpoints
                .contains(ip)
                .then_some(u32::from(have.gue_port));
            if had == Some(port) {
                continue;
            }
            let k = AddrKey::new(*ip);
            self.endpoints
                .insert(k, port, 0)
                .with_context(|| format!("adding tunnel endpoint {ip}"))?;
            added.push(Added::Endpoint(k, had));
        }
        for p in want.sources.difference(&have.sources) {
            let k = source_key(*p);
            self.sources
                .insert(&k, 0, 0)
                .with_context(|| format!("adding accepted source {}/{}", p.0, p.1))?;
            added.push(Added::Source(k));
        }
        for ip in want.vips.difference(&have.vips) {
            let k = AddrKey::new(*ip);
            self.vips
                .insert(k, 0, 0)
                .with_context(|| format!("adding VIP {ip}"))?;
            added.push(Added::Vip(k));
        }
        Ok(())
    }
}

/// The loaded decapsulator: its program, verified, and its maps.
pub struct Decapsulator {
    ebpf: Ebpf,
    maps: Maps,
    /// Links this process attached without a pin: held so they stay.
    links: Vec<FdLink>,
}

impl Decapsulator {
    /// Loads the program with fresh maps; nothing is pinned or attached.
    pub fn load() -> Result<Self> {
        Self::load_with(None)
    }

    /// Loads the program with its maps pinned under `dir`: maps pinned there
    /// by an earlier apply are adopted (their counters go on), others are
    /// created and pinned.
    pub fn load_pinned(dir: &Path) -> Result<Self> {
        ensure_bpffs(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        pins::reconcile(dir, &DECAP_MAPS, &UNUSED_LB_CAPACITY)?;
        Self::load_with(Some(dir))
    }

    fn load_with(dir: Option<&Path>) -> Result<Self> {
        let paths: Vec<(&str, PathBuf)> = dir
            .map(|d| DECAP_MAPS.iter().map(|n| (*n, d.join(n))).collect())
            .unwrap_or_default();
        let mut loader = UNUSED_LB_CAPACITY.loader()?;
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (maps could not be created)")?;
        let prog = xdp_program(&mut ebpf, names::PROG_DECAP)?;
        load_program(names::PROG_DECAP, || prog.load())?;
        let maps = Maps::take(&mut ebpf)?;
        Ok(Decapsulator {
            ebpf,
            maps,
            links: Vec::new(),
        })
    }

    /// The program, to attach or test-run.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        xdp_program(&mut self.ebpf, names::PROG_DECAP)
    }

    /// Makes the maps hold `tables`; on error nothing changed.
    pub fn set_tables(&mut self, tables: &DecapTables) -> Result<()> {
        self.maps.write(tables)
    }

    /// What the maps hold.
    pub fn tables(&self) -> Result<DecapTables> {
        self.maps.tables()
    }

    /// Counters summed over CPUs, indexed by [`DecapCounter`].
    pub fn counters(&self) -> Result<[u64; DecapCounter::COUNT as usize]> {
        self.maps.counters()
    }

    /// Attaches to `iface`. With a pin directory, the link is pinned there
    /// (an existing one switched to this program, atomically) and outlives
    /// this process; without, it lasts as long as `self`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode, dir: Option<&Path>) -> Result<()> {
        let pin = dir.map(|d| link_pin(d, iface));
        let attached = attach_xdp(self.program()?, iface, mode, pin.as_deref());
        let link = match (attached, pin.as_deref()) {
            // A pinned link whose interface was removed (and perhaps made
            // again) cannot be switched; it holds nothing, so it goes.
            (Err(e), Some(path)) if path.exists() => {
                tracing::warn!(
                    "{iface}: replacing the pinned link {} ({e:#})",
                    path.display()
                );
                std::fs::remove_file(path)
                    .with_context(|| format!("removing {}", path.display()))?;
                attach_xdp(self.program()?, iface, mode, Some(path))?
            }
            (attached, _) => attached?,
        };
        if pin.is_none() {
            self.links.push(link);
        }
        Ok(())
    }
}

/// The pin of `iface`'s link. bpffs refuses names with dots, which VLAN
/// interfaces have (`eth0.100`): `%` and `.` are escaped as in URLs.
fn link_pin(dir: &Path, iface: &str) -> PathBuf {
    let escaped = iface.replace('%', "%25").replace('.', "%2e");
    dir.join(format!("{LINK_PIN_PREFIX}{escaped}"))
}

/// The interface whose link is pinned as `file` (see [`link_pin`]).
fn pinned_interface(file: &str) -> Option<String> {
    let escaped = file.strip_prefix(LINK_PIN_PREFIX)?;
    Some(escaped.replace("%2e", ".").replace("%25", "%"))
}

/// The interfaces with a link pinned under `dir`.
pub fn pinned_interfaces(dir: &Path) -> Result<BTreeSet<String>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(BTreeSet::new());
    };
    let mut out = BTreeSet::new();
    for entry in entries {
        if let Some(iface) = pinned_interface(&entry?.file_name().to_string_lossy()) {
            out.insert(iface);
        }
    }
    Ok(out)
}

/// Detaches from `iface` the decapsulator pinned under `dir` (removing the
/// pin closes the last reference to its link, unless a running `lb decap`
/// process holds one).
pub fn detach(dir: &Path, iface: &str) -> Result<()> {
    let path = link_pin(dir, iface);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
}

/// What the maps pinned under `dir` hold, and their counters.
pub fn read_pinned(dir: &Path) -> Result<(DecapTables, [u64; DecapCounter::COUNT as usize])> {
    let maps = Maps::from_pins(dir)?;
    Ok((maps.tables()?, maps.counters()?))
}

/// Removes every pin `lb decap` made under `dir`: its links (detaching it)
/// and maps, then the directory if nothing else is left in it.
pub fn remove_pinned(dir: &Path) -> Result<()> {
    for iface in pinned_interfaces(dir)? {
        detach(dir, &iface)?;
    }
    for name in DECAP_MAPS {
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_none() {
        std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_name_any_interface_and_read_back() {
        let dir = Path::new("/sys/fs/bpf/x");
        for iface in ["eth0", "eth0.100", "a%2eb", "bond0.7.8"] {
            let pin = link_pin(dir, iface);
            let file = pin.file_name().unwrap().to_str().unwrap();
            assert!(!file.contains('.'), "{file}");
            assert_eq!(pinned_interface(file).as_deref(), Some(iface));
        }
        assert_eq!(pinned_interface(names::DECAP_VIPS), None);
    }
}
