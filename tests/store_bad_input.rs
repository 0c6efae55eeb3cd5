//! Bad input: every malformed file, index or folder the store can meet, each written as crafted
//! bytes, and each rejected with its own typed error whose message names the file and, where the
//! fault belongs to one tensor, the tensor.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry::store::{HeaderError, Limits};
use ferry::{Dtype, Model, Store, StoreError};
use ferry_tests::{Tensor, write_file};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A safetensors file: 8-byte little-endian header length, the JSON header exactly as given,
/// then `data`.
fn st_file(json: &str, data: &[u8]) -> Vec<u8> {
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f.extend_from_slice(data);
    f
}

/// Like [`st_file`], with the JSON padded with spaces (as the safetensors writer does) so that
/// the data starts on an 8-byte boundary: alignment then never masks the fault under test.
fn st_file_aligned(json: &str, data: &[u8]) -> Vec<u8> {
    let mut json = json.to_string();
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(' ');
    }
    st_file(&json, data)
}

/// A fresh temporary folder.
fn tmp() -> TempDir {
    tempfile::tempdir().expect("creating a temporary folder")
}

/// Writes `bytes` to `dir/name` and returns the canonical path (the one errors name).
fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("creating parent folders");
    }
    fs::write(&path, bytes).expect("writing a test file");
    fs::canonicalize(&path).expect("canonicalizing a test file")
}

/// `dir/name` canonicalized, for files written by other helpers.
fn canon(dir: &Path, name: &str) -> PathBuf {
    fs::canonicalize(dir.join(name)).expect("canonicalizing a test path")
}

/// Opens `path` with default limits and returns the error it must fail with.
fn open_err(path: &Path) -> StoreError {
    match Model::open(path) {
        Ok(m) => panic!("{} opened but must fail: {m:?}", path.display()),
        Err(e) => e,
    }
}

/// Opens `path` through a store with `limits` and returns the error it must fail with.
fn open_err_with(path: &Path, limits: Limits) -> StoreError {
    Store::with_limits(limits).open(path).expect_err("the file is over the limits and must fail")
}

/// Writes one crafted single file and returns (its canonical path, the error opening it gives).
fn reject(json: &str, data: &[u8]) -> (TempDir, PathBuf, StoreError) {
    reject_bytes(&st_file_aligned(json, data))
}

fn reject_bytes(bytes: &[u8]) -> (TempDir, PathBuf, StoreError) {
    let dir = tmp();
    let path = put(dir.path(), "model.safetensors", bytes);
    let err = open_err(&path);
    (dir, path, err)
}

/// Asserts that the error's message names `path` and every string in `names`.
#[track_caller]
fn assert_names(err: &StoreError, path: &Path, names: &[&str]) {
    let msg = err.to_string();
    let shown = path.display().to_string();
    assert!(msg.contains(&shown), "message {msg:?} does not name the file {shown:?}");
    for n in names {
        assert!(msg.contains(n), "message {msg:?} does not name {n:?}");
    }
}

/// The header error of a `StoreError::Header` for `path`.
#[track_caller]
fn header_error<'a>(err: &'a StoreError, path: &Path) -> &'a HeaderError {
    match err {
        StoreError::Header { path: p, error } => {
            assert_eq!(p, path, "header error names the wrong file");
            error
        }
        other => panic!("expected StoreError::Header, got {other:?}"),
    }
}

