//! Property tests of the header parser and of whole-file opens, with the `safetensors` crate as
//! the oracle.
//!
//! Valid files are written by the safetensors crate from random tensors, then mutated (bytes
//! flipped or overwritten, the file truncated or extended, JSON tokens spliced in, numbers and
//! strings of the header replaced, the length prefix changed). Whatever the bytes, ferry must
//! return `Ok` or a typed error, never panic; and whenever ferry accepts a file the oracle must
//! accept it too and agree on every tensor's name, dtype, shape and bytes: ferry may be stricter
//! than the safetensors crate, never looser.
//!
//! The mutation properties run the header parser on in-memory bytes (fast, thousands of cases);
//! a smaller number of cases go through `Model::open` on a temporary file.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use ferry::store::header::{self, Header};
use ferry::store::{HeaderError, Limits};
use ferry::{Dtype, Model, StoreError};
use ferry_tests::Tensor;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use safetensors::SafeTensors;

// ---------------------------------------------------------------------------------------------
// Valid files

/// Key prefixes, so that names exercise the checkpoint component split as well.
const PREFIXES: &[&str] = &[
    "",
    "",
    "",
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.0.",
    "conditioner.embedders.1.",
    "cond_stage_model.",
    "text_encoders.clip_l.",
    "text_encoders.clip_g.",
    "text_encoders.t5xxl.",
    "double_blocks.",
];

fn name() -> impl Strategy<Value = String> {
    (prop::sample::select(PREFIXES), "[a-z]{1,3}(\\.[0-9]{1,2}){0,2}(\\.[a-z\"\\\\é /]{1,3})?")
        .prop_map(|(p, local)| format!("{p}{local}"))
}

/// A random set of up to 6 tensors of any dtype and small shapes (rank 0 to 3, zero-sized
/// dimensions included). A sub-byte dtype whose element count does not fill whole bytes is
/// replaced by U8.
fn tensors() -> impl Strategy<Value = Vec<Tensor>> {
    prop::collection::btree_map(
        name(),
        (0..Dtype::ALL.len(), prop::collection::vec(0usize..6, 0..4)),
        0..7,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(name, (d, shape))| {
                let elements: u64 = shape.iter().map(|&s| s as u64).product();
                let mut dtype = Dtype::ALL[d];
                if dtype.byte_len(elements).is_none() {
                    dtype = Dtype::U8;
                }
                Tensor::patterned(name, dtype, &shape)
            })
            .collect()
    })
}

fn metadata() -> impl Strategy<Value = Option<HashMap<String, String>>> {
    prop::option::of(prop::collection::hash_map("[a-z_]{1,6}", "[ -~é]{0,8}", 0..4))
}

/// A valid file, as the safetensors crate writes it.
fn serialize(tensors: &[Tensor], metadata: Option<HashMap<String, String>>) -> Vec<u8> {
    safetensors::serialize(tensors.iter().map(|t| (t.name.as_str(), t)), metadata)
        .expect("the safetensors crate serializes any small tensor set")
}

fn valid_file() -> impl Strategy<Value = Vec<u8>> {
    (tensors(), metadata()).prop_map(|(t, m)| {
        // safetensors 0.8 writes `{},"__metadata__":{}}` (invalid JSON, which it then rejects
        // itself) for no tensors and empty metadata: it sizes the JSON map by metadata entries.
        let m = m.filter(|m| !(t.is_empty() && m.is_empty()));
        serialize(&t, m)
    })
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// JSON fragments (and a few bytes that are not) to splice into a header.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b" ",
    b"\n",
    b"\\",
    b"0",
    b"-1",
    b"1.5",
    b"1e400",
    b"18446744073709551615",
    b"18446744073709551616",
    b"null",
    b"true",
    b"\"x\"",
    b"\"x\":1,",
    b"\"\\ud800\"",
    b"\"\\u0000\"",
    b",\"x\":1e400",
    b",\"x\":\"\\ud800\"",
    b",\"x\":{\"y\":[1,null]}",
    b"\"dtype\":\"U8\",",
    b"\"shape\":[],",
    b"\"shape\":[1,1],",
    b"\"data_offsets\":[0,0],",
    b"\"data_offsets\":[0,1,2],",
    b"\"e\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},",
    b"\"__metadata__\":{},",
    b"\"__metadata__\":null,",
    b"\xff",
    b"\xc3",
    b"\xe9",
    b"\0",
];

