//! A loaded data plane for packet tests: services, backends, and one frame at
//! a time through a program with BPF_PROG_TEST_RUN.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, Map, MapData, MapInfo},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb::{
    dataplane::{Capacity, Dataplane, Prefix, read_interface},
    maglev::{self, Candidate},
    netns::Netns,
};
use lb_common::{
    AddrKey, BACKEND_F_UP, BackendValue, Counter, Interface, ServiceKey, Settings, addr_bytes,
    limits::{DEFAULT_GUE_PORT, NO_BACKEND},
    maps::PROG_LB,
    wire::{ETH_P_IP, IPPROTO_TCP},
};

use crate::packet::{self, Ipv4, Mac};

/// XDP actions (enum xdp_action, include/uapi/linux/bpf.h).
pub const DROP: u32 = 1;
/// XDP_PASS.
pub const PASS: u32 = 2;
/// XDP_TX.
pub const TX: u32 = 3;
/// XDP_REDIRECT.
pub const REDIRECT: u32 = 4;

/// MAC of the load balancer's interface (frames to the LB are sent to it).
pub const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
/// MAC of the client's next hop (the router in front of the LB).
pub const ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];
/// A TCP segment without payload from `src`:`sport` to `dst`:`dport`
/// with `flags`, in an IPv4 frame from the router to the load balancer.
pub fn tcp4_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let (s, d) = (IpAddr::from(src), IpAddr::from(dst));
    let seg = packet::tcp(s, d, sport, dport, flags, b"");
    let ip = Ipv4::new(src, dst, IPPROTO_TCP).build(&seg);
    packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &ip)
}

/// The MTU the lab configures, as the receiving interface's and as the cap.
pub const MTU: u32 = 1500;
/// The index of the interface BPF_PROG_TEST_RUN delivers frames on without
/// a context: the loopback device's, 1 in every network namespace.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// The receiving interface as the lab registers it: frames sent to
/// [`LB_MAC`] are the load balancer's. It has no port (it is not in the
/// device map): backends with port 0 are behind it.
pub fn lab_interface(mtu: u32) -> Interface {
    Interface {
        ifindex: TEST_RUN_IFINDEX,
        mtu,
        mac: LB_MAC,
        port: 0,
        _pad: 0,
    }
}

/// The port of the lab's second interface ([`Lab::add_segment`]).
pub const SEGMENT_PORT: u8 = 2;
/// A port no interface has: backends behind it cannot be reached.
pub const NO_SUCH_PORT: u8 = 3;
/// The second interface's MAC.
pub const SEGMENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
/// The second interface's MTU, below the receiving one's.
pub const SEGMENT_MTU: u32 = 1400;

/// A second interface the load balancer is attached to, for frames to
/// backends behind it (redirected): one end of a veth pair in a namespace
/// of its own, since the device map holds only devices that exist. It lives as
/// long as this.
pub struct Segment {
    /// The interface as registered.
    pub iface: Interface,
    ns: Netns,
}

/// The device a [`Segment`] is.
const SEGMENT_DEVICE: &str = "seg0";

impl Segment {
    /// Removes the device (the kernel takes it out of the device map
    /// before this returns).
    pub fn remove_device(&self) -> Result<()> {
        self.ns.ip(&["link", "del", SEGMENT_DEVICE])
    }
}
/// Outer IPv4 source prefix for `ipip`: 198.18.255.0/24, low byte from the hash.
pub const TUNNEL_SRC_V4: [u8; 4] = [198, 18, 255, 0];
/// Hash bits of the IPv4 tunnel source.
pub const TUNNEL_SRC_V4_MASK: u32 = 0xff;
/// Outer IPv6 source prefix: 2001:2:ff::/112, low 16 bits from the hash.
pub const TUNNEL_SRC_V6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// Hash bits of the IPv6 tunnel source.
pub const TUNNEL_SRC_V6_MASK: u32 = 0xffff;

/// The lab's tunnel source prefixes, as a decapsulator accepts them.
pub fn tunnel_sources() -> std::collections::BTreeSet<Prefix> {
    [
        (IpAddr::from(TUNNEL_SRC_V4), 24),
        (IpAddr::from(TUNNEL_SRC_V6), 112),
    ]
    .into()
}

/// The MAC the lab gives backend `id`: unique, so an output frame names its backend.
pub fn backend_mac(id: u32) -> Mac {
    let b = id.to_be_bytes();
    [0x02, 0xbe, b[0], b[1], b[2], b[3]]
}