/// One U8 tensor entry.
fn u8_entry(name: &str, len: u64, begin: u64) -> String {
    format!(r#""{name}":{{"dtype":"U8","shape":[{len}],"data_offsets":[{begin},{}]}}"#, begin + len)
}

fn small(name: &str, shape: &[usize]) -> Tensor {
    Tensor::patterned(name, Dtype::F16, shape)
}

// ---------------------------------------------------------------------------------------------
// File length and header length

#[test]
fn empty_file() {
    let (_d, path, err) = reject_bytes(&[]);
    assert!(matches!(header_error(&err, &path), HeaderError::EmptyFile), "{err:?}");
    assert_names(&err, &path, &["empty"]);
}

#[test]
fn file_shorter_than_length_prefix() {
    let (_d, path, err) = reject_bytes(&[1, 0, 0, 0, 0]);
    assert!(matches!(header_error(&err, &path), HeaderError::FileTooShort { len: 5 }), "{err:?}");
    assert_names(&err, &path, &["5 bytes"]);
}

#[test]
fn header_length_past_end_of_file() {
    let mut bytes = st_file("{}", &[]);
    bytes[..8].copy_from_slice(&1000u64.to_le_bytes());
    let (_d, path, err) = reject_bytes(&bytes);
    assert!(
        matches!(
            header_error(&err, &path),
            HeaderError::HeaderBeyondFile { header_len: 1000, file_len: 10 }
        ),
        "{err:?}"
    );
    assert_names(&err, &path, &["1000"]);
}

#[test]
fn header_length_above_100_mb() {
    let mut bytes = st_file("{}", &[]);
    bytes[..8].copy_from_slice(&100_000_001u64.to_le_bytes());
    let (_d, path, err) = reject_bytes(&bytes);
    assert!(
        matches!(
            header_error(&err, &path),
            HeaderError::HeaderTooLarge { header_len: 100_000_001, limit: 100_000_000 }
        ),
        "{err:?}"
    );
    assert_names(&err, &path, &["100000001"]);
}

#[test]
fn header_length_of_2_pow_60_is_rejected_without_allocating() {
    let mut bytes = st_file("{}", &[]);
    bytes[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let start = Instant::now();
    let (_d, path, err) = reject_bytes(&bytes);
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    assert!(matches!(header_error(&err, &path), HeaderError::HeaderTooLarge { .. }), "{err:?}");
    // u64::MAX too: no arithmetic on the length may overflow.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let (_d, path, err) = reject_bytes(&bytes);
    assert!(matches!(header_error(&err, &path), HeaderError::HeaderTooLarge { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Header text

#[test]
fn header_not_utf8() {
    let mut json = br#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#.to_vec();
    json[2] = 0xff; // inside the tensor name
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.push(0);
    let (_d, path, err) = reject_bytes(&bytes);
    assert!(
        matches!(header_error(&err, &path), HeaderError::HeaderNotUtf8 { valid_up_to: 2 }),
        "{err:?}"
    );
    assert_names(&err, &path, &["UTF-8"]);
}

#[test]
fn header_invalid_json() {
    let (_d, path, err) = reject(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#, &[0]);
    assert!(matches!(header_error(&err, &path), HeaderError::HeaderJson { .. }), "{err:?}");
    assert_names(&err, &path, &["JSON"]);
}

#[test]
fn header_trailing_garbage_after_json() {
    let (_d, path, err) =
        reject(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x"#, &[0]);
    assert!(matches!(header_error(&err, &path), HeaderError::HeaderJson { .. }), "{err:?}");
    assert_names(&err, &path, &[]);
}

#[test]
fn header_not_an_object() {
    let (_d, path, err) = reject("[1, 2]", &[]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::HeaderSchema { tensor: None, .. }),
        "{err:?}"
    );
    assert_names(&err, &path, &["schema"]);
}

// ---------------------------------------------------------------------------------------------
// Per-tensor faults

#[test]
fn unknown_dtype() {
    let (_d, path, err) =
        reject(r#"{"w.0":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#, &[0; 16]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::UnknownDtype { tensor, dtype }
            if tensor == "w.0" && dtype == "F128"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"w.0\"", "F128"]);
}

#[test]
fn dtype_names_are_case_sensitive() {
    let (_d, path, err) =
        reject(r#"{"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}"#, &[0; 4]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::UnknownDtype { tensor, .. } if tensor == "w"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"w\""]);
}

#[test]
fn shape_times_dtype_differs_from_byte_range() {
    // [2, 3] F32 is 24 bytes, the offsets span 20.
    let (_d, path, err) =
        reject(r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#, &[0; 20]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::ShapeMismatch { tensor, expected: 24, actual: 20, .. }
            if tensor == "w"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"w\"", "24", "20"]);
}

#[test]
fn sub_byte_dtype_not_whole_bytes() {
    // Three F4 elements are 12 bits: safetensors forbids a partial byte.
    let (_d, path, err) =
        reject(r#"{"q":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#, &[0; 2]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::SizeOverflow { tensor, .. } if tensor == "q"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"q\""]);
}

#[test]
fn size_overflow_in_shape_product() {
    // 2^32 * 2^32 = 2^64 elements: the product itself overflows u64.
    let (_d, path, err) = reject(
        r#"{"big":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,1]}}"#,
        &[0],
    );
    assert!(
        matches!(header_error(&err, &path), HeaderError::SizeOverflow { tensor, shape, dtype }
            if tensor == "big" && shape == &[1u64 << 32, 1 << 32] && dtype == "U8"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"big\""]);
}

#[test]
fn size_overflow_in_byte_count() {
    // 2^61 elements fit in u64, but 2^61 * 64 bits do not.
    let (_d, path, err) = reject(
        r#"{"big":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert!(
        matches!(header_error(&err, &path), HeaderError::SizeOverflow { tensor, .. } if tensor == "big"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"big\""]);
}

#[test]
fn huge_claimed_sizes_do_not_allocate() {
    let start = Instant::now();
    // A shape of 2^60 elements with offsets that agree: rejected as beyond the file, not read.
    let (_d, path, err) = reject(
        r#"{"huge":{"dtype":"U8","shape":[1152921504606846976],"data_offsets":[0,1152921504606846976]}}"#,
        &[],
    );
    assert!(
        matches!(header_error(&err, &path), HeaderError::DataBeyondFile { tensor, .. } if tensor == "huge"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"huge\""]);
    // A 32-dimension shape of 2^20 each: overflow, not a 2^640-element allocation.
    let dims = vec!["1048576"; 32].join(",");
    let json = format!(r#"{{"wide":{{"dtype":"F32","shape":[{dims}],"data_offsets":[0,4]}}}}"#);
    let (_d, path, err) = reject(&json, &[0; 4]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::SizeOverflow { tensor, .. } if tensor == "wide"),
        "{err:?}"
    );
    // Offsets at u64::MAX.
    let json = format!(
        r#"{{"far":{{"dtype":"U8","shape":[1],"data_offsets":[{},{}]}}}}"#,
        u64::MAX - 1,
        u64::MAX
    );
    let (_d, path, err) = reject(&json, &[0]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::DataBeyondFile { tensor, .. } if tensor == "far"),
        "{err:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Data layout

#[test]
fn offsets_reversed() {
    let (_d, path, err) =
        reject(r#"{"r":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}}"#, &[0; 4]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::ReversedOffsets { tensor, begin: 4, end: 2 }
            if tensor == "r"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"r\""]);
}

#[test]
fn offsets_beyond_file() {
    let json = format!("{{{}}}", u8_entry("tail", 8, 0));
    let (_d, path, err) = reject(&json, &[0; 4]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::DataBeyondFile { tensor, end: 8, data_len: 4 }
            if tensor == "tail"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"tail\""]);
}

#[test]
fn offsets_overlapping() {
    let json = format!("{{{},{}}}", u8_entry("a", 4, 0), u8_entry("b", 4, 2));
    let (_d, path, err) = reject(&json, &[0; 6]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::OverlappingData { tensor, other, begin: 2, end: 6, other_end: 4 }
            if tensor == "b" && other == "a"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"a\"", "\"b\""]);
}

#[test]
fn offsets_identical_for_two_tensors() {
    let json = format!("{{{},{}}}", u8_entry("a", 4, 0), u8_entry("b", 4, 0));
    let (_d, path, err) = reject(&json, &[0; 4]);
    assert!(matches!(header_error(&err, &path), HeaderError::OverlappingData { .. }), "{err:?}");
    assert_names(&err, &path, &["\"a\"", "\"b\""]);
}

#[test]
fn offsets_leave_a_gap_between_tensors() {
    let json = format!("{{{},{}}}", u8_entry("a", 2, 0), u8_entry("b", 2, 4));
    let (_d, path, err) = reject(&json, &[0; 6]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::DataGap { tensor, gap_begin: 2, gap_end: 4 }
            if tensor == "b"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"b\""]);
}

#[test]
fn offsets_leave_a_gap_before_the_first_tensor() {
    let json = format!("{{{}}}", u8_entry("late", 2, 3));
    let (_d, path, err) = reject(&json, &[0; 5]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::DataGap { tensor, gap_begin: 0, gap_end: 3 }
            if tensor == "late"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"late\""]);
}

#[test]
fn trailing_bytes_after_last_tensor() {
    let json = format!("{{{}}}", u8_entry("a", 4, 0));
    let (_d, path, err) = reject(&json, &[0; 7]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::TrailingData { data_end: 4, data_len: 7 }),
        "{err:?}"
    );
    assert_names(&err, &path, &["3 bytes"]);
}

#[test]
fn trailing_bytes_with_no_tensor() {
    let (_d, path, err) = reject("{}", &[1, 2, 3]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::TrailingData { data_end: 0, data_len: 3 }),
        "{err:?}"
    );
    assert_names(&err, &path, &[]);
}

#[test]
fn duplicate_tensor_names() {
    let json = format!("{{{},{}}}", u8_entry("twice", 2, 0), u8_entry("twice", 2, 2));
    let (_d, path, err) = reject(&json, &[0; 4]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::DuplicateTensor { tensor } if tensor == "twice"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"twice\""]);
}

