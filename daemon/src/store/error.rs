//! Why a model could not be opened: one variant per rejection, each naming the file and,
//! where known, the tensor.

use std::io;
use std::path::PathBuf;

/// A rejection of one safetensors file's header or data layout. [`StoreError::Header`] pairs it
/// with the file's path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderError {
    #[error("file is empty")]
    EmptyFile,
    #[error("file is {len} bytes, shorter than the 8-byte header length prefix")]
    FileTooShort { len: u64 },
    #[error("header length {header_len} exceeds the limit of {limit} bytes")]
    HeaderTooLarge { header_len: u64, limit: u64 },
    #[error("header length {header_len} runs past the end of the {file_len}-byte file")]
    HeaderBeyondFile { header_len: u64, file_len: u64 },
    #[error("header is not valid UTF-8 (first bad byte at header offset {valid_up_to})")]
    HeaderNotUtf8 { valid_up_to: usize },
    #[error("header is not valid JSON: {message} (line {line}, column {column})")]
    HeaderJson { message: String, line: usize, column: usize },
    #[error("header does not follow the safetensors schema{}: {message}", at_tensor(.tensor))]
    HeaderSchema { tensor: Option<String>, message: String },
    #[error("header lists more than {limit} tensors")]
    TooManyTensors { limit: usize },
    #[error("tensor name of {len} bytes exceeds the limit of {limit} (starts {prefix:?})")]
    NameTooLong { prefix: String, len: usize, limit: usize },
    #[error("tensor {tensor:?} appears twice in the header")]
    DuplicateTensor { tensor: String },
    #[error("tensor {tensor:?} has unknown dtype {dtype:?}")]
    UnknownDtype { tensor: String, dtype: String },
    #[error("tensor {tensor:?} has rank {rank}, above the limit of {limit}")]
    RankTooLarge { tensor: String, rank: usize, limit: usize },
    #[error(
        "tensor {tensor:?}: the byte size of shape {shape:?} in {dtype} overflows or is not whole bytes"
    )]
    SizeOverflow { tensor: String, shape: Vec<u64>, dtype: String },
    #[error("tensor {tensor:?}: data_offsets [{begin}, {end}] end before they begin")]
    ReversedOffsets { tensor: String, begin: u64, end: u64 },
    #[error(
        "tensor {tensor:?}: shape {shape:?} of {dtype} needs {expected} bytes but data_offsets span {actual}"
    )]
    ShapeMismatch { tensor: String, shape: Vec<u64>, dtype: String, expected: u64, actual: u64 },
    #[error("tensor {tensor:?}: data ends at {end}, past the {data_len} bytes of data in the file")]
    DataBeyondFile { tensor: String, end: u64, data_len: u64 },
    #[error(
        "tensor {tensor:?}: file offset {file_offset} is not aligned to {align} bytes for {dtype}"
    )]
    Misaligned { tensor: String, dtype: String, file_offset: u64, align: u64 },
    #[error(
        "tensor {tensor:?} (data {begin}..{end}) overlaps tensor {other:?} (ending at {other_end})"
    )]
    OverlappingData { tensor: String, begin: u64, end: u64, other: String, other_end: u64 },
    #[error("{} bytes of data between offset {gap_begin} and tensor {tensor:?} at {gap_end} belong to no tensor", gap_end - gap_begin)]
    DataGap { tensor: String, gap_begin: u64, gap_end: u64 },
    #[error("{} bytes after the last tensor (data ends at {data_end}, file data is {data_len} bytes) belong to no tensor", data_len - data_end)]
    TrailingData { data_end: u64, data_len: u64 },
}

fn at_tensor(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!(" at tensor {t:?}"),
        None => String::new(),
    }
}

/// Everything that can go wrong opening a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {error}", path.display())]
    Header { path: PathBuf, error: HeaderError },
    #[error("{}: not a model: {reason}", path.display())]
    NotAModel { path: PathBuf, reason: String },
    #[error("{}: invalid shard index: {message}", path.display())]
    IndexInvalid { path: PathBuf, message: String },
    #[error("{}: shard {shard:?} (named for tensor {tensor:?}) does not exist", index.display())]
    ShardMissing { index: PathBuf, shard: String, tensor: String },
    #[error("{}: shard name {shard:?} leaves the index's directory", index.display())]
    ShardPathEscapes { index: PathBuf, shard: String },
    #[error("{}: tensor {tensor:?} is mapped to shard {shard:?} but that shard does not contain it", index.display())]
    IndexedTensorMissing { index: PathBuf, tensor: String, shard: String },
    #[error("{}: tensor {tensor:?} is stored in two shards, {first:?} and {second:?}", index.display())]
    TensorInTwoShards { index: PathBuf, tensor: String, first: String, second: String },
    #[error("{}: index names {count} shards, above the limit of {limit}", index.display())]
    TooManyShards { index: PathBuf, count: usize, limit: usize },
    #[error("{}: invalid model_index.json: {message}", path.display())]
    ModelIndexInvalid { path: PathBuf, message: String },
    #[error("{}: component {component:?} is listed in model_index.json but its folder is missing", root.display())]
    ComponentMissing { root: PathBuf, component: String },
    #[error("{}: component {component:?} has weights only in formats ferry cannot map ({found}); convert them to safetensors", root.display())]
    ComponentNotSafetensors { root: PathBuf, component: String, found: String },
    #[error("{}: component {component:?} has several weight variants ({found}) and none was chosen", root.display())]
    AmbiguousWeights { root: PathBuf, component: String, found: String },
    #[error("{}: layer prefix {prefix:?} matches no tensor of component {component:?}", path.display())]
    EmptyLayerPrefix { path: PathBuf, component: String, prefix: String },
    #[error("{}: model has no component named {component:?}", path.display())]
    UnknownComponent { path: PathBuf, component: String },
    #[error("{}: a file of the model resolves outside the folder it was opened from ({})", folder.display(), file.display())]
    OutsideFolder { folder: PathBuf, file: PathBuf },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io { path: path.into(), source }
    }

    /// The header rejection inside, if this is one.
    pub fn header_error(&self) -> Option<&HeaderError> {
        match self {
            StoreError::Header { error, .. } => Some(error),
            _ => None,
        }
    }
}
