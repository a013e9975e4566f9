//! `lb doctor`: checks a host before lb attaches to it, or a backend before
//! it takes traffic, and says for each problem the command that fixes it.
//!
//! Gathering facts (commands, /proc, netlink; a trial attach only when
//! asked, `--probe-native`) is kept apart from judging them: [`assess_interface`], [`assess_host`] and
//! [`assess_backend`] are pure and tested on their own.

use std::{net::IpAddr, path::Path, process::Command};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use lb_common::maps::{PROG_DECAP, PROG_LB};
use serde::Serialize;
use serde_json::Value;

use crate::{
    config::{Mode, XdpModeSetting},
    daemon,
    dataplane::{self, Capacity, DEFAULT_DECAP_PIN_DIR, DEFAULT_PIN_DIR, Dataplane, DecapTables},
    decap::DEFAULT_DECAP_FILE,
    xdp_features::{self, NETDEV_XDP_ACT_BASIC},
};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// As it should be.
    Ok,
    /// Works, but worse than it could (or will be fixed by lb itself).
    Warn,
    /// lb cannot work as configured until this is fixed.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What was checked (`eth0: gro`, `bpffs`, ...).
    pub check: String,
    /// How it went.
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// The command that fixes it, when not Ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(check: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding {
        check: check.into(),
        level: Level::Ok,
        detail: detail.into(),
        fix: None,
    }
}

fn problem(
    level: Level,
    check: impl Into<String>,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        check: check.into(),
        level,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// What lb needs to know of an interface it will attach to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceFacts {
    /// Interface name.
    pub name: String,
    /// It exists.
    pub exists: bool,
    /// Its driver (`ethtool -i`).
    pub driver: Option<String>,
    /// Name of an XDP program attached to it now, if any.
    pub attached: Option<String>,
    /// Why the daemon refuses it in the configured mode, by its own rule
    /// ([`dataplane::check_interface`]): not an Ethernet interface of this
    /// network namespace, a bond in driver mode.
    pub refused: Option<String>,
    /// Why the daemon's rules keep driver mode off it while they take
    /// generic mode (a bond): `auto` means generic there.
    pub no_driver_mode: Option<String>,
    /// The driver's XDP features as the kernel reports them
    /// (`NETDEV_XDP_ACT_*`, [`xdp_features`], Linux 6.3 and later), read
    /// without touching the link; `None` when the kernel does not report
    /// them.
    pub xdp_features: Option<u64>,
    /// Why they could not be read (a netlink error), which says nothing
    /// of the kernel's age.
    pub features_error: Option<String>,
    /// A trial attach in driver (native) mode worked; `None` if not tried:
    /// only with `--probe-native` (some drivers reset the link for it), on
    /// an interface without a program where driver mode is allowed, and
    /// not when lb's program did not load.
    pub trial: Option<bool>,
    /// Why the trial could not attach at all: lb's program did not load
    /// (no CAP_BPF, a verifier that refuses it), which says nothing of the
    /// driver.
    pub load_error: Option<String>,
    /// Large receive offload is on.
    pub lro: bool,
    /// The devices under it (a bond's slaves, a VLAN's parent, down to
    /// the ones that receive from the wire) that merge packets with GRO:
    /// the kernel skips GRO only on the device running a generic-mode
    /// program, so those below merge what it then sees.
    pub gro_below: Vec<String>,
}

/// Host-wide facts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Where the daemon pins (`--pin-dir`).
    pub pin_dir: String,
    /// A bpffs is mounted on /sys/fs/bpf (the daemon mounts one there when
    /// the pin directory is under it and none is).
    pub bpffs_root: bool,
    /// The pin directory, or its nearest ancestor that exists, and whether
    /// that is on a bpffs: the directory the daemon makes lands on it.
    pub pin_fs: (String, bool),
    /// Whether the pin directory's parent is on a bpffs; `None` when it
    /// does not exist. Outside /sys/fs/bpf the daemon refuses a parent
    /// that is not.
    pub parent_bpffs: Option<bool>,
    /// Kernel version (major, minor).
    pub kernel: (u32, u32),
    /// RLIMIT_MEMLOCK in bytes; `None` is unlimited.
    pub memlock: Option<u64>,
}

/// What a backend of a service needs, as found on the backend host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendFacts {
    /// The VIP.
    pub vip: Option<IpAddr>,
    /// The VIP is on a loopback interface.
    pub vip_on_lo: bool,
    /// Effective `arp_ignore` (the kernel takes the larger of `all`'s and
    /// the interface's), on an up Ethernet interface where it lets the host
    /// answer ARP for the VIP, else where it is lowest.
    pub arp_ignore: u32,
    /// Effective `arp_announce`, likewise.
    pub arp_announce: u32,
    /// Effective rp_filter where decapsulated packets arrive (max of `all`
    /// and the interface's); 0 for an IPv6 VIP, which IPv4's rp_filter
    /// never filters (IPv6 has none).
    pub rp_filter: u32,
    /// lb's decapsulator is attached to an interface.
    pub decap_attached: bool,
    /// What `lb decap`'s pinned maps hold, when they can be read.
    pub decap_tables: Option<DecapTables>,
    /// The kernel's `tunl0` (IPv4) or `ip6tnl0` (IPv6) is up.
    pub kernel_tunnel_up: bool,
}

/// What the node side of BGP announcements looks like: lb's routes, and
/// BIRD's view of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnnounceFacts {
    /// The kernel table lb announces through.
    pub table: u32,
    /// BIRD's control socket, and why it does not answer, if it does not.
    pub bird: (String, Option<String>),
    /// BIRD's BGP sessions.
    pub sessions: Vec<crate::bird::Protocol>,
    /// VIPs with a route of lb's in the table now.
    pub vips: Vec<IpAddr>,
    /// Of those, the ones BIRD has learned.
    pub learned: Vec<IpAddr>,
    /// Per established session, the VIPs BIRD exports to it.
    pub exported: Vec<(String, Vec<IpAddr>)>,
}

/// Kernel from which BPF memory is charged to the cgroup, not RLIMIT_MEMLOCK.
const MEMCG_ACCOUNTING: (u32, u32) = (5, 11);

/// The veth driver's name, as ethtool reports it.
const VETH: &str = "veth";

/// Where the daemon mounts bpffs when a pin directory under it has none.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// A veth runs native XDP, but delivers a frame sent with XDP_TX only to a
/// peer that runs an XDP program itself, and native XDP loses the checksum
/// a local sender left to offload (measured by `cargo xtask bench`): on a
/// veth, generic mode is the one that forwards whatever the peer is.
fn veth_mode(n: &str, mode: XdpModeSetting) -> Finding {
    match mode {
        XdpModeSetting::Generic => ok(
            format!("{n}: xdp mode"),
            "generic, the mode that forwards on a veth whatever its peer runs",
        ),
        XdpModeSetting::Auto | XdpModeSetting::Native => problem(
            Level::Warn,
            format!("{n}: xdp mode"),
            "native XDP on a veth forwards only if the veth's peer runs an XDP program, \
             and only frames whose sender filled in their checksums",
            "set xdp_mode = \"generic\" in [settings], or attach an XDP program to the peer \
             and turn off TX checksum offload on local senders (ethtool -K IF tx off)",
        ),
    }
}

