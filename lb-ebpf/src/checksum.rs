//! Internet checksum (RFC 1071): the folding of a sum (of the IPv4
//! headers we build, or one the checksum helper made), and updates for one
//! changed word.

/// The checksum after one 16-bit word it covers changes from `old` to
/// `new` (RFC 1624, eqn. 3), all host order.
#[inline(always)]
pub(crate) fn replace(check: u16, old: u16, new: u16) -> u16 {
    fold(u64::from(!check) + u64::from(!old) + u64::from(new))
}

/// The checksum of a one's-complement sum of 16-bit words, or of 32-bit
/// words (the same sum modulo 0xffff; up to 2^35 of it): the carries
/// folded back in, then complemented.
#[inline(always)]
pub(crate) fn fold(sum: u64) -> u16 {
    let mut s = sum;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
