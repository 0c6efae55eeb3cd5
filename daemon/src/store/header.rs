//! Parsing and validating a safetensors header.
//!
//! Layout of a file: 8 bytes little-endian `N`, then `N` bytes of JSON, then the data. The JSON
//! maps tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to
//! the start of the data) plus an optional `"__metadata__"` map of strings.
//!
//! The `safetensors` crate parses into a `HashMap`, which silently keeps the last of two
//! duplicate names and loses the header order, and reports most layout faults as one variant.
//! This parser streams the JSON itself so that it can bound every count *while* reading (nothing
//! is allocated in proportion to a number the file claims, only to bytes it really has), reject
//! duplicates, and give each fault its own [`HeaderError`]. Tests use the crate as an oracle:
//! whatever we accept, it accepts too.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::dtype::Dtype;
use super::error::HeaderError;

/// Bounds on what a header may claim. The defaults are far above any real model.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest accepted JSON header (the safetensors crate uses the same 100 MB).
    pub max_header_bytes: u64,
    /// Most tensors one file may hold.
    pub max_tensors: usize,
    /// Highest tensor rank.
    pub max_rank: usize,
    /// Longest tensor name, in bytes.
    pub max_name_bytes: usize,
    /// Most `__metadata__` entries.
    pub max_metadata_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 100_000_000,
            max_tensors: 1 << 18,
            max_rank: 32,
            max_name_bytes: 1024,
            max_metadata_entries: 4096,
        }
    }
}

/// One tensor as the header describes it, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Absolute byte offset of the first byte in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A validated header: tensors in header order, and the free-form metadata.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Length of the JSON part.
    pub header_len: u64,
    /// Absolute offset at which tensor data starts (`8 + header_len`).
    pub data_start: u64,
    pub tensors: Vec<HeaderTensor>,
    pub metadata: Vec<(String, String)>,
}

/// Parses and validates the header of a complete safetensors file held in `file`.
pub fn parse(file: &[u8], limits: &Limits) -> Result<Header, HeaderError> {
    let file_len = file.len() as u64;
    if file.is_empty() {
        return Err(HeaderError::EmptyFile);
    }
    let Some((prefix, rest)) = file.split_first_chunk::<8>() else {
        return Err(HeaderError::FileTooShort { len: file_len });
    };
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > limits.max_header_bytes {
        return Err(HeaderError::HeaderTooLarge { header_len, limit: limits.max_header_bytes });
    }
    if header_len > rest.len() as u64 {
        return Err(HeaderError::HeaderBeyondFile { header_len, file_len });
    }
    // header_len <= rest.len(), so it fits in usize.
    let (json, data) = rest.split_at(header_len as usize);
    let text = std::str::from_utf8(json)
        .map_err(|e| HeaderError::HeaderNotUtf8 { valid_up_to: e.valid_up_to() })?;

    let ctx = Ctx::default();
    let seed = TopSeed { limits, fault: &ctx };
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = match seed.deserialize(&mut de).and_then(|raw| de.end().map(|()| raw)) {
        Ok(raw) => raw,
        Err(e) => {
            let Ctx { fault, current } = ctx;
            if let Some(fault) = fault.into_inner() {
                return Err(fault);
            }
            return Err(json_error(&e, current.into_inner()));
        }
    };

    let data_start = 8 + header_len;
    let tensors = validate(raw.tensors, data_start, data.len() as u64)?;
    Ok(Header { header_len, data_start, tensors, metadata: raw.metadata })
}

fn json_error(e: &serde_json::Error, tensor: Option<String>) -> HeaderError {
    use serde_json::error::Category;
    let message = e.to_string();
    // Strip serde_json's own " at line X column Y" suffix: we carry those as fields.
    let message = match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message,
    };
    match e.classify() {
        Category::Data => HeaderError::HeaderSchema { tensor, message },
        Category::Io | Category::Syntax | Category::Eof => {
            HeaderError::HeaderJson { message, line: e.line(), column: e.column() }
        }
    }
}

