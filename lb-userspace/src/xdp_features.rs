//! The XDP features a NIC's driver declares, as the kernel reports them
//! through the `netdev` generic netlink family (`NETDEV_CMD_DEV_GET`, its
//! `NETDEV_A_DEV_XDP_FEATURES` attribute; Linux 6.3 and later).
//!
//! The read is passive: a query that needs no privilege and touches
//! nothing. The other way to learn whether a driver runs XDP natively, a
//! trial attach in driver mode, makes some drivers (ixgbe, i40e) reset the
//! link, which `lb doctor` must not do to a host carrying traffic.

use std::fmt::Debug;

use anyhow::{Context as _, Result, bail};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use rtnetlink::{
    packet_core::{Emitable, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload, ParseableParametrized},
    sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC},
};

use self::netdev::Dev;

/// `NETDEV_XDP_ACT_BASIC` (include/uapi/linux/netdev.h): the driver runs
/// XDP programs itself (XDP_PASS, XDP_DROP, XDP_TX): native mode.
pub const NETDEV_XDP_ACT_BASIC: u64 = 1;

/// The XDP features of interface `ifindex` as its driver declares them
/// (`NETDEV_XDP_ACT_*` bits); `None` on a kernel without the `netdev`
/// family (before 6.3). Needs no privilege, touches nothing.
pub fn read(ifindex: u32) -> Result<Option<u64>> {
    let mut socket = Socket::new(NETLINK_GENERIC).context("opening a generic netlink socket")?;
    socket.bind_auto().context("binding a netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting a netlink socket")?;
    let lookup = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(Dev::family_name().into())],
    });
    let family = match ask(&socket, lookup) {
        Ok(ctrl) => family_id(&ctrl).context("no id in the netdev family's lookup")?,
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
                == Some(libc::ENOENT) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e.context("looking up the netdev family")),
    };
    let mut query = GenlMessage::from_payload(Dev::get(ifindex));
    query.set_resolved_family_id(family);
    let dev = ask(&socket, query).context("asking for the device's XDP features")?;
    if dev.attrs.is_empty() {
        bail!("an empty answer for device {ifindex}");
    }
    Ok(dev.xdp_features())
}

/// The family id in the controller's answer to a family lookup.
fn family_id(ctrl: &GenlCtrl) -> Option<u16> {
    ctrl.nlas.iter().find_map(|a| match a {
        GenlCtrlAttrs::FamilyId(id) => Some(*id),
        _ => None,
    })
}

/// `message` as a request, in bytes.
fn request<F: GenlFamily + Emitable + Debug>(message: GenlMessage<F>) -> Vec<u8> {
    let mut message = NetlinkMessage::from(message);
    message.header.flags = NLM_F_REQUEST;
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// The payload of the answer in `reply`; the kernel's error as an
/// [`std::io::Error`] when it refused.
fn answer<F: ParseableParametrized<[u8], GenlHeader> + Debug>(reply: &[u8]) -> Result<F> {
    let reply = NetlinkMessage::<GenlMessage<F>>::deserialize(reply)
        .context("parsing a generic netlink reply")?;
    match reply.payload {
        NetlinkPayload::InnerMessage(m) => Ok(m.payload),
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io().into()),
        other => bail!("an unexpected generic netlink reply: {other:?}"),
    }
}

/// Sends `message` on `socket` and reads the answer ([`answer`]).
fn ask<F>(socket: &Socket, message: GenlMessage<F>) -> Result<F>
where
    F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + Debug,
{
    socket
        .send(&request(message), 0)
        .context("sending a generic netlink request")?;
    let (reply, _) = socket
        .recv_from_full()
        .context("reading a generic netlink reply")?;
    answer(&reply)
}

/// The `netdev` family's device messages, what of them this module needs.
mod netdev {
    use netlink_packet_generic::{GenlFamily, GenlHeader};
    use rtnetlink::packet_core::{
        DecodeError, DefaultNla, Emitable, ErrorContext as _, Nla, NlaBuffer, NlasIterator,
        Parseable, ParseableParametrized, parse_u32, parse_u64,
    };