/// The backend id a MAC from [`backend_mac`] names.
pub fn backend_of_mac(mac: &[u8]) -> u32 {
    u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
}

/// The outcome of one test run.
#[derive(Debug)]
pub struct Verdict {
    /// The XDP action.
    pub action: u32,
    /// The frame as the program left it.
    pub out: Vec<u8>,
}

/// Runs `frame` through `prog` once.
pub fn test_run(prog: &mut Xdp, frame: &[u8]) -> Result<Verdict> {
    test_run_repeated(prog, frame, 1)
}

/// Runs `frame` through `prog` `repeat` times in one BPF_PROG_TEST_RUN; the
/// verdict is the last run's. Each run sees the previous one's output, so
/// only a frame the program passes or drops untouched means the same
/// packet `repeat` times.
pub fn test_run_repeated(prog: &mut Xdp, frame: &[u8], repeat: u32) -> Result<Verdict> {
    // Room for what the program may add in front (encapsulation).
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let result = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok(Verdict {
        action: result.return_value,
        out,
    })
}

/// Runs `frame` once through the program `prog` (an fd of it, so that
/// another thread can run it while the [`Lab`] that loaded it is changed).
pub fn test_run_fd(prog: BorrowedFd<'_>, frame: &[u8]) -> Result<Verdict> {
    /// `enum bpf_cmd`'s `BPF_PROG_TEST_RUN`.
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    /// The test-run part of `union bpf_attr` (linux/bpf.h), up to
    /// `duration`: the kernel accepts an attribute shorter than its own.
    #[repr(C)]
    #[derive(Default)]
    struct TestRunAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
    }
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: u32::try_from(frame.len())?,
        data_size_out: u32::try_from(out.len())?,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` points at `frame` and `out`, which outlive the call,
    // with their lengths; the kernel writes at most `data_size_out` bytes
    // into `out`, and the results into `attr`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            size_of::<TestRunAttr>() as u32,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_TEST_RUN");
    }
    out.truncate(attr.data_size_out as usize);
    Ok(Verdict {
        action: attr.retval,
        out,
    })
}

/// A data plane loaded for tests.
pub struct Lab {
    /// The data plane under test.
    pub dp: Dataplane,
    /// Slots of the tables [`Lab::service`] builds.
    pub ring_size: u32,
}

/// The settings every lab runs with.
pub fn lab_settings() -> Settings {
    Settings {
        mtu: MTU,
        tunnel_src_v4: TUNNEL_SRC_V4,
        tunnel_src_v4_hash_mask: TUNNEL_SRC_V4_MASK,
        tunnel_src_v6: TUNNEL_SRC_V6,
        tunnel_src_v6_hash_mask: TUNNEL_SRC_V6_MASK,
        gue_port: DEFAULT_GUE_PORT.to_be(),
        _pad: [0; 2],
    }
}

/// Small capacities keep each lab's maps a few MiB; room for tables of
/// `ring_size` slots.
pub fn lab_capacity(ring_size: u32) -> Capacity {
    const MAX_SERVICES: u32 = 16;
    Capacity {
        max_services: MAX_SERVICES,
        max_backends: 256,
        conntrack_entries: 65_536,
        ring_slots: (MAX_SERVICES + 1) * ring_size,
    }
}

impl Lab {
    /// Loads the object with a table of `ring_size` slots and lab settings.
    pub fn new(ring_size: u32) -> Result<Lab> {
        Lab::with_capacity(lab_capacity(ring_size), ring_size)
    }

    /// Loads the object with `capacity` (for labs that need more services
    /// or backends than [`lab_capacity`] gives), tables of `ring_size`
    /// slots and lab settings.
    pub fn with_capacity(capacity: Capacity, ring_size: u32) -> Result<Lab> {
        let mut dp = Dataplane::load(capacity)?;
        dp.set_settings(lab_settings())?;
        dp.set_interface(&lab_interface(MTU))?;
        Ok(Lab { dp, ring_size })
    }

    /// Registers a second interface ([`Segment`]) with port
    /// [`SEGMENT_PORT`], MAC [`SEGMENT_MAC`] and MTU [`SEGMENT_MTU`].
    pub fn add_segment(&mut self) -> Result<Segment> {
        let ns = Netns::new("seg")?;
        let mac = lb::netns::mac_string(&SEGMENT_MAC);
        let mtu = SEGMENT_MTU.to_string();
        ns.ip(&[
            "link",
            "add",
            SEGMENT_DEVICE,
            "address",
            &mac,
            "mtu",
            &mtu,
            "type",
            "veth",
        ])?;
        ns.ip(&["link", "set", SEGMENT_DEVICE, "up"])?;
        let dp = &mut self.dp;
        let iface = ns.run(|| {
            let iface = Interface {
                port: SEGMENT_PORT,
                ..read_interface(SEGMENT_DEVICE)?
            };
            dp.set_interface(&iface)?;
            Ok(iface)
        })?;
        Ok(Segment { iface, ns })
    }

    /// Rewrites backend `id` to leave by the interface with port `port`.
    pub fn route_backend(&mut self, id: u32, port: u8) -> Result<()> {
        let b = self.dp.backend(id)?;
        self.dp.set_backend(id, &b.with_port(port))
    }

    /// Writes backend `id` at `ip` with the MAC [`backend_mac`] gives it, up
    /// or not, with generation `generation`.
    pub fn backend(&mut self, id: u32, ip: IpAddr, up: bool, generation: u32) -> Result<()> {
        self.backend_at(id, ip, backend_mac(id), up, generation)
    }

    /// Writes backend `id` at `ip` reached through `mac`.
    pub fn backend_at(
        &mut self,
        id: u32,
        ip: IpAddr,
        mac: Mac,
        up: bool,
        generation: u32,
    ) -> Result<()> {
        let (addr, family) = addr_bytes(ip);
        self.dp.set_backend(
            id,
            &BackendValue {
                addr,
                mac,
                family,
                flags: if up { BACKEND_F_UP } else { 0 },
                generation,
                seal: 0,
            },
        )
    }

    /// Builds the Maglev table of `members` (backend id, weight) from the
    /// backends' addresses and publishes the service. Returns the table.
    pub fn service(
        &mut self,
        id: u32,
        key: ServiceKey,
        flags: u32,
        members: &[(u32, u32)],
    ) -> Result<Vec<u32>> {
        let addrs: Vec<AddrKey> = members
            .iter()
            .map(|&(b, _)| {
                let v = self.dp.backend(b)?;
                Ok(AddrKey::from_bytes(v.addr, v.family))
            })
            .collect::<Result<_>>()?;
        let keys: Vec<Vec<u8>> = addrs
            .iter()
            .map(|a| [&a.addr[..], &[a.family]].concat())
            .collect();
        let candidates: Vec<Candidate<'_>> = keys
            .iter()
            .zip(members)
            .map(|(k, &(_, weight))| Candidate { key: k, weight })
            .collect();
        let ring: Vec<u32> = maglev::build(&candidates, self.ring_size)?
            .into_iter()
            .map(|slot| slot.map_or(NO_BACKEND, |i| members[i as usize].0))
            .collect();
        self.dp.publish_service(&key, id, flags, 0, &ring)?;
        Ok(ring)
    }

    /// Runs `frame` through program `prog` once.
    pub fn run(&mut self, prog: &str, frame: &[u8]) -> Result<Verdict> {
        test_run(self.dp.program(prog)?, frame)
    }

    /// A second handle on the array map `name` of the load balancer's
    /// program, for a thread that writes it while this one runs packets.
    pub fn array_handle<V: aya::Pod>(&mut self, name: &str) -> Result<Array<MapData, V>> {
        let ids = self
            .dp
            .program(PROG_LB)?
            .info()?
            .map_ids()?
            .unwrap_or_default();
        // The kernel keeps the first 15 bytes of a map's name.
        let short = &name[..name.len().min(15)];
        let id = ids
            .into_iter()
            .find(|id| MapInfo::from_id(*id).is_ok_and(|i| i.name_as_str() == Some(short)))
            .with_context(|| format!("map {name} is not the program's"))?;
        Ok(Array::try_from(Map::Array(MapData::from_id(id)?))?)
    }

    /// The global counter `c`.
    pub fn counter(&self, c: Counter) -> Result<u64> {
        Ok(self
            .dp
            .counters()?
            .into_iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| v))
    }

    /// All global counters summed.
    pub fn counter_total(&self) -> Result<u64> {
        Ok(self.dp.counters()?.iter().map(|(_, v)| v).sum())
    }
}

/// A service key for `vip`:`port`/`proto`.
pub fn service_key(vip: IpAddr, port: u16, proto: u8) -> ServiceKey {
    let (addr, family) = addr_bytes(vip);
    ServiceKey {
        addr,
        port: port.to_be(),
        proto,
        family,
    }
}