#[test]
fn duplicate_tensor_names_spelled_with_escapes() {
    // "\u0061" is "a": the same key once decoded.
    let json = format!("{{{},{}}}", u8_entry("a", 2, 0), u8_entry("\\u0061", 2, 2));
    let (_d, path, err) = reject(&json, &[0; 4]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::DuplicateTensor { tensor } if tensor == "a"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"a\""]);
}

#[test]
fn misaligned_data_offset() {
    // The F32 tensor starts 2 bytes into 8-aligned data: not 4-aligned in the file.
    let json = format!(
        r#"{{{},"f":{{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}}}"#,
        u8_entry("pad", 2, 0)
    );
    let (_d, path, err) = reject(&json, &[0; 6]);
    let expected_offset = fs::metadata(&path).expect("stat").len() - 4;
    assert!(
        matches!(header_error(&err, &path), HeaderError::Misaligned { tensor, dtype, file_offset, align: 4 }
            if tensor == "f" && dtype == "F32" && *file_offset == expected_offset),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"f\"", "F32"]);
}

#[test]
fn misaligned_because_of_an_odd_header_length() {
    // Data starting at an odd file offset: an F16 at data offset 0 is misaligned.
    let json = r#"{"h":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}} "#;
    let json = if (8 + json.len()).is_multiple_of(2) { &json[..json.len() - 1] } else { json };
    let (_d, path, err) = reject_bytes(&st_file(json, &[0; 2]));
    assert!(
        matches!(header_error(&err, &path), HeaderError::Misaligned { tensor, align: 2, .. } if tensor == "h"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"h\""]);
}

