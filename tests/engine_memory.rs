//! A sequential pass over a 4 GiB model keeps the process's anonymous memory under the staging
//! ring + 64 MiB: weights live in the page cache (and the device arena), never in a second copy.

use std::io::Write;
use std::time::Duration;

use ferry::device::{ClientDone, DeviceChoice, DeviceConfig};
use ferry::engine::policy::PolicySpec;
use ferry::engine::{Engine, EngineConfig};

const LAYERS: u64 = 64;
const LAYER_BYTES: u64 = 64 << 20; // 64 × 64 MiB = 4 GiB
const STAGING: usize = 4 * (8 << 20);

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("field")
}

/// A 4 GiB safetensors file whose data is a hole: written in microseconds, read as zeros.
fn sparse_model(path: &std::path::Path) {
    let header = ferry::bench::uniform_header(LAYERS as usize, LAYER_BYTES as usize);
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(&header).expect("write");
    f.set_len(header.len() as u64 + LAYERS * LAYER_BYTES).expect("extend");
}

#[test]
fn sequential_pass_over_4_gib_keeps_weights_out_of_anonymous_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.safetensors");
    sparse_model(&path);
    for mapped_reads in [false, true] {
        let e = Engine::new(EngineConfig {
            device: DeviceChoice::Host,
            device_config: DeviceConfig {
                host_memory: 1 << 30,
                mapped_reads,
                ..DeviceConfig::default()
            },
            budget: Some(2 * LAYER_BYTES + (1 << 20)),
            staging_slots: 4,
            staging_slot_bytes: STAGING / 4,
            acquire_timeout: Duration::from_secs(60),
            ..EngineConfig::default()
        })
        .expect("engine");
        let id = e.open_model(&path).expect("open");
        e.set_residency(id, None, PolicySpec::Sequential { lookahead: 1 }).expect("sequential");
        let before = status_kib("RssAnon:") * 1024;
        let mut peak = before;
        for l in 0..LAYERS as usize {
            let lease = e.acquire(id, "model", l).expect("acquire");
            lease.wait_ready().expect("ready");
            peak = peak.max(status_kib("RssAnon:") * 1024);
            e.release(lease, ClientDone::Now).expect("release");
        }
        let s = e.stats();
        // Every layer once, plus the prefetch of layer 0 for the next (cyclic) pass.
        assert_eq!(s.bytes_streamed, (LAYERS + 1) * LAYER_BYTES);
        assert!(s.peak_device_bytes <= 2 * LAYER_BYTES + (1 << 20));
        let grown = peak.saturating_sub(before);
        assert!(
            grown < STAGING as u64 + (64 << 20),
            "mapped_reads={mapped_reads}: anonymous memory grew by {} MiB streaming 4 GiB",
            grown >> 20
        );
    }
}
