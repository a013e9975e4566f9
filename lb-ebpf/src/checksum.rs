//! Internet checksum (RFC 1071) of the IPv4 headers we build.

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
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