/// Checks each tensor's own fields, then the layout of all of them together.
fn validate(
    raw: Vec<RawTensor>,
    data_start: u64,
    data_len: u64,
) -> Result<Vec<HeaderTensor>, HeaderError> {
    let mut seen: HashMap<&str, ()> = HashMap::with_capacity(raw.len());
    for t in &raw {
        if seen.insert(t.name.as_str(), ()).is_some() {
            return Err(HeaderError::DuplicateTensor { tensor: t.name.clone() });
        }
    }
    drop(seen);

    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let Some(dtype) = Dtype::parse(&t.dtype) else {
            return Err(HeaderError::UnknownDtype { tensor: t.name, dtype: t.dtype });
        };
        let size = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|elements| dtype.byte_len(elements));
        let Some(size) = size else {
            return Err(HeaderError::SizeOverflow {
                tensor: t.name,
                shape: t.shape,
                dtype: t.dtype,
            });
        };
        let [begin, end] = t.offsets;
        if end < begin {
            return Err(HeaderError::ReversedOffsets { tensor: t.name, begin, end });
        }
        if end - begin != size {
            return Err(HeaderError::ShapeMismatch {
                tensor: t.name,
                shape: t.shape,
                dtype: t.dtype,
                expected: size,
                actual: end - begin,
            });
        }
        if end > data_len {
            return Err(HeaderError::DataBeyondFile { tensor: t.name, end, data_len });
        }
        // end <= data_len and data_start + data_len is the file length, so no overflow.
        let offset = data_start + begin;
        if !offset.is_multiple_of(dtype.alignment()) {
            return Err(HeaderError::Misaligned {
                tensor: t.name,
                dtype: t.dtype,
                file_offset: offset,
                align: dtype.alignment(),
            });
        }
        tensors.push(HeaderTensor { name: t.name, dtype, shape: t.shape, offset, len: size });
    }

    // The data must be covered exactly once: sorted by position, each tensor starts where the
    // previous one ended, the first at 0 and the last at the end of the file.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (tensors[i].offset, tensors[i].len));
    let mut cursor = data_start;
    let mut prev: Option<usize> = None;
    for &i in &order {
        let t = &tensors[i];
        if t.offset < cursor {
            // Only reachable with a previous tensor, since cursor starts at data_start.
            let other = prev.map(|p| tensors[p].name.clone()).unwrap_or_default();
            return Err(HeaderError::OverlappingData {
                tensor: t.name.clone(),
                begin: t.offset - data_start,
                end: t.offset - data_start + t.len,
                other,
                other_end: cursor - data_start,
            });
        }
        if t.offset > cursor {
            return Err(HeaderError::DataGap {
                tensor: t.name.clone(),
                gap_begin: cursor - data_start,
                gap_end: t.offset - data_start,
            });
        }
        cursor = t.offset + t.len;
        prev = Some(i);
    }
    if cursor - data_start != data_len {
        return Err(HeaderError::TrailingData { data_end: cursor - data_start, data_len });
    }
    Ok(tensors)
}

// ---------------------------------------------------------------------------------------------
// Streaming JSON: seeds that carry the limits and record the first typed fault.

struct RawTensor {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    offsets: [u64; 2],
}

struct RawHeader {
    tensors: Vec<RawTensor>,
    metadata: Vec<(String, String)>,
}

/// What the seeds share: the first typed fault, and the tensor being read (so that a plain
/// serde type error can still name it).
#[derive(Default)]
struct Ctx {
    fault: RefCell<Option<HeaderError>>,
    current: RefCell<Option<String>>,
}

type Fault<'a> = &'a Ctx;

/// Records `fault` and returns a serde error that aborts the parse.
fn fail<E: de::Error>(ctx: Fault<'_>, fault: HeaderError) -> E {
    let msg = fault.to_string();
    ctx.fault.borrow_mut().get_or_insert(fault);
    E::custom(msg)
}