/// Numbers to put in place of a number of the header.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "4",
    "7",
    "8",
    "9",
    "16",
    "255",
    "256",
    "65536",
    "4294967296",
    "1152921504606846976",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "1.0",
    "1e3",
    "00",
    "01",
];

/// Values of an unknown field added to an object of the header.
const FIELD_VALUES: &[&str] = &[
    "1",
    "null",
    "\"s\"",
    "{\"y\":[1,null,\"z\"]}",
    "1e400",
    "-1e400",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "18446744073709551616",
];

/// Strings to put in place of a string of the header.
const STRINGS: &[&str] = &[
    "\"U8\"",
    "\"F32\"",
    "\"F16\"",
    "\"BF16\"",
    "\"F64\"",
    "\"C64\"",
    "\"F4\"",
    "\"F6_E2M3\"",
    "\"BOOL\"",
    "\"F128\"",
    "\"f32\"",
    "\"dtype\"",
    "\"shape\"",
    "\"data_offsets\"",
    "\"__metadata__\"",
    "\"\"",
    "\"\\u0061\"",
    "\"\\ud800\"",
    "\"a\"",
];

#[derive(Clone, Debug)]
enum Mutation {
    /// Flip one bit anywhere in the file.
    FlipBit { at: Index, bit: u8 },
    /// Overwrite one byte of the header (or prefix) with any byte.
    SetByte { at: Index, byte: u8 },
    /// Overwrite one header byte with a JSON structural character.
    SetJsonChar { at: Index, ch: Index },
    /// Cut the file short.
    Truncate { at: Index },
    /// Append bytes.
    Extend { bytes: Vec<u8> },
    /// Insert a token in the header; `fix_len` keeps the length prefix in step.
    Splice { at: Index, token: Index, fix_len: bool },
    /// Delete bytes of the header.
    Delete { at: Index, len: usize, fix_len: bool },
    /// Replace a number of the header, keeping the length prefix in step.
    ReplaceNumber { which: Index, with: Index },
    /// Replace a string of the header by another string of the header or from [`STRINGS`].
    ReplaceString { which: Index, with: Index, from_header: bool },
    /// Set the length prefix to an interesting value.
    SetLen { kind: u8, small: u64 },
    /// Add a small delta to the length prefix.
    NudgeLen { delta: i64 },
    /// Add a field to an object of the header (a tensor entry, mostly), keeping the length
    /// prefix in step.
    AddField { which: Index, value: Index },
    /// Move one tensor's `data_offsets` by `delta` (both ends), keeping its size.
    ShiftOffsets { which: Index, delta: i64 },
    /// Give one tensor another tensor's `data_offsets`.
    CopyOffsets { from: Index, to: Index },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::SetByte { at, byte }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(at, ch)| Mutation::SetJsonChar { at, ch }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(|bytes| Mutation::Extend { bytes }),
        3 => (any::<Index>(), any::<Index>(), any::<bool>())
            .prop_map(|(at, token, fix_len)| Mutation::Splice { at, token, fix_len }),
        1 => (any::<Index>(), 1usize..8, any::<bool>())
            .prop_map(|(at, len, fix_len)| Mutation::Delete { at, len, fix_len }),
        4 => (any::<Index>(), any::<Index>())
            .prop_map(|(which, with)| Mutation::ReplaceNumber { which, with }),
        4 => (any::<Index>(), any::<Index>(), any::<bool>())
            .prop_map(|(which, with, from_header)| Mutation::ReplaceString { which, with, from_header }),
        1 => (0u8..8, 0u64..64).prop_map(|(kind, small)| Mutation::SetLen { kind, small }),
        1 => (-9i64..10).prop_map(|delta| Mutation::NudgeLen { delta }),
        2 => (any::<Index>(), any::<Index>())
            .prop_map(|(which, value)| Mutation::AddField { which, value }),
        3 => (any::<Index>(), -9i64..10)
            .prop_map(|(which, delta)| Mutation::ShiftOffsets { which, delta }),
        2 => (any::<Index>(), any::<Index>())
            .prop_map(|(from, to)| Mutation::CopyOffsets { from, to }),
    ]
}

fn declared_len(bytes: &[u8]) -> Option<u64> {
    bytes.first_chunk::<8>().map(|p| u64::from_le_bytes(*p))
}

fn set_len(bytes: &mut [u8], len: u64) {
    if let Some(p) = bytes.first_chunk_mut::<8>() {
        *p = len.to_le_bytes();
    }
}