// ---------------------------------------------------------------------------------------------
// Limits

#[test]
fn too_many_tensors() {
    let json =
        format!("{{{},{},{}}}", u8_entry("a", 1, 0), u8_entry("b", 1, 1), u8_entry("c", 1, 2));
    let dir = tmp();
    let path = put(dir.path(), "m.safetensors", &st_file_aligned(&json, &[0; 3]));
    let err = open_err_with(&path, Limits { max_tensors: 2, ..Limits::default() });
    assert!(
        matches!(header_error(&err, &path), HeaderError::TooManyTensors { limit: 2 }),
        "{err:?}"
    );
    assert_names(&err, &path, &["2 tensors"]);
    // The same file is fine at the default limits.
    Model::open(&path).expect("three tensors are within the default limit");
}

#[test]
fn rank_too_large_with_small_limit() {
    let json = r#"{"deep":{"dtype":"U8","shape":[1,1,1,1],"data_offsets":[0,1]}}"#;
    let dir = tmp();
    let path = put(dir.path(), "m.safetensors", &st_file_aligned(json, &[0]));
    let err = open_err_with(&path, Limits { max_rank: 3, ..Limits::default() });
    assert!(
        matches!(header_error(&err, &path), HeaderError::RankTooLarge { tensor, rank: 4, limit: 3 }
            if tensor == "deep"),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"deep\""]);
}

