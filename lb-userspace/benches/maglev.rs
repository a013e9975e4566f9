//! Maglev table build time for 10, 100 and 1000 equally weighted backends
//! in a table of the size the daemon gives that many (`maglev::table_size`). `cargo xtask bench` runs this and puts
//! criterion's median in BENCHMARKS.md, next to the time it takes to write
//! the same table into the kernel.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lb::maglev::{self, Candidate};
use lb_common::FAMILY_V4;

/// Backend counts; lb-bench reads the results by these ids.
const BACKENDS: [u32; 3] = [10, 100, 1000];

/// Backend identities as the data plane's tables use them: 16 address
/// bytes (IPv4 in the first four) and the family tag.
fn keys(n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut k = vec![0u8; 17];
            k[..4].copy_from_slice(&(0xc612_1000_u32 + i).to_be_bytes());
            k[16] = FAMILY_V4;
            k
        })
        .collect()
}

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    for n in BACKENDS {
        let keys = keys(n);
        let candidates: Vec<Candidate<'_>> = keys
            .iter()
            .map(|k| Candidate { key: k, weight: 1 })
            .collect();
        let size = maglev::table_size(n as usize);
        group.bench_with_input(BenchmarkId::from_parameter(n), &candidates, |b, c| {
            b.iter(|| maglev::build(black_box(c), size));
        });
    }
    group.finish();
}

criterion_group!(benches, maglev_build);
criterion_main!(benches);