struct TopSeed<'a> {
    limits: &'a Limits,
    fault: Fault<'a>,
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_> {
    type Value = RawHeader;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<RawHeader, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_> {
    type Value = RawHeader;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object mapping tensor names to tensor entries")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
        let mut tensors = Vec::new();
        let mut metadata = None;
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                if metadata.is_some() {
                    return Err(fail(self.fault, HeaderError::DuplicateTensor { tensor: name }));
                }
                metadata =
                    Some(map.next_value_seed(MetadataSeed {
                        limits: self.limits,
                        fault: self.fault,
                    })?);
                continue;
            }
            if name.len() > self.limits.max_name_bytes {
                let prefix = name.chars().take(64).collect();
                return Err(fail(
                    self.fault,
                    HeaderError::NameTooLong {
                        prefix,
                        len: name.len(),
                        limit: self.limits.max_name_bytes,
                    },
                ));
            }
            if tensors.len() >= self.limits.max_tensors {
                return Err(fail(
                    self.fault,
                    HeaderError::TooManyTensors { limit: self.limits.max_tensors },
                ));
            }
            *self.fault.current.borrow_mut() = Some(name.clone());
            let entry = map.next_value_seed(EntrySeed {
                name: &name,
                limits: self.limits,
                fault: self.fault,
            })?;
            *self.fault.current.borrow_mut() = None;
            tensors.push(RawTensor {
                name,
                dtype: entry.dtype,
                shape: entry.shape,
                offsets: entry.offsets,
            });
        }
        Ok(RawHeader { tensors, metadata: metadata.unwrap_or_default() })
    }
}

struct MetadataSeed<'a> {
    limits: &'a Limits,
    fault: Fault<'a>,
}

impl<'de> DeserializeSeed<'de> for MetadataSeed<'_> {
    type Value = Vec<(String, String)>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed<'_> {
    type Value = Vec<(String, String)>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("__metadata__ as an object of strings")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.len() >= self.limits.max_metadata_entries {
                return Err(fail(
                    self.fault,
                    HeaderError::HeaderSchema {
                        tensor: None,
                        message: format!(
                            "__metadata__ has more than {} entries",
                            self.limits.max_metadata_entries
                        ),
                    },
                ));
            }
            let v: String = map.next_value()?;
            out.push((k, v));
        }
        Ok(out)
    }
}

/// The fields of a tensor entry, matched without allocating a key string.
#[derive(serde::Deserialize, Debug)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Dtype,
    Shape,
    DataOffsets,
    #[serde(other)]
    Other,
}

struct Entry {
    dtype: String,
    shape: Vec<u64>,
    offsets: [u64; 2],
}

struct EntrySeed<'a> {
    name: &'a str,
    limits: &'a Limits,
    fault: Fault<'a>,
}

impl EntrySeed<'_> {
    fn schema<E: de::Error>(&self, message: String) -> E {
        fail(self.fault, HeaderError::HeaderSchema { tensor: Some(self.name.to_string()), message })
    }
}

