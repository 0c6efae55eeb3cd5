//! Opening a model copies no weight byte into anonymous memory: the mapping is the only copy.

use ferry::Dtype;
use ferry_tests::{Tensor, write_file};

/// Resident anonymous memory of this process, in bytes (from /proc/self/status).
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).expect("RssAnon line");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("number");
    kib * 1024
}

#[test]
fn opening_and_reading_a_model_keeps_weights_out_of_anonymous_memory() {
    const TENSORS: usize = 64;
    const TENSOR_BYTES: usize = 2 << 20; // 128 MiB in all
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.safetensors");
    {
        let tensors: Vec<Tensor> = (0..TENSORS)
            .map(|i| Tensor::patterned(format!("blocks.{i}.weight"), Dtype::U8, &[TENSOR_BYTES]))
            .collect();
        write_file(&path, &tensors).expect("write");
    } // the writer's buffers are freed here

    let before = rss_anon();
    let model = ferry::Model::open(&path).expect("open");
    // Touch every page of every tensor through the zero-copy views.
    let mut sum = 0u64;
    for id in 0..model.tensors().len() {
        let bytes = model.tensor_bytes(id).expect("in range");
        sum += bytes.iter().step_by(4096).map(|&b| u64::from(b)).sum::<u64>();
    }
    let grown = rss_anon().saturating_sub(before);
    assert!(sum > 0);
    assert_eq!(model.total_bytes(), (TENSORS * TENSOR_BYTES) as u64);
    assert!(
        grown < 8 << 20,
        "anonymous memory grew by {grown} bytes while reading {} bytes of weights",
        TENSORS * TENSOR_BYTES
    );
}