    // Numbers of include/uapi/linux/netdev.h.
    /// The family's name (`NETDEV_FAMILY_NAME`).
    const FAMILY_NAME: &str = "netdev";
    /// `NETDEV_FAMILY_VERSION`.
    const FAMILY_VERSION: u8 = 1;
    /// `NETDEV_CMD_DEV_GET`: one device's attributes.
    pub(super) const NETDEV_CMD_DEV_GET: u8 = 1;
    /// `NETDEV_A_DEV_IFINDEX` (u32): the device asked about.
    pub(super) const NETDEV_A_DEV_IFINDEX: u16 = 1;
    /// `NETDEV_A_DEV_XDP_FEATURES` (u64, `NETDEV_XDP_ACT_*` bits).
    pub(super) const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;

    /// An attribute of a device message.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) enum DevAttr {
        /// `NETDEV_A_DEV_IFINDEX`.
        Ifindex(u32),
        /// `NETDEV_A_DEV_XDP_FEATURES`.
        XdpFeatures(u64),
        /// One this module does not read (the pad, the XSK features, ...).
        Other(DefaultNla),
    }

    impl Nla for DevAttr {
        fn value_len(&self) -> usize {
            match self {
                Self::Ifindex(_) => size_of::<u32>(),
                Self::XdpFeatures(_) => size_of::<u64>(),
                Self::Other(nla) => nla.value_len(),
            }
        }

        fn kind(&self) -> u16 {
            match self {
                Self::Ifindex(_) => NETDEV_A_DEV_IFINDEX,
                Self::XdpFeatures(_) => NETDEV_A_DEV_XDP_FEATURES,
                Self::Other(nla) => nla.kind(),
            }
        }

        fn emit_value(&self, buffer: &mut [u8]) {
            match self {
                Self::Ifindex(v) => buffer.copy_from_slice(&v.to_ne_bytes()),
                Self::XdpFeatures(v) => buffer.copy_from_slice(&v.to_ne_bytes()),
                Self::Other(nla) => nla.emit_value(buffer),
            }
        }
    }

    impl<T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&T>> for DevAttr {
        fn parse(buf: &NlaBuffer<&T>) -> Result<Self, DecodeError> {
            let value = buf.value();
            Ok(match buf.kind() {
                NETDEV_A_DEV_IFINDEX => {
                    Self::Ifindex(parse_u32(value).context("invalid NETDEV_A_DEV_IFINDEX")?)
                }
                // A u64; a u32 if the kernel shortens it.
                NETDEV_A_DEV_XDP_FEATURES => Self::XdpFeatures(
                    match value.len() {
                        4 => parse_u32(value).map(u64::from),
                        _ => parse_u64(value),
                    }
                    .context("invalid NETDEV_A_DEV_XDP_FEATURES")?,
                ),
                _ => Self::Other(DefaultNla::parse(buf)?),
            })
        }
    }

    /// A device message: a command (`NETDEV_CMD_DEV_*`) and its attributes.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) struct Dev {
        /// The command.
        pub(super) cmd: u8,
        /// Its attributes.
        pub(super) attrs: Vec<DevAttr>,
    }

    impl Dev {
        /// The query for device `ifindex`.
        pub(super) fn get(ifindex: u32) -> Self {
            Self {
                cmd: NETDEV_CMD_DEV_GET,
                attrs: vec![DevAttr::Ifindex(ifindex)],
            }
        }

        /// The device's XDP features, if the message has them.
        pub(super) fn xdp_features(&self) -> Option<u64> {
            self.attrs.iter().find_map(|a| match a {
                DevAttr::XdpFeatures(f) => Some(*f),
                _ => None,
            })
        }
    }

    impl GenlFamily for Dev {
        fn family_name() -> &'static str {
            FAMILY_NAME
        }

        fn command(&self) -> u8 {
            self.cmd
        }

        fn version(&self) -> u8 {
            FAMILY_VERSION
        }
    }

    impl Emitable for Dev {
        fn buffer_len(&self) -> usize {
            self.attrs.as_slice().buffer_len()
        }

        fn emit(&self, buffer: &mut [u8]) {
            self.attrs.as_slice().emit(buffer);
        }
    }

    impl ParseableParametrized<[u8], GenlHeader> for Dev {
        fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
            let attrs = NlasIterator::new(buf)
                .map(|nla| nla.and_then(|nla| DevAttr::parse(&nla)))
                .collect::<Result<_, _>>()
                .context("invalid netdev device attributes")?;
            Ok(Self {
                cmd: header.cmd,
                attrs,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_core::{DefaultNla, ErrorMessage, NetlinkHeader};

    use super::{
        netdev::{DevAttr, NETDEV_A_DEV_IFINDEX, NETDEV_A_DEV_XDP_FEATURES, NETDEV_CMD_DEV_GET},
        *,
    };

    /// A family id as the kernel might give `netdev`.
    const FAMILY: u16 = 0x1c;

    #[test]
    fn asks_for_one_device() {
        let mut query = GenlMessage::from_payload(Dev::get(7));
        query.set_resolved_family_id(FAMILY);
        // nlmsghdr (length, type, flags, seq, pid), genlmsghdr (command,
        // version, reserved), one 8-byte attribute.
        let mut expected = Vec::new();
        expected.extend_from_slice(&28u32.to_ne_bytes());
        expected.extend_from_slice(&FAMILY.to_ne_bytes());
        expected.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&[NETDEV_CMD_DEV_GET, 1, 0, 0]);
        expected.extend_from_slice(&8u16.to_ne_bytes());
        expected.extend_from_slice(&NETDEV_A_DEV_IFINDEX.to_ne_bytes());
        expected.extend_from_slice(&7u32.to_ne_bytes());
        assert_eq!(request(query), expected);
    }

    #[test]
    fn reads_xdp_features_from_a_generic_netlink_reply() {
        // The family lookup's answer.
        let mut found = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::NewFamily,
            nlas: vec![
                GenlCtrlAttrs::FamilyId(FAMILY),
                GenlCtrlAttrs::FamilyName("netdev".into()),
            ],
        });
        found.finalize();
        let ctrl: GenlCtrl = answer(&request(found)).unwrap();
        assert_eq!(family_id(&ctrl), Some(FAMILY));
        // The device's: ifindex (u32), a pad attribute, the features (u64).
        let reply = Dev {
            cmd: NETDEV_CMD_DEV_GET,
            attrs: vec![
                DevAttr::Ifindex(7),
                DevAttr::Other(DefaultNla::new(2, Vec::new())),
                DevAttr::XdpFeatures(0b111),
            ],
        };
        let mut message = GenlMessage::from_payload(reply.clone());
        message.set_resolved_family_id(FAMILY);
        let bytes = request(message);
        assert_eq!(bytes.len(), 16 + 4 + 8 + 4 + 12);
        let dev: Dev = answer(&bytes).unwrap();
        assert_eq!(dev, reply);
        assert_eq!(dev.xdp_features(), Some(0b111));
        // A kernel that shortens the features to a u32.
        let mut short = bytes[..16 + 4 + 8 + 4].to_vec();
        short.extend_from_slice(&8u16.to_ne_bytes());
        short.extend_from_slice(&NETDEV_A_DEV_XDP_FEATURES.to_ne_bytes());
        short.extend_from_slice(&0b101u32.to_ne_bytes());
        let len = short.len() as u32;
        short[..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(answer::<Dev>(&short).unwrap().xdp_features(), Some(0b101));
        // An error: the kernel's errno, as an io::Error.
        let mut error = ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(-libc::ENOENT);
        error.header = bytes[..16].to_vec();
        let mut message = NetlinkMessage::<GenlMessage<Dev>>::new(
            NetlinkHeader::default(),
            NetlinkPayload::Error(error),
        );
        message.finalize();
        let mut refused = vec![0; message.buffer_len()];
        message.serialize(&mut refused);
        let e = answer::<GenlCtrl>(&refused).unwrap_err();
        assert_eq!(
            e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error),
            Some(libc::ENOENT)
        );
        assert!(answer::<Dev>(&bytes[..10]).is_err());
    }

    #[test]
    fn reads_xdp_features_from_the_kernel_without_attaching() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release
            .trim()
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let kernel = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        // lo (ifindex 1 in every namespace) has no native XDP; a kernel
        // before 6.3 does not say.
        let features = read(1).unwrap();
        if kernel >= (6, 3) {
            assert_eq!(features.map(|f| f & NETDEV_XDP_ACT_BASIC), Some(0));
        } else {
            assert_eq!(features, None);
        }
    }
}
