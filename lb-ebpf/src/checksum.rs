//! Internet checksum (RFC 1071) of the IPv4 headers we build, and the
//! folding of a sum the checksum helper made.

/// Checksum of an IPv4 header given as its ten 16-bit words (host order,
/// as read big-endian from the wire), the checksum's own word zero.
#[inline(always)]
pub fn ipv4_header(words: &[u16; 10]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < words.len() {
        sum += words[i] as u32;
        i += 1;
    }
    fold(sum as u64)
}

/// The checksum of a one's-complement sum of 16-bit words: the carries
/// folded back in, then complemented.
#[inline(always)]
pub fn fold(sum: u64) -> u16 {
    let mut s = sum;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