/// Judges one interface for `mode`, by the daemon's rules: the mode it
/// attaches in there is the one judged.
pub fn assess_interface(f: &InterfaceFacts, mode: XdpModeSetting) -> Vec<Finding> {
    let n = &f.name;
    if !f.exists {
        return vec![problem(
            Level::Fail,
            format!("{n}: exists"),
            format!("there is no interface {n}"),
            "ip link   # then name an existing interface in settings.interfaces",
        )];
    }
    let mut out = Vec::new();
    let driver = f.driver.as_deref().unwrap_or("unknown driver");
    // A trial attach, when one was made, says more than the features (a
    // driver may refuse lb's program for its MTU, say).
    let native = f
        .trial
        .or(f.xdp_features.map(|x| x & NETDEV_XDP_ACT_BASIC != 0));
    let how = if f.trial.is_some() {
        "a trial attach"
    } else {
        "the kernel's xdp_features"
    };
    // Where the daemon's rules keep driver mode off, `auto` is generic
    // (`native` is refused there).
    let generic_only = f.no_driver_mode.is_some() && mode != XdpModeSetting::Native;
    let probe = "lb doctor --probe-native   # attaches lb's program in driver mode for a moment: \
                 some drivers (ixgbe, i40e) reset the link for it, dropping traffic";
    out.push(if let Some(why) = &f.refused {
        problem(
            Level::Fail,
            format!("{n}: xdp"),
            format!("lb daemon refuses {n}: {why}"),
            if f.no_driver_mode.is_some() {
                "set xdp_mode = \"auto\" or \"generic\" in [settings]".to_string()
            } else {
                format!(
                    "ip -d link show dev {n}   # lb attaches to Ethernet interfaces of its \
                     network namespace: name one in settings.interfaces"
                )
            },
        )
    } else {
        match (&f.attached, native) {
            (Some(p), _) if p == PROG_LB => ok(
                format!("{n}: xdp"),
                format!("lb is attached already ({driver})"),
            ),
            (Some(p), _) => problem(
                Level::Fail,
                format!("{n}: xdp"),
                format!("another XDP program ({p}) is attached"),
                format!("ip link set dev {n} xdp off   # if nothing else needs it"),
            ),
            _ if generic_only => ok(
                format!("{n}: xdp mode"),
                format!(
                    "generic, the mode lb attaches to {n} in ({})",
                    f.no_driver_mode
                        .as_deref()
                        .unwrap_or_default()
                        .split(';')
                        .next()
                        .unwrap_or_default()
                ),
            ),
            _ if f.load_error.is_some() => problem(
                Level::Fail,
                format!("{n}: xdp mode"),
                format!(
                    "lb's XDP program did not load, so native XDP was not tried: {}",
                    f.load_error.as_deref().unwrap_or_default()
                ),
                "run as root (CAP_BPF, CAP_NET_ADMIN) on a kernel lb supports; lb cannot attach either",
            ),
            (None, Some(true) | None) if driver == VETH => veth_mode(n, mode),
            (None, Some(true)) if mode == XdpModeSetting::Generic => problem(
                Level::Warn,
                format!("{n}: xdp mode"),
                format!("{driver} supports native XDP ({how}) but generic mode is configured"),
                "set xdp_mode = \"native\" (or \"auto\") in [settings] for driver-speed forwarding",
            ),
            (None, Some(true)) => ok(
                format!("{n}: xdp mode"),
                format!("{driver} supports native XDP ({how})"),
            ),
            (None, Some(false)) if mode == XdpModeSetting::Native => problem(
                Level::Fail,
                format!("{n}: xdp mode"),
                format!("{driver} has no native XDP ({how}), which the configuration requires"),
                if f.trial.is_some() {
                    "set xdp_mode = \"auto\" or \"generic\" in [settings]".to_string()
                } else {
                    format!(
                        "set xdp_mode = \"auto\" or \"generic\" in [settings]; a driver built \
                         outside the kernel may not report its features: {probe}"
                    )
                },
            ),
            (None, Some(false)) => problem(
                Level::Warn,
                format!("{n}: xdp mode"),
                format!(
                    "{driver} has no native XDP ({how}): generic mode, several times slower"
                ),
                "use a NIC whose driver has XDP (ixgbe, i40e, ice, mlx5, virtio_net, ...)",
            ),
            (None, None) if mode == XdpModeSetting::Generic => ok(
                format!("{n}: xdp mode"),
                "generic; the driver's native XDP not checked",
            ),
            (None, None) => problem(
                Level::Warn,
                format!("{n}: xdp mode"),
                match &f.features_error {
                    Some(e) => format!(
                        "not probed: whether {driver} has native XDP is unknown (reading its \
                         xdp_features failed: {e})"
                    ),
                    None => format!(
                        "not probed: whether {driver} has native XDP is unknown (this kernel \
                         does not report xdp_features, Linux 6.3 and later do)"
                    ),
                },
                probe,
            ),
        }
    });
    if f.lro {
        out.push(problem(
            Level::Fail,
            format!("{n}: lro"),
            "large receive offload merges packets before XDP sees them",
            format!("ethtool -K {n} lro off"),
        ));
    }
    let generic = mode == XdpModeSetting::Generic || generic_only || native == Some(false);
    if generic {
        for lower in &f.gro_below {
            out.push(problem(
                Level::Warn,
                format!("{lower}: gro"),
                format!(
                    "{lower} (under {n}) merges packets (GRO) before generic XDP on {n} sees \
                     them: merged packets exceed the MTU when forwarded (the kernel skips GRO \
                     only on the device running the program)"
                ),
                format!("ethtool -K {lower} gro off"),
            ));
        }
    }
    out
}

/// Judges where the daemon pins, as it does ([`Dataplane::claim_pin_dir`]):
/// under /sys/fs/bpf it mounts bpffs there when nothing is; elsewhere it
/// refuses a parent not on a bpffs; and the directory it makes must land on
/// one.
fn assess_bpffs(h: &HostFacts) -> Finding {
    let dir = Path::new(&h.pin_dir);
    let under_root = dir.starts_with(BPFFS_ROOT);
    let (near, near_bpffs) = (&h.pin_fs.0, h.pin_fs.1);
    let own = format!(
        "pin under {BPFFS_ROOT} (the daemon's default, {DEFAULT_PIN_DIR}), or on a bpffs of its \
         own: mkdir DIR && mount -t bpf bpf DIR with a new, empty DIR, then --pin-dir DIR/lb"
    );
    if under_root && !h.bpffs_root {
        problem(
            Level::Warn,
            "bpffs",
            format!("nothing is mounted on {BPFFS_ROOT} (lb daemon mounts bpffs there itself)"),
            format!("mount -t bpf bpf {BPFFS_ROOT}"),
        )
    } else if !under_root && h.parent_bpffs == Some(false) {
        problem(
            Level::Fail,
            "bpffs",
            format!(
                "{} is not on a bpffs: lb daemon refuses to pin in {}",
                dir.parent().unwrap_or(dir).display(),
                h.pin_dir
            ),
            own,
        )
    } else if !near_bpffs && under_root {
        problem(
            Level::Fail,
            "bpffs",
            format!(
                "{near} is not on a bpffs (another filesystem is mounted there): pinning in {} \
                 would fail",
                h.pin_dir
            ),
            format!("findmnt -T {near}   # then pin where bpffs is, such as {DEFAULT_PIN_DIR}"),
        )
    } else if !near_bpffs {
        problem(
            Level::Fail,
            "bpffs",
            format!(
                "{near} is not on a bpffs: pinning in {} would fail",
                h.pin_dir
            ),
            own,
        )
    } else if *near == h.pin_dir {
        ok("bpffs", format!("{} is on bpffs", h.pin_dir))
    } else {
        ok(
            "bpffs",
            format!("{near} is on bpffs (lb daemon makes {} there)", h.pin_dir),
        )
    }
}

