//! Opening models from descriptors the caller opened (what `open_model_fd` serves): a file is
//! read through its descriptor, a folder's files must all lie inside it.

use std::fs::File;
use std::sync::Arc;

use ferry::Dtype;
use ferry::store::{Store, StoreError};
use ferry_tests::{Tensor, write_file, write_sharded};

fn tensors() -> Vec<Tensor> {
    (0..3).map(|b| Tensor::patterned(format!("blocks.{b}.weight"), Dtype::F16, &[8, 4])).collect()
}

/// Every tensor's bytes, by name, as the model maps them.
fn contents(m: &ferry::store::Model) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = m
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), m.tensor_bytes(i).expect("bytes").to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn a_file_descriptor_opens_the_same_model_as_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.safetensors");
    let ts = tensors();
    write_file(&path, &ts).expect("write");
    let store = Store::new();
    let by_fd = store.open_file(File::open(&path).expect("open"), "m").expect("open_file");
    let by_path = store.open(&path).expect("open");
    assert!(Arc::ptr_eq(&by_fd, &by_path), "one model for one file, however it was opened");
    let mut want: Vec<(String, Vec<u8>)> =
        ts.iter().map(|t| (t.name.clone(), t.data.clone())).collect();
    want.sort();
    assert_eq!(contents(&by_fd), want);
}

#[test]
fn a_file_descriptor_keeps_working_after_the_path_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.safetensors");
    let ts = tensors();
    write_file(&path, &ts).expect("write");
    let file = File::open(&path).expect("open");
    std::fs::remove_file(&path).expect("unlink");
    let m = Store::new().open_file(file, "m").expect("open_file of an unlinked file");
    assert_eq!(m.tensors().len(), ts.len());
}

#[test]
fn a_folder_descriptor_opens_a_sharded_model_inside_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("model");
    std::fs::create_dir(&folder).expect("mkdir");
    let ts = tensors();
    write_sharded(&folder, "model", &ts, 2).expect("shards");
    let m = Store::new().open_file(File::open(&folder).expect("open dir"), "model").expect("open");
    let mut want: Vec<(String, Vec<u8>)> =
        ts.iter().map(|t| (t.name.clone(), t.data.clone())).collect();
    want.sort();
    assert_eq!(contents(&m), want);
}

#[test]
fn a_folder_whose_file_links_outside_it_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = dir.path().join("secret.safetensors");
    write_file(&outside, &tensors()).expect("write");
    let folder = dir.path().join("model");
    std::fs::create_dir(&folder).expect("mkdir");
    std::os::unix::fs::symlink(&outside, folder.join("m.safetensors")).expect("symlink");
    let err = Store::new()
        .open_file(File::open(&folder).expect("open dir"), "model")
        .expect_err("a symlink out of the folder");
    match &err {
        StoreError::OutsideFolder { folder: f, file } => {
            assert_eq!(f, &folder.canonicalize().expect("canonical"));
            assert_eq!(file, &outside.canonicalize().expect("canonical"));
        }
        other => panic!("expected OutsideFolder, got {other:?}"),
    }
    assert!(err.to_string().contains("outside the folder"), "{err}");
}

#[test]
fn a_descriptor_that_is_not_a_file_or_folder_is_refused() {
    let err = Store::new()
        .open_file(File::open("/dev/null").expect("/dev/null"), "null")
        .expect_err("a character device");
    match &err {
        StoreError::NotAModel { reason, .. } => {
            assert!(reason.contains("neither a regular file nor a directory"), "{reason}")
        }
        other => panic!("expected NotAModel, got {other:?}"),
    }
    assert!(err.to_string().contains("<descriptor null>"), "{err}");
}

#[test]
fn a_descriptor_of_a_file_that_is_not_safetensors_is_a_header_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("junk.bin");
    std::fs::write(&path, b"this is not a safetensors file at all").expect("write");
    let err = Store::new().open_file(File::open(&path).expect("open"), "junk").expect_err("junk");
    assert!(err.header_error().is_some(), "{err:?}");
}