impl<'de> DeserializeSeed<'de> for EntrySeed<'_> {
    type Value = Entry;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Entry, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_> {
    type Value = Entry;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an object with dtype, shape and data_offsets for tensor {:?}", self.name)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entry, A::Error> {
        let (mut dtype, mut shape, mut offsets) = (None, None, None);
        while let Some(key) = map.next_key::<Field>()? {
            match key {
                Field::Dtype if dtype.is_none() => dtype = Some(map.next_value::<String>()?),
                Field::Shape if shape.is_none() => {
                    shape = Some(map.next_value_seed(ShapeSeed {
                        name: self.name,
                        limit: self.limits.max_rank,
                        fault: self.fault,
                    })?)
                }
                Field::DataOffsets if offsets.is_none() => {
                    offsets = Some(
                        map.next_value_seed(OffsetsSeed { name: self.name, fault: self.fault })?,
                    )
                }
                Field::Dtype | Field::Shape | Field::DataOffsets => {
                    let name = match key {
                        Field::Dtype => "dtype",
                        Field::Shape => "shape",
                        _ => "data_offsets",
                    };
                    return Err(self.schema(format!("field {name:?} appears twice")));
                }
                // Unknown fields are ignored, as the format allows for extension, but still
                // read as values: serde's IgnoredAny skips without range-checking numbers or
                // validating string escapes, which would accept headers the format rejects.
                // The value is bounded by the header's size, like everything else here.
                Field::Other => {
                    map.next_value::<serde_json::Value>()?;
                }
            }
        }
        match (dtype, shape, offsets) {
            (Some(dtype), Some(shape), Some(offsets)) => Ok(Entry { dtype, shape, offsets }),
            (None, ..) => Err(self.schema("missing field \"dtype\"".into())),
            (_, None, _) => Err(self.schema("missing field \"shape\"".into())),
            (.., None) => Err(self.schema("missing field \"data_offsets\"".into())),
        }
    }
}

/// `data_offsets`: exactly two non-negative integers.
struct OffsetsSeed<'a> {
    name: &'a str,
    fault: Fault<'a>,
}

impl<'de> DeserializeSeed<'de> for OffsetsSeed<'_> {
    type Value = [u64; 2];
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<[u64; 2], D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for OffsetsSeed<'_> {
    type Value = [u64; 2];
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("data_offsets: an array of two non-negative integers")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u64; 2], A::Error> {
        let mut out = [0u64; 2];
        let mut n = 0;
        while let Some(v) = seq.next_element::<u64>()? {
            if n == 2 {
                n = 3;
                break;
            }
            out[n] = v;
            n += 1;
        }
        if n != 2 {
            let message = if n < 2 {
                format!("data_offsets has {n} numbers, expected 2")
            } else {
                "data_offsets has more than 2 numbers".to_string()
            };
            return Err(fail(
                self.fault,
                HeaderError::HeaderSchema { tensor: Some(self.name.to_string()), message },
            ));
        }
        Ok(out)
    }
}

struct ShapeSeed<'a> {
    name: &'a str,
    limit: usize,
    fault: Fault<'a>,
}

impl<'de> DeserializeSeed<'de> for ShapeSeed<'_> {
    type Value = Vec<u64>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<u64>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ShapeSeed<'_> {
    type Value = Vec<u64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a shape: an array of non-negative integers")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
        let mut dims = Vec::new();
        while let Some(d) = seq.next_element::<u64>()? {
            if dims.len() >= self.limit {
                return Err(fail(
                    self.fault,
                    HeaderError::RankTooLarge {
                        tensor: self.name.to_string(),
                        rank: dims.len() + 1,
                        limit: self.limit,
                    },
                ));
            }
            dims.push(d);
        }
        Ok(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: &[u8]) -> Vec<u8> {
        let mut f = (json.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(json.as_bytes());
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn parses_a_minimal_file_in_header_order() {
        let json = r#"{"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[],"data_offsets":[2,3]},"__metadata__":{"format":"pt"}}"#;
        let h = parse(&file(json, &[1, 2, 3]), &Limits::default()).expect("valid");
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].name, "b");
        assert_eq!(h.tensors[1].offset, 8 + json.len() as u64 + 2);
        assert_eq!(h.metadata, vec![("format".to_string(), "pt".to_string())]);
    }

    #[test]
    fn too_many_tensors_stops_while_reading() {
        let limits = Limits { max_tensors: 2, ..Limits::default() };
        let json = r#"{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[],"data_offsets":[1,2]},"c":{"dtype":"U8","shape":[],"data_offsets":[2,3]}}"#;
        assert_eq!(
            parse(&file(json, &[0; 3]), &limits).unwrap_err(),
            HeaderError::TooManyTensors { limit: 2 }
        );
    }
}