/// Judges the host.
pub fn assess_host(h: &HostFacts) -> Vec<Finding> {
    let mut out = vec![assess_bpffs(h)];
    out.push(if h.kernel >= MEMCG_ACCOUNTING || h.memlock.is_none() {
        ok(
            "memlock",
            format!(
                "kernel {}.{} charges BPF memory to the cgroup",
                h.kernel.0, h.kernel.1
            ),
        )
    } else {
        problem(
            Level::Fail,
            "memlock",
            format!(
                "kernel {}.{} limits BPF maps to RLIMIT_MEMLOCK ({} KiB)",
                h.kernel.0,
                h.kernel.1,
                h.memlock.unwrap_or(0) / 1024
            ),
            "ulimit -l unlimited   # LimitMEMLOCK=infinity in the systemd unit",
        )
    });
    out
}

/// Whether anything decapsulates what lb tunnels to `vip` in `mode`, and
/// lets it in.
fn assess_decap(b: &BackendFacts, vip: IpAddr, mode: Mode) -> Finding {
    let name = format!("{vip}: decap");
    let apply = format!("add {vip} to vips in {DEFAULT_DECAP_FILE}, then: lb decap apply");
    match (&b.decap_tables, b.decap_attached) {
        (Some(t), true) if mode == Mode::Gue && t.gue_port == 0 => problem(
            Level::Fail,
            name,
            "lb_decap is attached but takes no GUE packets (gue_port = 0)",
            format!(
                "set gue_port in {DEFAULT_DECAP_FILE} to the load balancers', then: lb decap apply"
            ),
        ),
        (Some(t), true) if t.vips.contains(&vip) => ok(
            name,
            format!(
                "lb_decap is attached and accepts tunnel packets for the VIP from {} prefix(es)",
                t.sources.len()
            ),
        ),
        (Some(_), true) => problem(
            Level::Fail,
            name,
            "lb_decap is attached but drops tunnel packets for this VIP (not among its vips)",
            apply,
        ),
        (None, true) => problem(
            Level::Warn,
            name,
            format!(
                "lb_decap is attached, but not by `lb decap` (nothing pinned at {DEFAULT_DECAP_PIN_DIR}): \
                 its VIPs and sources cannot be checked"
            ),
            apply,
        ),
        (_, false) if b.kernel_tunnel_up && mode == Mode::Ipip => problem(
            Level::Warn,
            name,
            "the kernel's tunnel device decapsulates, from any source: anyone who reaches this \
             host can tunnel packets into its stack",
            format!("{apply}   # accepts only the load balancers' tunnel sources"),
        ),
        (_, false) => problem(
            Level::Fail,
            name,
            "nothing decapsulates the tunnel packets lb sends",
            format!("{apply}   # see docs/decap.md"),
        ),
    }
}

/// Whether an effective `arp_ignore` keeps the host from answering ARP for
/// a VIP on `lo`: 1 and 2 answer only for the asking interface's addresses,
/// 8 for none. 3 still answers for a global-scope address (the VIP is one),
/// and the kernel answers all under 4-7 (reserved) and above 8.
pub fn arp_ignore_suppresses(value: u32) -> bool {
    matches!(value, 1 | 2 | 8)
}

/// Whether an effective `arp_announce` keeps the VIP out of the host's ARP
/// requests: only 2 (the kernel takes values above 2 as 0).
pub fn arp_announce_suppresses(value: u32) -> bool {
    value == 2
}

/// Whether an effective rp_filter lets decapsulated packets from clients
/// in: all but 1 (strict).
pub fn rp_filter_lets_in(value: u32) -> bool {
    value != 1
}

/// Judges a backend host for a service of `mode`.
pub fn assess_backend(b: &BackendFacts, mode: Mode) -> Vec<Finding> {
    let Some(vip) = b.vip else {
        return Vec::new();
    };
    let (plen, v6) = if vip.is_ipv6() {
        (128, "-6 ")
    } else {
        (32, "")
    };
    let mut out = vec![if b.vip_on_lo {
        ok(format!("{vip}: on lo"), "the backend accepts the VIP")
    } else {
        problem(
            Level::Fail,
            format!("{vip}: on lo"),
            "the VIP is not on a loopback interface: the backend drops what lb sends",
            format!("ip {v6}addr add {vip}/{plen} dev lo"),
        )
    }];
    if vip.is_ipv4() && mode == Mode::DsrL2 {
        out.push(if arp_ignore_suppresses(b.arp_ignore) && arp_announce_suppresses(b.arp_announce) {
            ok(format!("{vip}: arp"), "ARP for the VIP is suppressed")
        } else {
            problem(
                Level::Fail,
                format!("{vip}: arp"),
                format!(
                    "arp_ignore {} arp_announce {}: the backend answers ARP for the VIP and steals it from lb",
                    b.arp_ignore, b.arp_announce
                ),
                "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
            )
        });
    }
    if matches!(mode, Mode::Ipip | Mode::Gue) {
        out.push(assess_decap(b, vip, mode));
    }
    // IPv4's rp_filter never sees an IPv6 VIP's packets.
    if vip.is_ipv4() && matches!(mode, Mode::Ipip | Mode::Gue) {
        out.push(if !rp_filter_lets_in(b.rp_filter) {
            problem(
                Level::Fail,
                format!("{vip}: rp_filter"),
                "strict rp_filter drops decapsulated packets from clients",
                "sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.tunl0.rp_filter=2",
            )
        } else {
            ok(
                format!("{vip}: rp_filter"),
                format!("rp_filter {}", b.rp_filter),
            )
        });
    }
    out
}