/// The header's byte range as the prefix declares it, clipped to the file.
fn header_range(bytes: &[u8]) -> std::ops::Range<usize> {
    match declared_len(bytes) {
        Some(n) => {
            8..usize::try_from(n).map_or(bytes.len(), |n| n.saturating_add(8).min(bytes.len()))
        }
        None => 0..0,
    }
}

/// Replaces `range` of the file with `with`, moving the length prefix by the size change.
fn replace(bytes: &mut Vec<u8>, range: std::ops::Range<usize>, with: &[u8], fix_len: bool) {
    let delta = with.len() as i64 - range.len() as i64;
    bytes.splice(range, with.iter().copied());
    if fix_len && let Some(n) = declared_len(bytes) {
        set_len(bytes, n.wrapping_add_signed(delta));
    }
}

/// Maximal runs of ASCII digits (with a leading '-') in the header.
fn number_spans(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let r = header_range(bytes);
    let mut out = Vec::new();
    let mut i = r.start;
    while i < r.end {
        if bytes[i].is_ascii_digit() || bytes[i] == b'-' {
            let start = i;
            i += 1;
            while i < r.end && bytes[i].is_ascii_digit() {
                i += 1;
            }
            out.push(start..i);
        } else {
            i += 1;
        }
    }
    out
}

/// The `[begin,end]` arrays of `data_offsets` in the header: (span of the array, begin, end).
fn offset_spans(bytes: &[u8]) -> Vec<(std::ops::Range<usize>, u64, u64)> {
    const KEY: &[u8] = b"\"data_offsets\":[";
    let r = header_range(bytes);
    let text = &bytes[r.clone()];
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(found) = text[i..].windows(KEY.len()).position(|w| w == KEY) {
        let open = i + found + KEY.len() - 1;
        i = open + 1;
        let Some(close) = text[open..].iter().position(|&b| b == b']').map(|c| open + c) else {
            break;
        };
        let inner = String::from_utf8_lossy(&text[open + 1..close]).into_owned();
        if let Some((a, b)) = inner.split_once(',')
            && let (Ok(a), Ok(b)) = (a.trim().parse(), b.trim().parse())
        {
            out.push((r.start + open..r.start + close + 1, a, b));
        }
    }
    out
}

