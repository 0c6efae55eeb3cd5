//! One safetensors file: opened, identified, memory-mapped read-only, header validated.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};
use serde::Serialize;

use super::error::StoreError;
use super::header::{self, Header, Limits};

/// What makes a file the same file: device, inode, size and modification time. Two opens of one
/// path (or of two hard links) agree on it; a file rewritten in place does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileIdentity {
    /// The identity of an open file (from `fstat`, so it is the file we will map, not whatever
    /// the path names by then).
    pub fn of(file: &File, path: &Path) -> Result<Self, StoreError> {
        let m = file.metadata().map_err(|e| StoreError::io(path, e))?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// An opened, not yet mapped, weight file.
#[derive(Debug)]
pub struct OpenedFile {
    pub path: PathBuf,
    pub file: File,
    pub identity: FileIdentity,
}

impl OpenedFile {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
        let identity = FileIdentity::of(&file, path)?;
        if !file.metadata().map_err(|e| StoreError::io(path, e))?.is_file() {
            return Err(StoreError::NotAModel {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        Ok(OpenedFile { path: path.to_path_buf(), file, identity })
    }

    /// Maps the file and validates its header. Only the pages of the header are touched.
    pub fn map(self, limits: &Limits) -> Result<WeightFile, StoreError> {
        let path = self.path;
        let map = if self.identity.size == 0 {
            None
        } else {
            // SAFETY: the mapping is private and read-only, so this process never writes
            // through it. Another process may still truncate or rewrite the file while it is
            // mapped: reads of vanished pages then raise SIGBUS. ferry's copy path guards every
            // read of mapped weight bytes against that (see ARCHITECTURE.md, "Truncated files");
            // the header parsed here is read once, right after mapping.
            let map = unsafe { MmapOptions::new().map(&self.file) }
                .map_err(|e| StoreError::io(&path, e))?;
            Some(map)
        };
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        let header = header::parse(bytes, limits)
            .map_err(|error| StoreError::Header { path: path.clone(), error })?;
        let tensor_count = header.tensors.len();
        Ok(WeightFile { path, identity: self.identity, file: self.file, map, header, tensor_count })
    }
}

/// A mapped safetensors file with a valid header.
///
/// Its tensors move into the [`super::Model`] that maps it; `header.tensors` is then empty and
/// `tensor_count` says how many there were.
#[derive(Debug)]
pub struct WeightFile {
    pub path: PathBuf,
    pub identity: FileIdentity,
    /// Kept open so the file's current length can be checked against `identity` (truncation).
    file: File,
    map: Option<Mmap>,
    pub header: Header,
    pub tensor_count: usize,
}

impl WeightFile {
    /// All bytes of the file, straight from the mapping.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Bytes `offset..offset + len` of the file; `None` if out of range.
    pub fn range(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.bytes().get(start..end)
    }

    /// Whether the file on disk is still as long as when it was mapped. A shorter file means
    /// another process truncated it: reading the vanished pages would raise SIGBUS.
    pub fn still_whole(&self) -> bool {
        self.file.metadata().is_ok_and(|m| m.len() >= self.identity.size)
    }

    /// Size of the file in bytes.
    pub fn len(&self) -> u64 {
        self.identity.size
    }

    pub fn is_empty(&self) -> bool {
        self.identity.size == 0
    }
}