// ---- gathering facts --------------------------------------------------------

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of the sysctl at `path` under `/proc/sys`; 0 when it cannot be
/// read (absent: the kernel's default, or no such interface).
pub fn sysctl(path: &str) -> u32 {
    std::fs::read_to_string(Path::new("/proc/sys").join(path))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// ARP setting `key` as the kernel applies it (the larger of `all`'s and
/// the interface's) on the up Ethernet interfaces of `links` (`ip -j -d
/// link` entries): the first where it is not `enough` (that interface
/// answers ARP for the VIP), else the lowest. `all`'s alone on a host
/// without one.
fn weakest_arp(links: &[Value], key: &str, enough: fn(u32) -> bool) -> u32 {
    let all = sysctl(&format!("net/ipv4/conf/all/{key}"));
    let values: Vec<u32> = links
        .iter()
        .filter(|l| {
            l.get("link_type").and_then(Value::as_str) == Some("ether")
                && l.get("flags")
                    .and_then(Value::as_array)
                    .is_some_and(|f| f.iter().any(|x| x == "UP"))
        })
        .filter_map(|l| l.get("ifname")?.as_str())
        .map(|name| all.max(sysctl(&format!("net/ipv4/conf/{name}/{key}"))))
        .collect();
    // Not monotonic (arp_ignore 3 answers where 2 does not): the lowest
    // could hide a failing one.
    values
        .iter()
        .copied()
        .find(|v| !enough(*v))
        .or_else(|| values.iter().copied().min())
        .unwrap_or(all)
}

/// The name of the XDP program attached to `link` (an `ip -j -d link` entry).
fn attached_program(link: &Value) -> Option<String> {
    let xdp = link.get("xdp")?;
    let prog = xdp
        .get("prog")
        .or_else(|| xdp.get("attached")?.as_array()?.first()?.get("prog"))?;
    Some(prog.get("name")?.as_str().unwrap_or("unnamed").to_string())
}

fn link(name: &str) -> Option<Value> {
    let text = command_output("ip", &["-j", "-d", "link", "show", "dev", name])?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.as_array()?.first().cloned()
}

fn offload(name: &str, feature: &str) -> bool {
    command_output("ethtool", &["-k", name]).is_some_and(|t| {
        t.lines()
            .any(|l| l.trim_start().starts_with(feature) && l.contains(": on"))
    })
}

/// Gathers an interface's facts for `mode`: the daemon's own rules for it
/// ([`dataplane::check_interface`]), and the driver's XDP features as the
/// kernel reports them, which touches nothing. With `probe_native`, also
/// tries attaching lb's program in driver mode for a moment (detached at
/// once; it forwards nothing, having no services) when no program is
/// attached and the daemon's rules allow driver mode: some drivers (ixgbe,
/// i40e) reset the link for it.
pub fn interface_facts(name: &str, mode: XdpModeSetting, probe_native: bool) -> InterfaceFacts {
    let Some(l) = link(name) else {
        return InterfaceFacts {
            name: name.into(),
            ..Default::default()
        };
    };
    let attached = attached_program(&l);
    let rule = |mode| dataplane::check_interface(name, mode).map_err(|e| format!("{e:#}"));
    let refused = rule(daemon::xdp_mode(mode)).err();
    let no_driver_mode = rule(XdpMode::Driver)
        .err()
        .filter(|_| rule(XdpMode::Skb).is_ok());
    let (trial, load_error) =
        if probe_native && attached.is_none() && refused.is_none() && no_driver_mode.is_none() {
            match try_native(name) {
                Ok(native) => (Some(native), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            }
        } else {
            (None, None)
        };
    let xdp_features = std::ffi::CString::new(name)
        .ok()
        // SAFETY: if_nametoindex only reads the NUL-terminated name.
        .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) })
        .filter(|i| *i != 0)
        .map(xdp_features::read);
    let (xdp_features, features_error) = match xdp_features {
        Some(Ok(features)) => (features, None),
        Some(Err(e)) => (None, Some(format!("{e:#}"))),
        None => (None, None),
    };
    InterfaceFacts {
        name: name.into(),
        exists: true,
        driver: command_output("ethtool", &["-i", name]).and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("driver: ").map(str::to_string))
        }),
        attached,
        refused,
        no_driver_mode,
        xdp_features,
        features_error,
        trial,
        load_error,
        lro: offload(name, "large-receive-offload"),
        gro_below: devices_below(name)
            .into_iter()
            .filter(|d| offload(d, "generic-receive-offload"))
            .collect(),
    }
}

/// The devices that receive from the wire under `name`: its lower devices
/// (`/sys/class/net/NAME/lower_*`), theirs, and so on down to those with
/// none; empty for a device with none itself. GRO runs there.
fn devices_below(name: &str) -> Vec<String> {
    let lowers = |dev: &str| -> Vec<String> {
        std::fs::read_dir(format!("/sys/class/net/{dev}"))
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().into_string().ok()?;
                        n.strip_prefix("lower_").map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    let mut todo = lowers(name);
    // The kernel links no device below itself: this ends.
    while let Some(dev) = todo.pop() {
        if out.contains(&dev) {
            continue;
        }
        let below = lowers(&dev);
        if below.is_empty() {
            out.push(dev);
        } else {
            todo.extend(below);
        }
    }
    out.sort();
    out
}

/// The smallest maps the object loads with: the trial attach forwards nothing.
const PROBE_CAPACITY: Capacity = Capacity {
    max_services: 1,
    max_backends: 1,
    conntrack_entries: 64,
    ring_slots: lb_common::limits::RING_CHUNK_SLOTS,
};

/// Whether the driver of `name` takes lb's program in native mode; an
/// error when the program does not load, which says nothing of the driver.
fn try_native(name: &str) -> Result<bool> {
    let mut dp = Dataplane::load(PROBE_CAPACITY)?;
    let prog = dp.program(PROG_LB)?;
    let Ok(id) = prog.attach(name, XdpMode::Driver) else {
        return Ok(false);
    };
    prog.detach(id).context("detaching the trial program")?;
    Ok(true)
}

/// Whether `path` is on a bpf filesystem ([`dataplane::is_bpffs`]); not
/// when that cannot be asked.
fn on_bpffs(path: &Path) -> bool {
    dataplane::is_bpffs(path).unwrap_or(false)
}

/// Gathers the host's facts for pins in `pin_dir`.
pub fn host_facts(pin_dir: &Path) -> HostFacts {
    let near = pin_dir
        .ancestors()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let parent = pin_dir.parent().filter(|p| !p.as_os_str().is_empty());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse().unwrap_or(0));
    let kernel = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let memlock = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0
        && lim.rlim_cur != libc::RLIM_INFINITY
    {
        Some(lim.rlim_cur)
    } else {
        None
    };
    HostFacts {
        pin_dir: pin_dir.display().to_string(),
        bpffs_root: on_bpffs(Path::new(BPFFS_ROOT)),
        pin_fs: (near.display().to_string(), on_bpffs(near)),
        parent_bpffs: parent.filter(|p| p.exists()).map(on_bpffs),
        kernel,
        memlock,
    }
}