/// String literals (quotes included) in the header, found by a simple escape-aware scan.
fn string_spans(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let r = header_range(bytes);
    let mut out = Vec::new();
    let mut i = r.start;
    while i < r.end {
        if bytes[i] != b'"' {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        while i < r.end && bytes[i] != b'"' {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        if i < r.end {
            out.push(start..i + 1);
        }
        i += 1;
    }
    out
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let hdr = header_range(bytes);
    match m {
        Mutation::FlipBit { at, bit } => {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
        }
        Mutation::SetByte { at, byte } => {
            let end = hdr.end.max(8.min(bytes.len()));
            if end > 0 {
                let i = at.index(end);
                bytes[i] = *byte;
            }
        }
        Mutation::SetJsonChar { at, ch } => {
            if !hdr.is_empty() {
                let chars = b"{}[]\",:-0123456789 \\e.";
                bytes[hdr.start + at.index(hdr.len())] = chars[ch.index(chars.len())];
            }
        }
        Mutation::Truncate { at } => {
            if !bytes.is_empty() {
                let len = at.index(bytes.len());
                bytes.truncate(len);
            }
        }
        Mutation::Extend { bytes: extra } => bytes.extend_from_slice(extra),
        Mutation::Splice { at, token, fix_len } => {
            let token = TOKENS[token.index(TOKENS.len())];
            let i = hdr.start + at.index(hdr.len() + 1);
            replace(bytes, i..i, token, *fix_len);
        }
        Mutation::Delete { at, len, fix_len } => {
            if !hdr.is_empty() {
                let i = hdr.start + at.index(hdr.len());
                let end = (i + len).min(hdr.end);
                replace(bytes, i..end, &[], *fix_len);
            }
        }
        Mutation::ReplaceNumber { which, with } => {
            let spans = number_spans(bytes);
            if !spans.is_empty() {
                let span = spans[which.index(spans.len())].clone();
                let with = NUMBERS[with.index(NUMBERS.len())];
                replace(bytes, span, with.as_bytes(), true);
            }
        }
        Mutation::ReplaceString { which, with, from_header } => {
            let spans = string_spans(bytes);
            if !spans.is_empty() {
                let span = spans[which.index(spans.len())].clone();
                let with: Vec<u8> = if *from_header {
                    bytes[spans[with.index(spans.len())].clone()].to_vec()
                } else {
                    STRINGS[with.index(STRINGS.len())].as_bytes().to_vec()
                };
                replace(bytes, span, &with, true);
            }
        }
        Mutation::SetLen { kind, small } => {
            let file = bytes.len() as u64;
            let len = match kind {
                0 => *small,
                1 => file.saturating_sub(8),
                2 => file.saturating_sub(8) + 1 + small,
                3 => 100_000_000,
                4 => 100_000_001,
                5 => 1 << 60,
                6 => u64::MAX - small,
                _ => declared_len(bytes).unwrap_or(0).saturating_sub(*small),
            };
            set_len(bytes, len);
        }
        Mutation::NudgeLen { delta } => {
            if let Some(n) = declared_len(bytes) {
                set_len(bytes, n.wrapping_add_signed(*delta));
            }
        }
        Mutation::ShiftOffsets { which, delta } => {
            let spans = offset_spans(bytes);
            if !spans.is_empty() {
                let (span, a, b) = spans[which.index(spans.len())].clone();
                let (a, b) = (a.saturating_add_signed(*delta), b.saturating_add_signed(*delta));
                replace(bytes, span, format!("[{a},{b}]").as_bytes(), true);
            }
        }
        Mutation::CopyOffsets { from, to } => {
            let spans = offset_spans(bytes);
            if !spans.is_empty() {
                let (_, a, b) = spans[from.index(spans.len())].clone();
                let (span, ..) = spans[to.index(spans.len())].clone();
                replace(bytes, span, format!("[{a},{b}]").as_bytes(), true);
            }
        }
        Mutation::AddField { which, value } => {
            // Objects inside the header: a '{' after the first byte of the JSON.
            let opens: Vec<usize> = hdr.clone().skip(1).filter(|&i| bytes[i] == b'{').collect();
            if !opens.is_empty() {
                let at = opens[which.index(opens.len())] + 1;
                let field = format!("\"x\":{},", FIELD_VALUES[value.index(FIELD_VALUES.len())]);
                replace(bytes, at..at, field.as_bytes(), true);
            }
        }
    }
}

fn mutated_file() -> impl Strategy<Value = Vec<u8>> {
    (valid_file(), prop::collection::vec(mutation(), 1..5)).prop_map(|(mut bytes, ms)| {
        for m in &ms {
            apply(&mut bytes, m);
        }
        bytes
    })
}

// ---------------------------------------------------------------------------------------------
// The oracle

/// Checks that the safetensors crate accepts `bytes` and agrees with ferry's `header` on every
/// tensor and on the metadata.
fn agree(bytes: &[u8], h: &Header, st: &SafeTensors<'_>) -> Result<(), TestCaseError> {
    prop_assert_eq!(declared_len(bytes), Some(h.header_len));
    prop_assert_eq!(h.data_start, 8 + h.header_len);
    prop_assert_eq!(st.len(), h.tensors.len(), "tensor count");
    let mut covered = 0u64;
    for t in &h.tensors {
        let view = st
            .tensor(&t.name)
            .map_err(|e| TestCaseError::fail(format!("oracle lacks {:?}: {e}", t.name)))?;
        prop_assert_eq!(view.dtype().to_string(), t.dtype.as_str(), "dtype of {:?}", t.name);
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        prop_assert_eq!(&shape, &t.shape, "shape of {:?}", t.name);
        let ours = usize::try_from(t.offset)
            .ok()
            .zip(usize::try_from(t.len).ok())
            .and_then(|(o, l)| bytes.get(o..o.checked_add(l)?));
        prop_assert_eq!(ours, Some(view.data()), "bytes of {:?}", t.name);
        prop_assert_eq!(t.offset % t.dtype.alignment(), 0, "alignment of {:?}", t.name);
        prop_assert!(t.offset >= h.data_start);
        covered += t.len;
    }
    prop_assert_eq!(covered, bytes.len() as u64 - h.data_start, "data covered exactly once");
    // Metadata: the oracle keeps the last of duplicate keys.
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| TestCaseError::fail(format!("oracle metadata: {e}")))?;
    let ours: HashMap<&str, &str> =
        h.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let theirs: HashMap<&str, &str> =
        meta.metadata().iter().flatten().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    prop_assert_eq!(ours, theirs, "metadata");
    Ok(())
}

/// Rejections ferry may make of a file the oracle accepts: the ways ferry is deliberately
/// stricter (alignment, duplicates, schema details, limits).
fn stricter_than_oracle(e: &HeaderError) -> bool {
    matches!(
        e,
        HeaderError::Misaligned { .. }
            | HeaderError::DuplicateTensor { .. }
            | HeaderError::HeaderSchema { .. }
            | HeaderError::RankTooLarge { .. }
            | HeaderError::NameTooLong { .. }
            | HeaderError::TooManyTensors { .. }
    )
}

#[derive(Default)]
struct Tally {
    accepted: Cell<u32>,
    rejected: Cell<u32>,
    rejected_oracle_accepts: Cell<u32>,
    /// Rejections by variant name.
    variants: RefCell<BTreeMap<String, u32>>,
}

impl Tally {
    fn bump(c: &Cell<u32>) {
        c.set(c.get() + 1);
    }

    fn variant(&self, e: &HeaderError) {
        let debug = format!("{e:?}");
        let name = debug.split([' ', '{', '(']).next().unwrap_or_default().to_string();
        *self.variants.borrow_mut().entry(name).or_default() += 1;
    }
}

/// The property for one buffer: no panic, a typed result, and agreement with the oracle.
fn check_bytes(bytes: &[u8], tally: &Tally) -> Result<(), TestCaseError> {
    let ours = header::parse(bytes, &Limits::default());
    let oracle = SafeTensors::deserialize(bytes);
    match (&ours, &oracle) {
        (Ok(h), Ok(st)) => {
            agree(bytes, h, st)?;
            Tally::bump(&tally.accepted);
        }
        (Ok(h), Err(e)) => {
            return Err(TestCaseError::fail(format!(
                "ferry accepts ({} tensors) what the safetensors crate rejects: {e:?}",
                h.tensors.len()
            )));
        }
        (Err(e), Ok(_)) => {
            // Display must not panic either.
            let _ = e.to_string();
            tally.variant(e);
            prop_assert!(
                stricter_than_oracle(e),
                "ferry rejects a file the oracle accepts with {e:?}"
            );
            Tally::bump(&tally.rejected_oracle_accepts);
        }
        (Err(e), Err(_)) => {
            let _ = e.to_string();
            tally.variant(e);
            Tally::bump(&tally.rejected);
        }
    }
    // Smaller limits can only turn acceptance into rejection, and then only by a limit.
    let tight = Limits {
        max_tensors: 3,
        max_rank: 2,
        max_name_bytes: 12,
        max_metadata_entries: 1,
        ..Limits::default()
    };
    match (header::parse(bytes, &tight), &ours) {
        (Ok(a), Ok(b)) => prop_assert_eq!(&a.tensors, &b.tensors),
        (Ok(_), Err(e)) => {
            return Err(TestCaseError::fail(format!(
                "tight limits accept, default limits reject: {e:?}"
            )));
        }
        (Err(e), Ok(_)) => prop_assert!(
            matches!(
                e,
                HeaderError::TooManyTensors { .. }
                    | HeaderError::RankTooLarge { .. }
                    | HeaderError::NameTooLong { .. }
                    | HeaderError::HeaderSchema { .. }
            ),
            "tight limits reject a good file with {e:?}"
        ),
        (Err(_), Err(_)) => {}
    }
    Ok(())
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

/// Panics with the minimal failing file, shown as text (lossy) and as its length prefix.
#[track_caller]
fn finish(result: Result<(), TestError<Vec<u8>>>) {
    match result {
        Ok(()) => {}
        Err(TestError::Abort(why)) => panic!("aborted: {why}"),
        Err(TestError::Fail(why, bytes)) => panic!(
            "{why}\nminimal failing file ({} bytes, length prefix {:?}): {:?}",
            bytes.len(),
            declared_len(&bytes),
            String::from_utf8_lossy(&bytes)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Properties on the header parser (in memory)

#[test]
fn valid_files_parse_and_agree_with_the_oracle() {
    let tally = Tally::default();
    finish(runner(4000).run(&valid_file(), |bytes| {
        let h = header::parse(&bytes, &Limits::default())
            .map_err(|e| TestCaseError::fail(format!("ferry rejects a valid file: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| TestCaseError::fail(format!("oracle rejects its own file: {e}")))?;
        agree(&bytes, &h, &st)?;
        check_bytes(&bytes, &tally)
    }));
    assert_eq!(tally.rejected.get() + tally.rejected_oracle_accepts.get(), 0);
}

#[test]
fn mutated_files_never_panic_and_ferry_is_never_looser() {
    let tally = Tally::default();
    finish(runner(4000).run(&mutated_file(), |bytes| check_bytes(&bytes, &tally)));
    eprintln!(
        "mutated headers: {} accepted by both, {} rejected by both, {} rejected by ferry only",
        tally.accepted.get(),
        tally.rejected.get(),
        tally.rejected_oracle_accepts.get()
    );
    eprintln!("rejections by variant: {:?}", tally.variants.borrow());
    // The mutations must reach both sides of the property.
    assert!(tally.accepted.get() > 0, "no mutated file was valid");
    assert!(tally.rejected.get() > 100, "too few mutated files were invalid");
}

#[test]
fn arbitrary_bytes_never_panic() {
    let tally = Tally::default();
    let strategy = prop::collection::vec(any::<u8>(), 0..64).prop_map(|mut v| {
        // Half the time give the prefix a length that fits, so the JSON parser is reached.
        if v.len() >= 8 && v[0] % 2 == 0 {
            let n = (v.len() - 8) as u64;
            set_len(&mut v, n);
        }
        v
    });
    finish(runner(2000).run(&strategy, |bytes| check_bytes(&bytes, &tally)));
}

// ---------------------------------------------------------------------------------------------
// Properties on whole-file opens (temporary files)

/// Opens `bytes` as a file and checks the model (or the error) against the oracle.
fn check_open(dir: &Path, bytes: &[u8], must_open: bool) -> Result<(), TestCaseError> {
    let path = dir.join("model.safetensors");
    fs::write(&path, bytes).map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
    let path =
        fs::canonicalize(&path).map_err(|e| TestCaseError::fail(format!("canonicalize: {e}")))?;
    match Model::open(&path) {
        Ok(model) => {
            let st = SafeTensors::deserialize(bytes).map_err(|e| {
                TestCaseError::fail(format!(
                    "ferry opens a file the safetensors crate rejects: {e}"
                ))
            })?;
            prop_assert_eq!(model.tensors().len(), st.len());
            for (id, t) in model.tensors().iter().enumerate() {
                let view = st
                    .tensor(&t.name)
                    .map_err(|e| TestCaseError::fail(format!("oracle lacks {:?}: {e}", t.name)))?;
                prop_assert_eq!(view.dtype().to_string(), t.dtype.as_str());
                let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
                prop_assert_eq!(&shape, &t.shape);
                prop_assert_eq!(model.tensor_bytes(id), Some(view.data()), "bytes of {:?}", t.name);
                // Every tensor is reachable by its local name in its component.
                let local =
                    model.local_name(id).ok_or_else(|| TestCaseError::fail("no local name"))?;
                prop_assert!(
                    t.name.ends_with(local),
                    "{:?} is not a suffix of {:?}",
                    local,
                    t.name
                );
                let component = model
                    .components()
                    .get(t.component)
                    .ok_or_else(|| TestCaseError::fail("tensor of no component"))?;
                prop_assert_eq!(
                    model.find(&component.name, local),
                    Some(id),
                    "lookup of {:?}",
                    t.name
                );
            }
            let counted: usize = model.components().iter().map(|c| c.tensor_count()).sum();
            prop_assert_eq!(counted, model.tensors().len());
        }
        Err(e) => {
            prop_assert!(!must_open, "ferry rejects a valid file: {e}");
            prop_assert!(
                matches!(&e, StoreError::Header { path: p, .. } if *p == path),
                "not a header error naming the file: {e:?}"
            );
            let shown = path.display().to_string();
            prop_assert!(e.to_string().contains(&shown), "{e} does not name {shown}");
        }
    }
    Ok(())
}

#[test]
fn valid_files_open_as_models_that_agree_with_the_oracle() {
    let dir = tempfile::tempdir().expect("temporary folder");
    finish(runner(500).run(&valid_file(), |bytes| check_open(dir.path(), &bytes, true)));
}

#[test]
fn mutated_files_open_or_fail_with_a_header_error() {
    let dir = tempfile::tempdir().expect("temporary folder");
    finish(runner(1000).run(&mutated_file(), |bytes| check_open(dir.path(), &bytes, false)));
}
