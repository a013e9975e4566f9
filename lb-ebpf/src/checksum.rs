//! Internet checksum (RFC 1071) of the IPv4 headers we build, the folding
//! of a sum the checksum helper made, and updates for one changed word.

/// Checksum of an IPv4 header given as its ten 16-bit words (host order,
/// as read big-endian from the wire), the checksum's own word zero.
#[inline(always)]
pub(crate) fn ipv4_header(words: &[u16; 10]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < words.len() {
        sum += u32::from(words[i]);
        i += 1;
    }
    fold(u64::from(sum))
}

/// The checksum after one 16-bit word it covers changes from `old` to
/// `new` (RFC 1624, eqn. 3), all host order.
#[inline(always)]
pub(crate) fn replace(check: u16, old: u16, new: u16) -> u16 {
    fold(u64::from(!check) + u64::from(!old) + u64::from(new))
}

/// The checksum of a one's-complement sum of 16-bit words: the carries
/// folded back in, then complemented.
#[inline(always)]
pub(crate) fn fold(sum: u64) -> u16 {
    let mut s = sum;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