/// Gathers a backend host's facts for `vip`.
pub fn backend_facts(vip: IpAddr) -> BackendFacts {
    let family = if vip.is_ipv6() { "-6" } else { "-4" };
    let lo_addrs = command_output("ip", &["-j", family, "addr", "show", "dev", "lo"])
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .unwrap_or(Value::Null);
    let vip_on_lo = lo_addrs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.get("addr_info")?.as_array())
        .flatten()
        .any(|a| a.get("local").and_then(Value::as_str) == Some(&vip.to_string()));
    let links = command_output("ip", &["-j", "-d", "link", "show"])
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .unwrap_or(Value::Null);
    let links = links.as_array().cloned().unwrap_or_default();
    let decap_attached = links
        .iter()
        .any(|l| attached_program(l).as_deref() == Some(PROG_DECAP));
    let tunnel = if vip.is_ipv6() { "ip6tnl0" } else { "tunl0" };
    let kernel_tunnel_up = links.iter().any(|l| {
        l.get("ifname").and_then(Value::as_str) == Some(tunnel)
            && l.get("flags")
                .and_then(Value::as_array)
                .is_some_and(|f| f.iter().any(|x| x == "UP"))
    });
    BackendFacts {
        vip: Some(vip),
        vip_on_lo,
        arp_ignore: weakest_arp(&links, "arp_ignore", arp_ignore_suppresses),
        arp_announce: weakest_arp(&links, "arp_announce", arp_announce_suppresses),
        rp_filter: if vip.is_ipv4() {
            sysctl("net/ipv4/conf/all/rp_filter")
                .max(sysctl(&format!("net/ipv4/conf/{tunnel}/rp_filter")))
        } else {
            0
        },
        decap_attached,
        decap_tables: dataplane::read_pinned(Path::new(DEFAULT_DECAP_PIN_DIR))
            .ok()
            .map(|(tables, _)| tables),
        kernel_tunnel_up,
    }
}

/// What `lb doctor` was asked to check.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Interfaces the load balancer attaches to, and in which mode.
    pub interfaces: Vec<String>,
    /// The configured XDP mode.
    pub xdp_mode: XdpModeSetting,
    /// Where the daemon pins (checks the bpffs mount); only with interfaces.
    pub pin_dir: Option<std::path::PathBuf>,
    /// Try lb's program in driver mode on interfaces without a program
    /// (`--probe-native`): some drivers reset the link for it. Without it
    /// the driver's XDP support is read from the kernel, touching nothing.
    pub probe_native: bool,
    /// VIPs this host serves as a backend, and their services' mode.
    pub backend_vips: Vec<IpAddr>,
    /// Mode of the services the VIPs belong to.
    pub backend_mode: Mode,
    /// The node's announcements, to check BIRD's side of them.
    pub announce: Option<crate::config::Announce>,
}

/// Judges the node side of announcements: BIRD answers, its BGP sessions
/// are up, it learns lb's table and exports every VIP route in it.
pub fn assess_announce(f: &AnnounceFacts) -> Vec<Finding> {
    let (socket, error) = &f.bird;
    if let Some(e) = error {
        return vec![problem(
            Level::Fail,
            "bird",
            format!("BIRD's control socket does not answer: {e}"),
            format!(
                "start BIRD with a configuration like examples/bird-lb-node.conf, or point [announce] bird_socket at it (now {socket})"
            ),
        )];
    }
    let mut out = vec![ok("bird", format!("answers on {socket}"))];
    if f.sessions.is_empty() {
        out.push(problem(
            Level::Fail,
            "bgp",
            "BIRD has no BGP session: nothing carries the VIPs to the routers",
            "add one `protocol bgp` per router (examples/bird-lb-node.conf)",
        ));
    }
    if !f.sessions.is_empty() && !f.sessions.iter().any(crate::bird::Protocol::established) {
        out.push(problem(
            Level::Fail,
            "bgp",
            "no BGP session is established: nothing carries the VIPs to the routers",
            "see each session below",
        ));
    }
    for s in &f.sessions {
        out.push(if s.established() {
            ok(format!("bgp {}", s.name), "established")
        } else {
            problem(
                Level::Warn,
                format!("bgp {}", s.name),
                format!("{} {}", s.state, s.info),
                "check the neighbor's address and AS on both sides, and that TCP 179 passes",
            )
        });
    }
    let check = format!("table {}", f.table);
    if f.vips.is_empty() {
        out.push(problem(
            Level::Warn,
            check,
            "no VIP route in the table yet, so BIRD's side cannot be checked (`lb node status` says why)",
            "run lb doctor again once a VIP is announced",
        ));
        return out;
    }
    let unlearned: Vec<String> = f
        .vips
        .iter()
        .filter(|v| !f.learned.contains(v))
        .map(ToString::to_string)
        .collect();
    if !unlearned.is_empty() {
        out.push(problem(
            Level::Fail,
            check,
            format!("BIRD does not learn lb's routes ({})", unlearned.join(", ")),
            format!(
                "add `protocol kernel {{ kernel table {}; learn; ipv4 {{ import all; export none; }}; }}` (and its ipv6 twin) to BIRD's configuration",
                f.table
            ),
        ));
        return out;
    }
    out.push(ok(
        check.clone(),
        format!("BIRD learns all {} VIP routes", f.vips.len()),
    ));
    for (session, exported) in &f.exported {
        let missing: Vec<String> = f
            .vips
            .iter()
            .filter(|v| !exported.contains(v))
            .map(ToString::to_string)
            .collect();
        out.push(if missing.is_empty() {
            ok(format!("export {session}"), "every VIP route")
        } else {
            problem(
                Level::Fail,
                format!("export {session}"),
                format!("not exported: {}", missing.join(", ")),
                format!(
                    "export lb's kernel protocols in `protocol bgp {session}`: `export where proto = \"lb_vips4\";` in its ipv4 channel, `\"lb_vips6\"` in its ipv6 one (examples/bird-lb-node.conf)"
                ),
            )
        });
    }
    out
}

/// Gathers [`AnnounceFacts`]: lb's routes through netlink, BIRD's view
/// through its control socket.
pub fn announce_facts(a: &crate::config::Announce) -> AnnounceFacts {
    let socket = a.bird_socket.display().to_string();
    let mut facts = AnnounceFacts {
        table: a.table,
        bird: (socket, None),
        ..AnnounceFacts::default()
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            facts.bird.1 = Some(e.to_string());
            return facts;
        }
    };
    rt.block_on(async {
        if let Ok(routes) = crate::routes::VipRoutes::open(a.table) {
            facts.vips = routes
                .list()
                .await
                .unwrap_or_default()
                .into_iter()
                .collect();
        }
        match crate::bird::bgp_sessions(&a.bird_socket).await {
            Ok(s) => facts.sessions = s,
            Err(e) => {
                facts.bird.1 = Some(format!("{e:#}"));
                return;
            }
        }
        for vip in &facts.vips {
            let reply = crate::bird::command(&a.bird_socket, &format!("show route for {vip}"))
                .await
                .unwrap_or_default();
            if reply.iter().any(|(_, line)| line.contains("blackhole")) {
                facts.learned.push(*vip);
            }
        }
        for s in facts.sessions.iter().filter(|s| s.established()) {
            let reply =
                // Quoted: BIRD's names may hold '-', '.' or ':' quoted,
                // which its replies print bare.
                crate::bird::command(&a.bird_socket, &format!("show route export '{}'", s.name))
                    .await
                    .unwrap_or_default();
            let exported = facts
                .vips
                .iter()
                .copied()
                .filter(|v| {
                    let host = format!("{v}/{}", if v.is_ipv4() { 32 } else { 128 });
                    reply.iter().any(|(_, line)| line.starts_with(&host))
                })
                .collect();
            facts.exported.push((s.name.clone(), exported));
        }
    });
    facts
}