#[test]
fn rank_too_large_at_default_limits() {
    let limit = Limits::default().max_rank;
    let dims = vec!["1"; limit + 1].join(",");
    let json = format!(r#"{{"deep":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,1]}}}}"#);
    let (_d, path, err) = reject(&json, &[0]);
    assert!(
        matches!(header_error(&err, &path), HeaderError::RankTooLarge { tensor, rank, limit: l }
            if tensor == "deep" && *rank == limit + 1 && *l == limit),
        "{err:?}"
    );
    assert_names(&err, &path, &["\"deep\""]);
    // Exactly at the limit is accepted.
    let dims = vec!["1"; limit].join(",");
    let json = format!(r#"{{"deep":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,1]}}}}"#);
    let dir = tmp();
    let path = put(dir.path(), "ok.safetensors", &st_file_aligned(&json, &[0]));
    Model::open(&path).expect("rank at the limit is accepted");
}

#[test]
fn rank_too_large_is_stopped_while_reading_a_huge_shape() {
    // A shape array of a million entries is cut off at the limit, not collected.
    let dims = vec!["1"; 1_000_000].join(",");
    let json = format!(r#"{{"deep":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,1]}}}}"#);
    let start = Instant::now();
    let (_d, path, err) = reject(&json, &[0]);
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(
        matches!(header_error(&err, &path), HeaderError::RankTooLarge { tensor, .. } if tensor == "deep"),
        "{err:?}"
    );
}

#[test]
fn name_too_long() {
    let name = "n".repeat(17);
    let json = format!("{{{}}}", u8_entry(&name, 1, 0));
    let dir = tmp();
    let path = put(dir.path(), "m.safetensors", &st_file_aligned(&json, &[0]));
    let err = open_err_with(&path, Limits { max_name_bytes: 16, ..Limits::default() });
    assert!(
        matches!(header_error(&err, &path), HeaderError::NameTooLong { prefix, len: 17, limit: 16 }
            if *prefix == name),
        "{err:?}"
    );
    assert_names(&err, &path, &[&name]);
}

#[test]
fn too_many_metadata_entries() {
    let json = r#"{"__metadata__":{"a":"1","b":"2","c":"3"}}"#;
    let dir = tmp();
    let path = put(dir.path(), "m.safetensors", &st_file_aligned(json, &[]));
    let err = open_err_with(&path, Limits { max_metadata_entries: 2, ..Limits::default() });
    assert!(
        matches!(header_error(&err, &path), HeaderError::HeaderSchema { tensor: None, message }
            if message.contains("__metadata__")),
        "{err:?}"
    );
    assert_names(&err, &path, &["__metadata__"]);
}

// ---------------------------------------------------------------------------------------------
// Schema

/// Asserts a schema error attached to `tensor`.
#[track_caller]
fn assert_schema_at(json: &str, data: &[u8], tensor: &str) {
    let (_d, path, err) = reject(json, data);
    assert!(
        matches!(header_error(&err, &path), HeaderError::HeaderSchema { tensor: Some(t), .. } if t == tensor),
        "{json}: {err:?}"
    );
    assert_names(&err, &path, &[&format!("{tensor:?}")]);
}

#[test]
fn schema_missing_data_offsets() {
    assert_schema_at(r#"{"w":{"dtype":"U8","shape":[1]}}"#, &[0], "w");
}

#[test]
fn schema_missing_dtype_and_shape() {
    assert_schema_at(r#"{"w":{"shape":[1],"data_offsets":[0,1]}}"#, &[0], "w");
    assert_schema_at(r#"{"w":{"dtype":"U8","data_offsets":[0,1]}}"#, &[0], "w");
}

#[test]
fn schema_negative_shape() {
    assert_schema_at(r#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#, &[0], "w");
}

#[test]
fn schema_fractional_shape() {
    assert_schema_at(r#"{"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}"#, &[0], "w");
}

#[test]
fn schema_data_offsets_with_one_number() {
    assert_schema_at(r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}}"#, &[0], "w");
}

/// Regression: `data_offsets` read as `[u64; 2]` stopped after two elements, and the third came
/// back as a JSON syntax error (`HeaderJson`) without the tensor name. It must be a
/// `HeaderSchema` error naming the tensor.
#[test]
fn schema_data_offsets_with_three_numbers() {
    assert_schema_at(r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#, &[0], "w");
}

#[test]
fn schema_wrong_types() {
    assert_schema_at(r#"{"w":{"dtype":32,"shape":[1],"data_offsets":[0,1]}}"#, &[0], "w");
    assert_schema_at(r#"{"w":{"dtype":"U8","shape":1,"data_offsets":[0,1]}}"#, &[0], "w");
    assert_schema_at(r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":"0-1"}}"#, &[0], "w");
    assert_schema_at(r#"{"w":"U8"}"#, &[], "w");
    assert_schema_at(r#"{"w":null}"#, &[], "w");
}

#[test]
fn schema_field_twice() {
    assert_schema_at(
        r#"{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        &[0],
        "w",
    );
}

#[test]
fn schema_metadata_not_strings() {
    let (_d, path, err) = reject(r#"{"__metadata__":{"n":1}}"#, &[]);
    assert!(matches!(header_error(&err, &path), HeaderError::HeaderSchema { .. }), "{err:?}");
    assert_names(&err, &path, &[]);
}

// ---------------------------------------------------------------------------------------------
// Sharded models

/// Writes `index.json` text as `model.safetensors.index.json` in `dir`; returns its canonical path.
fn put_index(dir: &Path, json: &str) -> PathBuf {
    put(dir, "model.safetensors.index.json", json.as_bytes())
}

#[test]
fn index_names_a_missing_shard() {
    let dir = tmp();
    write_file(&dir.path().join("s1.safetensors"), &[small("a", &[2])]).expect("write");
    let index =
        put_index(dir.path(), r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#);
    // By the index file and by its folder.
    for target in [index.clone(), dir.path().to_path_buf()] {
        let err = open_err(&target);
        assert!(
            matches!(&err, StoreError::ShardMissing { index: i, shard, tensor }
                if *i == index && shard == "s2.safetensors" && tensor == "b"),
            "{err:?}"
        );
        assert_names(&err, &index, &["\"s2.safetensors\"", "\"b\""]);
    }
}

#[test]
fn index_maps_one_tensor_to_two_shards() {
    let dir = tmp();
    write_file(&dir.path().join("s1.safetensors"), &[small("a", &[2])]).expect("write");
    write_file(&dir.path().join("s2.safetensors"), &[small("b", &[2])]).expect("write");
    // JSON allows the duplicate key; ferry must not keep just one of them.
    let index = put_index(
        dir.path(),
        r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors","a":"s2.safetensors"}}"#,
    );
    let err = open_err(&index);
    assert!(
        matches!(&err, StoreError::TensorInTwoShards { index: i, tensor, first, second }
            if *i == index && tensor == "a" && first == "s1.safetensors" && second == "s2.safetensors"),
        "{err:?}"
    );
    assert_names(&err, &index, &["\"a\"", "s1.safetensors", "s2.safetensors"]);
}

#[test]
fn index_lists_one_tensor_twice_with_the_same_shard() {
    let dir = tmp();
    write_file(&dir.path().join("s1.safetensors"), &[small("a", &[2])]).expect("write");
    let index =
        put_index(dir.path(), r#"{"weight_map":{"a":"s1.safetensors","a":"s1.safetensors"}}"#);
    let err = open_err(&index);
    assert!(matches!(&err, StoreError::IndexInvalid { path, .. } if *path == index), "{err:?}");
    assert_names(&err, &index, &["\"a\""]);
}

#[test]
fn tensor_stored_in_two_shard_headers() {
    let dir = tmp();
    write_file(&dir.path().join("s1.safetensors"), &[small("a", &[2]), small("b", &[2])])
        .expect("write");
    write_file(&dir.path().join("s2.safetensors"), &[small("b", &[3]), small("c", &[2])])
        .expect("write");
    let index = put_index(
        dir.path(),
        r#"{"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors"}}"#,
    );
    let err = open_err(&index);
    assert!(
        matches!(&err, StoreError::TensorInTwoShards { index: i, tensor, first, second }
            if *i == index && tensor == "b" && first == "s1.safetensors" && second == "s2.safetensors"),
        "{err:?}"
    );
    assert_names(&err, &index, &["\"b\"", "s1.safetensors", "s2.safetensors"]);
}

#[test]
fn index_shard_name_escapes_its_folder() {
    let outer = tmp();
    // The escaping target exists: ferry must refuse the name, not merely fail to find it.
    write_file(&outer.path().join("x.safetensors"), &[small("a", &[2])]).expect("write");
    let dir = outer.path().join("model");
    fs::create_dir_all(&dir).expect("mkdir");
    for shard in ["../x.safetensors", "/etc/passwd", "..", "sub/x.safetensors", ""] {
        let json = serde_json::json!({ "weight_map": { "a": shard } }).to_string();
        let index = put_index(&dir, &json);
        let err = open_err(&index);
        assert!(
            matches!(&err, StoreError::ShardPathEscapes { index: i, shard: s } if *i == index && s == shard),
            "{shard:?}: {err:?}"
        );
        assert_names(&err, &index, &[&format!("{shard:?}")]);
    }
}

#[test]
fn index_maps_tensor_to_a_shard_without_it() {
    let dir = tmp();
    write_file(&dir.path().join("s1.safetensors"), &[small("a", &[2])]).expect("write");
    write_file(&dir.path().join("s2.safetensors"), &[small("b", &[2])]).expect("write");
    // "b" is in s2, but the index says s1; "ghost" is nowhere.
    for (json, tensor, shard) in [
        (
            r#"{"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","z":"s2.safetensors"}}"#,
            "b",
            "s1.safetensors",
        ),
        (
            r#"{"weight_map":{"a":"s1.safetensors","ghost":"s2.safetensors"}}"#,
            "ghost",
            "s2.safetensors",
        ),
    ] {
        let index = put_index(dir.path(), json);
        let err = open_err(&index);
        assert!(
            matches!(&err, StoreError::IndexedTensorMissing { index: i, tensor: t, shard: s }
                if *i == index && t == tensor && s == shard),
            "{json}: {err:?}"
        );
        assert_names(&err, &index, &[&format!("{tensor:?}"), shard]);
    }
}

#[test]
fn index_invalid_json() {
    let dir = tmp();
    write_file(&dir.path().join("s1.safetensors"), &[small("a", &[2])]).expect("write");
    for json in [
        r#"{"weight_map":{"a":"s1.safetensors"}"#,
        r#"{"weight_map":{"a":1}}"#,
        r#"{"metadata":{}}"#,
        r#"{"weight_map":{}}"#,
        "[]",
        "",
    ] {
        let index = put_index(dir.path(), json);
        let err = open_err(&index);
        assert!(
            matches!(&err, StoreError::IndexInvalid { path, .. } if *path == index),
            "{json:?}: {err:?}"
        );
        assert_names(&err, &index, &["index"]);
    }
}

#[test]
fn index_not_utf8() {
    let dir = tmp();
    let index =
        put(dir.path(), "model.safetensors.index.json", b"{\"weight_map\":{\"\xff\":\"a\"}}");
    let err = open_err(&index);
    // Read as text: invalid UTF-8 is an I/O "invalid data" error naming the index.
    assert!(
        matches!(&err, StoreError::Io { path, .. } | StoreError::IndexInvalid { path, .. } if *path == index),
        "{err:?}"
    );
    assert_names(&err, &index, &[]);
}

#[test]
fn bad_shard_header_names_the_shard() {
    let dir = tmp();
    write_file(&dir.path().join("s1.safetensors"), &[small("a", &[2])]).expect("write");
    let shard = put(
        dir.path(),
        "s2.safetensors",
        &st_file_aligned(r#"{"b":{"dtype":"X","shape":[],"data_offsets":[0,0]}}"#, &[]),
    );
    let index =
        put_index(dir.path(), r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#);
    let err = open_err(&index);
    assert!(
        matches!(header_error(&err, &shard), HeaderError::UnknownDtype { tensor, .. } if tensor == "b"),
        "{err:?}"
    );
    assert_names(&err, &shard, &["\"b\""]);
}

// ---------------------------------------------------------------------------------------------
// Diffusers folders

fn put_model_index(root: &Path, components: &[&str]) -> PathBuf {
    let mut index = serde_json::Map::new();
    index.insert("_class_name".into(), "StableDiffusionPipeline".into());
    for c in components {
        index.insert((*c).into(), serde_json::json!(["diffusers", "Whatever"]));
    }
    let text = serde_json::to_vec(&index).expect("serialize model_index.json");
    put(root, "model_index.json", &text)
}

#[test]
fn diffusers_component_folder_missing() {
    let root = tmp();
    fs::create_dir_all(root.path().join("unet")).expect("mkdir");
    write_file(
        &root.path().join("unet/diffusion_pytorch_model.safetensors"),
        &[small("conv_in.weight", &[2])],
    )
    .expect("write");
    put_model_index(root.path(), &["unet", "vae"]);
    let canonical = canon(root.path(), ".");
    let err = open_err(root.path());
    assert!(
        matches!(&err, StoreError::ComponentMissing { root: r, component } if *r == canonical && component == "vae"),
        "{err:?}"
    );
    assert_names(&err, &canonical, &["\"vae\""]);
}

#[test]
fn diffusers_component_with_only_bin_weights() {
    let root = tmp();
    put(root.path(), "unet/diffusion_pytorch_model.bin", b"not a pickle");
    put(root.path(), "unet/config.json", b"{}");
    put_model_index(root.path(), &["unet"]);
    let canonical = canon(root.path(), ".");
    // By the folder and by model_index.json.
    for target in [root.path().to_path_buf(), root.path().join("model_index.json")] {
        let err = open_err(&target);
        assert!(
            matches!(&err, StoreError::ComponentNotSafetensors { root: r, component, found }
                if *r == canonical && component == "unet" && found.contains("diffusion_pytorch_model.bin")),
            "{err:?}"
        );
        assert_names(&err, &canonical, &["\"unet\"", "diffusion_pytorch_model.bin"]);
    }
}

#[test]
fn diffusers_two_variants_without_plain_weights() {
    let root = tmp();
    fs::create_dir_all(root.path().join("unet")).expect("mkdir");
    for variant in ["fp16", "bf16"] {
        write_file(
            &root.path().join(format!("unet/diffusion_pytorch_model.{variant}.safetensors")),
            &[small("conv_in.weight", &[2])],
        )
        .expect("write");
    }
    put_model_index(root.path(), &["unet"]);
    let canonical = canon(root.path(), ".");
    let err = open_err(root.path());
    assert!(
        matches!(&err, StoreError::AmbiguousWeights { root: r, component, found }
            if *r == canonical && component == "unet" && found.contains("fp16") && found.contains("bf16")),
        "{err:?}"
    );
    assert_names(&err, &canonical, &["\"unet\"", "fp16", "bf16"]);
}

#[test]
fn diffusers_bad_component_header_names_its_file() {
    let root = tmp();
    let file = put(
        root.path(),
        "vae/diffusion_pytorch_model.safetensors",
        &st_file_aligned(&format!("{{{}}}", u8_entry("decoder.w", 4, 0)), &[0; 2]),
    );
    put_model_index(root.path(), &["vae"]);
    let err = open_err(root.path());
    assert!(
        matches!(header_error(&err, &file), HeaderError::DataBeyondFile { tensor, .. } if tensor == "decoder.w"),
        "{err:?}"
    );
    assert_names(&err, &file, &["\"decoder.w\""]);
}

#[test]
fn diffusers_invalid_model_index() {
    let root = tmp();
    let index = put(root.path(), "model_index.json", br#"{"unet": ["diffusers", "X"]"#);
    let err = open_err(root.path());
    assert!(
        matches!(&err, StoreError::ModelIndexInvalid { path, .. } if *path == index),
        "{err:?}"
    );
    assert_names(&err, &index, &["model_index.json"]);
}

// ---------------------------------------------------------------------------------------------
// Paths

#[test]
fn directory_that_is_not_a_model() {
    let dir = tmp();
    put(dir.path(), "README.md", b"# not a model");
    let canonical = canon(dir.path(), ".");
    let err = open_err(dir.path());
    assert!(matches!(&err, StoreError::NotAModel { path, .. } if *path == canonical), "{err:?}");
    assert_names(&err, &canonical, &["not a model"]);
}

#[test]
fn directory_with_two_candidate_models() {
    let dir = tmp();
    write_file(&dir.path().join("a.safetensors"), &[small("w", &[2])]).expect("write");
    write_file(&dir.path().join("b.safetensors"), &[small("w", &[2])]).expect("write");
    let canonical = canon(dir.path(), ".");
    let err = open_err(dir.path());
    assert!(matches!(&err, StoreError::NotAModel { path, .. } if *path == canonical), "{err:?}");
    assert_names(&err, &canonical, &["a.safetensors", "b.safetensors"]);
}

#[test]
fn path_that_does_not_exist() {
    let dir = tmp();
    let missing = dir.path().join("nope.safetensors");
    let err = open_err(&missing);
    assert!(
        matches!(&err, StoreError::Io { path, source } if *path == missing && source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert_names(&err, &missing, &[]);
}

// ---------------------------------------------------------------------------------------------
// Stricter than the safetensors crate, never looser

/// Regression: unknown fields of a tensor entry were skipped with `IgnoredAny`, which neither
/// range-checks numbers nor validates `\u` surrogates, so ferry accepted headers the
/// safetensors crate rejects. Such values must be rejected, as by the oracle.
#[test]
fn unknown_entry_field_with_invalid_json_value_is_rejected() {
    for extra in ["1e400", "-1e400", r#""\ud800""#, r#""\udc00""#] {
        let json =
            format!(r#"{{"w":{{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":{extra}}}}}"#);
        let bytes = st_file_aligned(&json, &[0]);
        assert!(safetensors::SafeTensors::deserialize(&bytes).is_err(), "oracle accepts {json}");
        let (_d, path, err) = reject_bytes(&bytes);
        assert!(
            matches!(
                header_error(&err, &path),
                HeaderError::HeaderJson { .. } | HeaderError::HeaderSchema { .. }
            ),
            "{json}: {err:?}"
        );
    }
}

#[test]
fn unknown_entry_fields_are_ignored() {
    let json = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":{"y":[1,null,"z"]}}}"#;
    let bytes = st_file_aligned(json, &[9]);
    safetensors::SafeTensors::deserialize(&bytes).expect("the oracle accepts it");
    let dir = tmp();
    let path = put(dir.path(), "m.safetensors", &bytes);
    let model = Model::open(&path).expect("unknown fields are allowed");
    assert_eq!(model.tensors().len(), 1);
    assert_eq!(model.tensor_bytes(0), Some(&[9u8][..]));
}

// ---------------------------------------------------------------------------------------------
// Checkpoint key prefixes: valid files whose names must not break the component split

/// Writes one valid file with U8 tensors of one byte named `names`.
fn checkpoint_with(names: &[&str]) -> (TempDir, PathBuf) {
    let dir = tmp();
    let tensors: Vec<Tensor> =
        names.iter().map(|n| Tensor::patterned(*n, Dtype::U8, &[1])).collect();
    write_file(&dir.path().join("model.safetensors"), &tensors).expect("write");
    let path = canon(dir.path(), "model.safetensors");
    (dir, path)
}

/// Regression: two key prefixes of one component (`conditioner.embedders.0.` and
/// `text_encoders.clip_l.` are both `text_encoder`; `text_encoders.clip_l.` and
/// `cond_stage_model.` too) were merged under the first prefix, and slicing the other name by
/// that prefix's length panicked on a valid file. The file must open, the second prefix
/// becoming its own component named after the prefix, so that component names stay unique.
#[test]
fn checkpoint_mixing_two_prefixes_of_one_component_opens() {
    for names in [
        ["conditioner.embedders.0.w", "text_encoders.clip_l.x"],
        ["text_encoders.clip_l.w", "cond_stage_model.x"],
        ["conditioner.embedders.1.w", "text_encoders.clip_g.x"],
    ] {
        let (_d, path) = checkpoint_with(&names);
        let model = Model::open(&path).unwrap_or_else(|e| panic!("{names:?}: {e}"));
        for (id, t) in model.tensors().iter().enumerate() {
            let local = model.local_name(id).expect("every tensor has a local name");
            assert!(!local.is_empty() && t.name.ends_with(local), "{:?} -> {local:?}", t.name);
        }
        let comps: Vec<&str> = model.components().iter().map(|c| c.name.as_str()).collect();
        let mut unique = comps.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), comps.len(), "{names:?}: component names {comps:?}");
        if names[0] == "conditioner.embedders.0.w" {
            assert_eq!(comps, ["text_encoder", "text_encoders.clip_l"]);
        }
    }
}

/// Regression: the prefix length of `conditioner.embedders.N.` was computed from the *parsed*
/// N, so `01` gave a prefix one byte short and the local name `.w`. It must come from the digit
/// string, giving `w`.
#[test]
fn checkpoint_embedder_index_with_leading_zero() {
    let (_d, path) = checkpoint_with(&["conditioner.embedders.01.w"]);
    let model = Model::open(&path).expect("a valid file");
    assert_eq!(model.local_name(0), Some("w"));
}

#[test]
fn checkpoint_prefixes_split_into_components() {
    let (_d, path) = checkpoint_with(&[
        "model.diffusion_model.input_blocks.0.w",
        "first_stage_model.decoder.w",
        "conditioner.embedders.1.model.w",
        "model_ema.decay",
    ]);
    let model = Model::open(&path).expect("a valid file");
    for (id, t) in model.tensors().iter().enumerate() {
        let local = model.local_name(id).expect("local name");
        assert!(t.name.ends_with(local), "{:?} -> {local:?}", t.name);
        let c = &model.components()[t.component];
        assert_eq!(model.find(&c.name, local), Some(id));
    }
    let names: Vec<&str> = model.components().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["text_encoder_2", "unet", "vae", "extra"]);
}
