#![allow(missing_docs)]
//! Criterion benchmarks of the switch core: one frame forwarded per iteration through
//! `Switch::forward` into a sink that copies it (the cost a real destination pays), for known
//! unicast (the steady state) and broadcast (flooding to every other port); and batches of 64
//! frames through `Switch::forward_burst` (how the virtio TX path hands frames over), whose
//! unicast run reaches the sink in one `PortSink::deliver_burst` call.

use std::sync::Arc;
use std::sync::Mutex;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtnet::switch::{
    DropReason, Frame, NetHdr, PortConfig, PortId, PortSink, SliceFrame, Switch, SwitchConfig,
    TxBatch,
};

/// A destination that copies every frame into its own preallocated buffer.
struct CopySink {
    buf: Mutex<Vec<u8>>,
}

impl PortSink for CopySink {
    fn deliver(&self, frame: &dyn Frame, _hdr: &NetHdr) -> Result<(), DropReason> {
        let mut b = self.buf.lock().unwrap();
        let n = frame.len().min(b.len());
        frame.read_at(0, &mut b[..n]);
        Ok(())
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

/// A switch with `nports` copying ports, which has learned that 52:54:00:00:00:02 is behind
/// the second one.
fn switch(nports: usize) -> (Arc<Switch>, Vec<PortId>, TxBatch) {
    let sw = Switch::new(SwitchConfig::default());
    let ids: Vec<_> = (0..nports)
        .map(|_| {
            sw.add_port(
                PortConfig::default(),
                Arc::new(CopySink {
                    buf: Mutex::new(vec![0u8; 65536]),
                }),
            )
        })
        .collect();
    let mut batch = sw.new_batch();
    sw.begin(&mut batch);
    let learn = frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 2], 64);
    sw.forward(&mut batch, ids[1], &SliceFrame(&learn), &NetHdr::NONE);
    sw.end(&mut batch);
    (sw, ids, batch)
}

fn bench_forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("switch_forward");
    for &len in &[64usize, 512, 1500] {
        for (label, nports, dst) in [
            ("unicast", 2usize, [0x52, 0x54, 0, 0, 0, 2]),
            ("broadcast_4ports", 4, [0xff; 6]),
        ] {
            let (sw, ids, mut batch) = switch(nports);
            let f = frame(dst, [0x52, 0x54, 0, 0, 0, 1], len);
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::new(label, len), &f, |b, f| {
                b.iter(|| {
                    sw.begin(&mut batch);
                    sw.forward(&mut batch, ids[0], &SliceFrame(f), &NetHdr::NONE);
                    sw.end(&mut batch);
                })
            });
        }
    }
    g.finish();
}

fn bench_forward_burst(c: &mut Criterion) {
    const BURST: usize = 64;
    let mut g = c.benchmark_group("switch_forward_burst");
    for &len in &[64usize, 1500] {
        let (sw, ids, mut batch) = switch(2);
        let f = frame([0x52, 0x54, 0, 0, 0, 2], [0x52, 0x54, 0, 0, 0, 1], len);
        let frames = [SliceFrame(&f); BURST];
        let hdrs = [NetHdr::NONE; BURST];
        g.throughput(Throughput::Elements(BURST as u64));
        g.bench_with_input(BenchmarkId::new("unicast", len), &len, |b, _| {
            b.iter(|| {
                sw.begin(&mut batch);
                sw.forward_burst(&mut batch, ids[0], &frames, &hdrs);
                sw.end(&mut batch);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_forward, bench_forward_burst);
criterion_main!(benches);