/// Runs every check asked for.
pub fn check(r: &Request) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(pins) = &r.pin_dir {
        out.extend(assess_host(&host_facts(pins)));
    }
    for i in &r.interfaces {
        // A trial attach only when asked: in driver mode it resets the
        // link on some drivers (ixgbe, i40e), a live NIC's included.
        out.extend(assess_interface(
            &interface_facts(i, r.xdp_mode, r.probe_native),
            r.xdp_mode,
        ));
    }
    for vip in &r.backend_vips {
        out.extend(assess_backend(&backend_facts(*vip), r.backend_mode));
    }
    if let Some(a) = &r.announce {
        out.extend(assess_announce(&announce_facts(a)));
    }
    out
}

/// Renders findings as a table with each fix under its problem.
pub fn render(findings: &[Finding]) -> String {
    let width = findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
    let mut out = String::new();
    for f in findings {
        let tag = match f.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        out += &format!("{tag}  {:<width$}  {}\n", f.check, f.detail);
        if let Some(fix) = &f.fix {
            out += &format!("      {:<width$}  fix: {fix}\n", "");
        }
    }
    out
}

#[cfg(test)]
mod announce_tests {
    use super::*;
    use crate::bird::Protocol;

    fn session(info: &str) -> Protocol {
        Protocol {
            name: "upstream".into(),
            proto: "BGP".into(),
            state: if info == "Established" { "up" } else { "start" }.into(),
            info: info.into(),
        }
    }

    fn levels(f: &[Finding]) -> Vec<Level> {
        f.iter().map(|f| f.level).collect()
    }

