//! A mapped model file truncated by someone else while ferry reads it: the process survives,
//! the guards report it, and other models are unaffected.

use std::fs::OpenOptions;
use std::hint::black_box;
use std::io::Read;
use std::path::Path;

use ferry::Dtype;
use ferry::engine::sigbus;
use ferry_tests::{Tensor, write_file};

/// Every byte of `bytes`, read with volatile loads (the reads must really happen).
fn read_volatile_all(bytes: &[u8]) -> Vec<u8> {
    let p = bytes.as_ptr();
    // SAFETY: `p + i` lies within `bytes` for every `i < bytes.len()`.
    (0..bytes.len()).map(|i| unsafe { std::ptr::read_volatile(p.add(i)) }).collect()
}

/// `8 + header length`: where tensor data starts.
fn header_size(path: &Path) -> u64 {
    let mut prefix = [0u8; 8];
    std::fs::File::open(path).expect("open").read_exact(&mut prefix).expect("prefix");
    8 + u64::from_le_bytes(prefix)
}

fn tensors(prefix: &str) -> Vec<Tensor> {
    // 12 tensors of 256 KiB plus a few odd sizes: about 3 MiB, with tensors straddling pages.
    let mut v: Vec<Tensor> = (0..12)
        .map(|i| Tensor::patterned(format!("{prefix}.layers.{i}.weight"), Dtype::U8, &[256 << 10]))
        .collect();
    v.push(Tensor::patterned(format!("{prefix}.norm.weight"), Dtype::F16, &[1000]));
    v.push(Tensor::patterned(format!("{prefix}.head.weight"), Dtype::F32, &[12_345]));
    v
}

/// The bytes the writer put in the file for tensor `id` of `model`.
fn expected<'a>(model: &ferry::Model, written: &'a [Tensor], id: usize) -> &'a [u8] {
    let name = &model.tensor(id).expect("tensor").name;
    &written.iter().find(|t| &t.name == name).expect("written").data
}

#[test]
fn truncated_file_is_survived_and_other_models_are_untouched() {
    // The largest page size Linux uses (arm64 64 KiB): a tensor starting past the end of file
    // rounded up to it lies wholly in pages that are gone, whatever the page size.
    let page = 64u64 << 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let victim_path = dir.path().join("victim.safetensors");
    let other_path = dir.path().join("other.safetensors");
    let victim_tensors = tensors("victim");
    let other_tensors = tensors("other");
    write_file(&victim_path, &victim_tensors).expect("write victim");
    write_file(&other_path, &other_tensors).expect("write other");

    let victim = ferry::Model::open(&victim_path).expect("open victim");
    let other = ferry::Model::open(&other_path).expect("open other");
    assert!(victim.total_bytes() > 3 << 20);

    let whole = sigbus::guard_slice(victim.files()[0].bytes()).expect("guard file");
    let guards: Vec<sigbus::Guard> = (0..victim.tensors().len())
        .map(|id| sigbus::guard_slice(victim.tensor_bytes(id).expect("bytes")).expect("guard"))
        .collect();
    // Warm every page, so truncation must take pages that are resident.
    for id in 0..victim.tensors().len() {
        let bytes = victim.tensor_bytes(id).expect("bytes");
        assert_eq!(read_volatile_all(bytes), expected(&victim, &victim_tensors, id));
    }
    assert!(guards.iter().all(|g| !g.faulted()));

    // Someone else truncates the file to its header.
    let header = header_size(&victim_path);
    OpenOptions::new()
        .write(true)
        .open(&victim_path)
        .expect("open for truncation")
        .set_len(header)
        .expect("truncate");

    let faults_before = sigbus::faults_handled();
    let mut checksum = 0u64;
    for (id, guard) in guards.iter().enumerate() {
        let bytes = victim.tensor_bytes(id).expect("bytes");
        let read = read_volatile_all(bytes);
        checksum = checksum.wrapping_add(read.iter().map(|&b| u64::from(b)).sum::<u64>());
        // Everything past the header is gone: the bytes read back are zeros, whether they came
        // from the zero-filled tail of the last file page or from a replaced page.
        assert!(read.iter().all(|&b| b == 0), "tensor {id} read non-zero bytes after truncation");
        let start = bytes.as_ptr() as usize - victim.files()[0].bytes().as_ptr() as usize;
        if start as u64 >= header.div_ceil(page) * page {
            assert!(guard.faulted(), "tensor {id} lies wholly past the new end of file");
        }
    }
    black_box(checksum);
    // Still alive, and the fault was seen.
    assert!(sigbus::faults_handled() > faults_before);
    assert!(guards.iter().any(sigbus::Guard::faulted));
    assert!(whole.faulted(), "the whole-file guard sees any truncation that faults");

    // The other model, in another file, reads its exact bytes, guarded or not.
    for id in 0..other.tensors().len() {
        let bytes = other.tensor_bytes(id).expect("bytes");
        let g = sigbus::guard_slice(bytes).expect("guard");
        let mut copy = vec![0u8; bytes.len()];
        sigbus::copy_guarded(&g, bytes, &mut copy).expect("untouched file copies cleanly");
        assert_eq!(copy, expected(&other, &other_tensors, id));
        assert!(!g.faulted());
    }

    // Dropping the guards forgets the replaced pages before the mapping goes away.
    let mapping = victim.files()[0].bytes();
    assert!(sigbus::is_poisoned(mapping.as_ptr(), mapping.len()));
    drop((whole, guards));
    assert!(!sigbus::is_poisoned(mapping.as_ptr(), mapping.len()));
}