    #[test]
    fn each_broken_link_of_the_announcement_chain_is_named_with_its_fix() {
        let vip: IpAddr = "198.18.1.1".parse().unwrap();
        let good = AnnounceFacts {
            table: 100,
            bird: ("/run/bird/bird.ctl".into(), None),
            sessions: vec![session("Established")],
            vips: vec![vip],
            learned: vec![vip],
            exported: vec![("upstream".into(), vec![vip])],
        };
        assert!(assess_announce(&good).iter().all(|f| f.level == Level::Ok));
        let down = AnnounceFacts {
            bird: ("/x".into(), Some("connection refused".into())),
            ..good.clone()
        };
        assert_eq!(levels(&assess_announce(&down)), [Level::Fail]);
        let unlearned = AnnounceFacts {
            learned: vec![],
            ..good.clone()
        };
        let f = assess_announce(&unlearned);
        assert_eq!(f.last().unwrap().level, Level::Fail);
        assert!(
            f.last()
                .unwrap()
                .fix
                .as_ref()
                .unwrap()
                .contains("kernel table 100")
        );
        let unexported = AnnounceFacts {
            exported: vec![("upstream".into(), vec![])],
            ..good.clone()
        };
        assert_eq!(
            assess_announce(&unexported).last().unwrap().level,
            Level::Fail
        );
        // No session up: nothing reaches the routers, whatever else holds.
        let idle = AnnounceFacts {
            sessions: vec![session("Active")],
            exported: vec![],
            ..good.clone()
        };
        let f = levels(&assess_announce(&idle));
        assert!(
            f.contains(&Level::Warn) && f.contains(&Level::Fail),
            "{f:?}"
        );
        // One of two up: the other is warned of, the announcement holds.
        let one_up = AnnounceFacts {
            sessions: vec![session("Active"), session("Established")],
            ..good
        };
        let f = levels(&assess_announce(&one_up));
        assert!(
            f.contains(&Level::Warn) && !f.contains(&Level::Fail),
            "{f:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface() -> InterfaceFacts {
        InterfaceFacts {
            name: "eth0".into(),
            exists: true,
            driver: Some("ixgbe".into()),
            attached: None,
            refused: None,
            no_driver_mode: None,
            // BASIC, REDIRECT, NDO_XMIT: as ixgbe reports them.
            xdp_features: Some(NETDEV_XDP_ACT_BASIC | 0b110),
            features_error: None,
            trial: None,
            load_error: None,
            lro: false,
            gro_below: Vec::new(),
        }
    }

    fn levels(f: &[Finding]) -> Vec<Level> {
        f.iter().map(|f| f.level).collect()
    }

    #[test]
    fn a_good_interface_passes_and_each_problem_names_its_fix() {
        assert_eq!(
            levels(&assess_interface(&iface(), XdpModeSetting::Auto)),
            [Level::Ok]
        );
        let missing = InterfaceFacts {
            exists: false,
            ..iface()
        };
        assert_eq!(
            levels(&assess_interface(&missing, XdpModeSetting::Auto)),
            [Level::Fail]
        );
        let lro = InterfaceFacts {
            lro: true,
            ..iface()
        };
        let f = assess_interface(&lro, XdpModeSetting::Auto);
        assert_eq!(f[1].fix.as_deref(), Some("ethtool -K eth0 lro off"));
        // GRO below the interface only matters in generic mode (on the
        // interface itself the kernel skips it then).
        let gro = InterfaceFacts {
            gro_below: vec!["eth1".into()],
            ..iface()
        };
        assert_eq!(assess_interface(&gro, XdpModeSetting::Auto).len(), 1);
        let f = assess_interface(&gro, XdpModeSetting::Generic);
        assert_eq!(levels(&f), [Level::Warn, Level::Warn]);
        assert_eq!(f[1].check, "eth1: gro");
        assert_eq!(f[1].fix.as_deref(), Some("ethtool -K eth1 gro off"));
        // No native XDP, as the kernel reports it or as a trial found.
        for no_native in [
            InterfaceFacts {
                xdp_features: Some(0),
                ..iface()
            },
            InterfaceFacts {
                trial: Some(false),
                ..iface()
            },
        ] {
            assert_eq!(
                levels(&assess_interface(&no_native, XdpModeSetting::Native)),
                [Level::Fail]
            );
            assert_eq!(
                levels(&assess_interface(&no_native, XdpModeSetting::Auto)),
                [Level::Warn]
            );
            // Generic then: GRO matters.
            let gro = InterfaceFacts {
                gro_below: vec!["eth1".into()],
                ..no_native
            };
            assert_eq!(
                levels(&assess_interface(&gro, XdpModeSetting::Auto)),
                [Level::Warn, Level::Warn]
            );
        }
        // The features say whether native XDP is there, in generic mode too.
        let f = assess_interface(&iface(), XdpModeSetting::Generic);
        assert_eq!(levels(&f), [Level::Warn]);
        assert!(f[0].detail.contains("xdp_features"), "{f:?}");
        let other = InterfaceFacts {
            attached: Some("xdp_firewall".into()),
            ..iface()
        };
        assert_eq!(
            levels(&assess_interface(&other, XdpModeSetting::Auto)),
            [Level::Fail]
        );
    }

    #[test]
    fn a_program_that_does_not_load_fails_apart_from_the_driver() {
        for xdp_features in [None, Some(NETDEV_XDP_ACT_BASIC)] {
            let unloaded = InterfaceFacts {
                xdp_features,
                trial: None,
                load_error: Some("loading the program: Operation not permitted".into()),
                gro_below: vec!["eth1".into()],
                ..iface()
            };
            for mode in [XdpModeSetting::Auto, XdpModeSetting::Native] {
                let f = assess_interface(&unloaded, mode);
                // Failed, with the error, and no GRO warning: the driver's
                // mode is unknown or native, not generic.
                assert_eq!(levels(&f), [Level::Fail]);
                assert!(f[0].detail.contains("Operation not permitted"), "{f:?}");
                assert!(!f[0].detail.contains("no native XDP"), "{f:?}");
            }
        }
    }

    #[test]
    fn a_veth_is_fine_in_generic_mode_only() {
        let veth = InterfaceFacts {
            driver: Some(VETH.into()),
            ..iface()
        };
        assert_eq!(
            levels(&assess_interface(&veth, XdpModeSetting::Generic)),
            [Level::Ok]
        );
        for mode in [XdpModeSetting::Auto, XdpModeSetting::Native] {
            let f = assess_interface(&veth, mode);
            assert_eq!(levels(&f), [Level::Warn]);
            assert!(
                f[0].fix
                    .as_deref()
                    .unwrap()
                    .contains("xdp_mode = \"generic\"")
            );
        }
    }

    #[test]
    fn a_driver_whose_xdp_is_unknown_is_not_probed_unless_asked() {
        // A kernel before 6.3 reports no features, and without
        // --probe-native nothing was attached to find out.
        let unknown = InterfaceFacts {
            xdp_features: None,
            gro_below: vec!["eth1".into()],
            ..iface()
        };
        for mode in [XdpModeSetting::Auto, XdpModeSetting::Native] {
            let f = assess_interface(&unknown, mode);
            // Said, with how to find out, and no GRO warning: the mode is
            // unknown, not generic.
            assert_eq!(levels(&f), [Level::Warn], "{f:?}");
            assert!(f[0].detail.contains("not probed"), "{f:?}");
            let fix = f[0].fix.as_deref().unwrap();
            assert!(
                fix.contains("--probe-native") && fix.contains("reset the link"),
                "{fix}"
            );
        }
        let f = assess_interface(&unknown, XdpModeSetting::Generic);
        assert_eq!(levels(&f), [Level::Ok, Level::Warn], "{f:?}");
        // Features that could not be read say why, not that the kernel is
        // too old.
        let unread = InterfaceFacts {
            features_error: Some("Operation not permitted".into()),
            ..unknown.clone()
        };
        let f = assess_interface(&unread, XdpModeSetting::Auto);
        assert!(
            f[0].detail
                .contains("xdp_features failed: Operation not permitted"),
            "{f:?}"
        );
        // A trial, when asked for, answers it.
        let tried = InterfaceFacts {
            trial: Some(true),
            ..unknown
        };
        let f = assess_interface(&tried, XdpModeSetting::Auto);
        assert_eq!(levels(&f), [Level::Ok], "{f:?}");
        assert!(f[0].detail.contains("trial attach"), "{f:?}");
        // An interface with a program: judged by it, whatever is known.
        let attached = InterfaceFacts {
            attached: Some(PROG_LB.into()),
            xdp_features: None,
            ..iface()
        };
        assert_eq!(
            levels(&assess_interface(&attached, XdpModeSetting::Auto)),
            [Level::Ok]
        );
    }

    /// The reason `dataplane::check_interface` gives for a bond in driver
    /// mode.
    const BOND: &str = "bond0 is a bond: in driver mode its slaves run the program, on frames \
                        lb does not take for the bond's; use xdp_mode = \"generic\" (or \"auto\", \
                        which is generic on a bond)";

    #[test]
    fn a_bond_is_judged_in_the_mode_the_daemon_attaches_it_in() {
        // The bond reports its slaves' native XDP, but the daemon keeps
        // driver mode off it: generic in auto, refused in native.
        let bond = InterfaceFacts {
            name: "bond0".into(),
            driver: Some("bonding".into()),
            no_driver_mode: Some(BOND.into()),
            gro_below: vec!["eth1".into()],
            ..iface()
        };
        for mode in [XdpModeSetting::Auto, XdpModeSetting::Generic] {
            let f = assess_interface(&bond, mode);
            // Generic, so GRO is warned of; no "generic is configured but
            // native is there".
            assert_eq!(levels(&f), [Level::Ok, Level::Warn], "{mode:?}: {f:?}");
            assert!(f[0].detail.starts_with("generic"), "{f:?}");
            assert_eq!(f[1].check, "eth1: gro");
        }
        let native = InterfaceFacts {
            refused: Some(BOND.into()),
            ..bond
        };
        let f = assess_interface(&native, XdpModeSetting::Native);
        assert_eq!(levels(&f), [Level::Fail], "{f:?}");
        assert!(f[0].detail.contains("is a bond"), "{f:?}");
        assert_eq!(
            f[0].fix.as_deref(),
            Some("set xdp_mode = \"auto\" or \"generic\" in [settings]")
        );
    }

    #[test]
    fn an_interface_the_daemon_refuses_fails() {
        // lo is no Ethernet interface: the daemon's rule refuses it, in
        // every mode, where doctor used to find nothing wrong.
        if link("lo").is_none() {
            return; // no `ip` here
        }
        for mode in [
            XdpModeSetting::Auto,
            XdpModeSetting::Native,
            XdpModeSetting::Generic,
        ] {
            let facts = interface_facts("lo", mode, false);
            assert!(facts.exists);
            assert_eq!(facts.trial, None);
            assert_eq!(facts.no_driver_mode, None);
            let f = assess_interface(&facts, mode);
            assert_eq!(f[0].level, Level::Fail, "{f:?}");
            assert!(f[0].detail.contains("not an Ethernet interface"), "{f:?}");
        }
    }

    #[test]
    fn bpffs_is_judged_where_the_daemon_pins() {
        let good = HostFacts {
            pin_dir: DEFAULT_PIN_DIR.into(),
            bpffs_root: true,
            pin_fs: ("/sys/fs/bpf".into(), true),
            parent_bpffs: Some(true),
            kernel: (6, 1),
            memlock: Some(8 << 20),
        };
        let f = assess_host(&good);
        assert_eq!(levels(&f), [Level::Ok, Level::Ok]);
        assert!(
            f[0].detail.contains("lb daemon makes /sys/fs/bpf/lb"),
            "{f:?}"
        );
        // A pin directory deeper in /sys/fs/bpf needs no bpffs of its own
        // (one there would hide the pins already in it).
        let deep = HostFacts {
            pin_dir: "/sys/fs/bpf/prod/lb".into(),
            pin_fs: ("/sys/fs/bpf/prod/lb".into(), true),
            ..good.clone()
        };
        assert_eq!(levels(&assess_host(&deep)), [Level::Ok, Level::Ok]);
        let unmade = HostFacts {
            pin_fs: ("/sys/fs/bpf".into(), true),
            parent_bpffs: None,
            ..deep.clone()
        };
        assert_eq!(levels(&assess_host(&unmade)), [Level::Ok, Level::Ok]);
        // Nothing on /sys/fs/bpf: the daemon mounts it there, not deeper.
        let old = HostFacts {
            bpffs_root: false,
            pin_fs: ("/sys/fs/bpf".into(), false),
            parent_bpffs: None,
            kernel: (5, 4),
            ..deep.clone()
        };
        let f = assess_host(&old);
        assert_eq!(levels(&f), [Level::Warn, Level::Fail]);
        assert_eq!(f[0].fix.as_deref(), Some("mount -t bpf bpf /sys/fs/bpf"));
        // Another filesystem on /sys/fs/bpf/prod: pins there fail.
        let other = HostFacts {
            pin_fs: ("/sys/fs/bpf/prod".into(), false),
            ..deep
        };
        let f = assess_host(&other);
        assert_eq!(f[0].level, Level::Fail);
        assert!(f[0].fix.as_deref().unwrap().starts_with("findmnt"), "{f:?}");
        // Outside /sys/fs/bpf, the daemon refuses a parent not on bpffs...
        let outside = HostFacts {
            pin_dir: "/run/lb/pins".into(),
            pin_fs: ("/run/lb".into(), false),
            parent_bpffs: Some(false),
            ..good.clone()
        };
        let f = assess_host(&outside);
        assert_eq!(f[0].level, Level::Fail);
        assert!(f[0].detail.contains("refuses"), "{f:?}");
        // ...even where the pin directory is a bpffs itself...
        let mounted = HostFacts {
            pin_fs: ("/run/lb/pins".into(), true),
            ..outside.clone()
        };
        assert_eq!(assess_host(&mounted)[0].level, Level::Fail);
        // ...and takes one that is (the demo's private bpffs).
        let private = HostFacts {
            pin_fs: ("/run/lb".into(), true),
            parent_bpffs: Some(true),
            ..outside
        };
        assert_eq!(assess_host(&private)[0].level, Level::Ok);
    }

    #[test]
    fn host_facts_find_the_nearest_existing_directory() {
        let h = host_facts(Path::new("/nonexistent-lb-doctor/prod/lb"));
        assert_eq!(h.pin_fs.0, "/");
        assert_eq!(h.parent_bpffs, None);
        let h = host_facts(Path::new("/proc/lb"));
        assert_eq!(h.pin_fs, ("/proc".into(), false));
        assert_eq!(h.parent_bpffs, Some(false));
    }

    #[test]
    fn backend_checks_per_mode() {
        let vip: IpAddr = "198.18.1.1".parse().unwrap();
        let good = BackendFacts {
            vip: Some(vip),
            vip_on_lo: true,
            arp_ignore: 1,
            arp_announce: 2,
            rp_filter: 0,
            decap_attached: true,
            decap_tables: Some(DecapTables {
                sources: [("198.18.0.0".parse().unwrap(), 24)].into(),
                vips: [vip].into(),
                ..Default::default()
            }),
            kernel_tunnel_up: false,
        };
        assert_eq!(
            levels(&assess_backend(&good, Mode::DsrL2)),
            [Level::Ok, Level::Ok]
        );
        assert_eq!(
            levels(&assess_backend(&good, Mode::Ipip)),
            [Level::Ok, Level::Ok, Level::Ok]
        );
        let other_vip = BackendFacts {
            decap_tables: Some(DecapTables {
                vips: ["198.18.1.2".parse().unwrap()].into(),
                ..good.decap_tables.clone().unwrap()
            }),
            ..good.clone()
        };
        let f = assess_backend(&other_vip, Mode::Ipip);
        assert_eq!(levels(&f), [Level::Ok, Level::Fail, Level::Ok]);
        assert!(f[1].fix.as_deref().unwrap().contains("lb decap apply"));
        let kernel = BackendFacts {
            decap_attached: false,
            decap_tables: None,
            kernel_tunnel_up: true,
            ..good.clone()
        };
        assert_eq!(
            levels(&assess_backend(&kernel, Mode::Ipip)),
            [Level::Ok, Level::Warn, Level::Ok]
        );
        let bare = BackendFacts {
            vip: Some(vip),
            rp_filter: 1,
            ..Default::default()
        };
        let f = assess_backend(&bare, Mode::DsrL2);
        assert_eq!(levels(&f), [Level::Fail, Level::Fail]);
        assert_eq!(
            f[0].fix.as_deref(),
            Some("ip addr add 198.18.1.1/32 dev lo")
        );
        let f = assess_backend(&bare, Mode::Ipip);
        assert_eq!(levels(&f), [Level::Fail, Level::Fail, Level::Fail]);
        assert_eq!(
            f[1].fix.as_deref(),
            Some(
                "add 198.18.1.1 to vips in /etc/lb/decap.toml, then: lb decap apply   \
                 # see docs/decap.md"
            )
        );
    }

    #[test]
    fn ipv4_rp_filter_is_not_judged_for_an_ipv6_vip() {
        let vip: IpAddr = "2001:db8::1".parse().unwrap();
        let strict = BackendFacts {
            vip: Some(vip),
            vip_on_lo: true,
            rp_filter: 1,
            kernel_tunnel_up: true,
            ..Default::default()
        };
        for mode in [Mode::Ipip, Mode::Gue] {
            let f = assess_backend(&strict, mode);
            assert!(f.iter().all(|f| !f.check.ends_with(": rp_filter")), "{f:?}");
        }
        let v4 = BackendFacts {
            vip: Some("198.18.1.1".parse().unwrap()),
            ..strict
        };
        let f = assess_backend(&v4, Mode::Ipip);
        assert_eq!(f.last().unwrap().check, "198.18.1.1: rp_filter");
        assert_eq!(f.last().unwrap().level, Level::Fail);
    }

    #[test]
    fn only_arp_settings_the_kernel_obeys_for_a_vip_on_lo_pass() {
        let facts = |arp_ignore, arp_announce| BackendFacts {
            vip: Some("198.18.1.1".parse().unwrap()),
            vip_on_lo: true,
            arp_ignore,
            arp_announce,
            ..Default::default()
        };
        for (ignore, announce, level) in [
            (1, 2, Level::Ok),
            (2, 2, Level::Ok),
            (8, 2, Level::Ok),
            (0, 2, Level::Fail),
            // 3 still answers for a global-scope VIP; 4-7 answer all.
            (3, 2, Level::Fail),
            (5, 2, Level::Fail),
            (1, 1, Level::Fail),
            // Above 2 the kernel announces as with 0.
            (1, 3, Level::Fail),
        ] {
            let f = assess_backend(&facts(ignore, announce), Mode::DsrL2);
            assert_eq!(
                f[1].level, level,
                "arp_ignore {ignore} arp_announce {announce}"
            );
        }
    }

    #[test]
    fn reads_the_attached_program_from_ip_json() {
        let single: Value = serde_json::from_str(
            r#"{"ifname":"eth0","xdp":{"mode":2,"prog":{"id":7,"name":"lb_xdp"}}}"#,
        )
        .unwrap();
        assert_eq!(attached_program(&single).as_deref(), Some("lb_xdp"));
        let multi: Value = serde_json::from_str(
            r#"{"xdp":{"attached":[{"mode":1,"prog":{"id":9,"name":"lb_decap"}}]}}"#,
        )
        .unwrap();
        assert_eq!(attached_program(&multi).as_deref(), Some("lb_decap"));
        assert_eq!(attached_program(&serde_json::json!({"ifname":"lo"})), None);
    }
}
