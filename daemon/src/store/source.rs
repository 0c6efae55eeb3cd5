//! Finding the files of a model: one file, a sharded set, or a diffusers pipeline folder.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::error::StoreError;
use super::file::OpenedFile;

/// How the model is laid out on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// One `.safetensors` file (possibly a single-file checkpoint holding several components).
    SingleFile,
    /// Shards listed by a `*.safetensors.index.json`.
    Sharded,
    /// A diffusers pipeline folder (`model_index.json`, one folder per component).
    Diffusers,
}

/// Largest JSON index or model_index.json ferry reads.
const MAX_JSON_BYTES: u64 = 64 << 20;
/// Most shards one index may name.
pub const MAX_SHARDS: usize = 4096;
/// Most components of a pipeline.
const MAX_COMPONENTS: usize = 256;

/// The files of one part of a model (the whole model, or one diffusers component).
#[derive(Debug)]
pub(crate) struct Part {
    /// The diffusers component this part is, if any.
    pub component: Option<String>,
    pub files: Vec<OpenedFile>,
    /// For a sharded part: the index and its `(tensor, shard position in files)` pairs.
    pub index: Option<(PathBuf, Vec<(String, usize)>)>,
}

/// Everything needed to map a model, found without mapping anything.
#[derive(Debug)]
pub(crate) struct Plan {
    pub kind: SourceKind,
    /// The canonical path the model was opened by.
    pub root: PathBuf,
    pub parts: Vec<Part>,
}

/// Resolves `path` into the files of a model.
pub(crate) fn resolve(path: &Path) -> Result<Plan, StoreError> {
    let root = fs::canonicalize(path).map_err(|e| StoreError::io(path, e))?;
    let meta = fs::metadata(&root).map_err(|e| StoreError::io(&root, e))?;
    if meta.is_dir() {
        return resolve_dir(root);
    }
    let name = file_name(&root);
    if name == "model_index.json" {
        let dir = root.parent().map(Path::to_path_buf).unwrap_or_else(|| root.clone());
        return resolve_diffusers(dir);
    }
    if name.ends_with(".index.json") {
        let part = resolve_sharded(&root, None)?;
        return Ok(Plan { kind: SourceKind::Sharded, root, parts: vec![part] });
    }
    let file = OpenedFile::open(&root)?;
    let part = Part { component: None, files: vec![file], index: None };
    Ok(Plan { kind: SourceKind::SingleFile, root, parts: vec![part] })
}

/// Resolves a model from a descriptor the caller opened: a `.safetensors` file, or a model
/// folder (single file, sharded, or diffusers). `name` labels it in messages.
///
/// The daemon then reads only what the descriptor gives access to: a file is mapped through
/// the descriptor itself; a folder's files are found through it and must all lie inside it
/// (symlinks included), so a folder cannot lend access to files outside itself.
pub(crate) fn resolve_descriptor(file: fs::File, name: &str) -> Result<Plan, StoreError> {
    let label = PathBuf::from(format!("<descriptor {name}>"));
    let meta = file.metadata().map_err(|e| StoreError::io(&label, e))?;
    if meta.is_file() {
        let identity = super::file::FileIdentity::of(&file, &label)?;
        let opened = OpenedFile { path: label.clone(), file, identity };
        let part = Part { component: None, files: vec![opened], index: None };
        return Ok(Plan { kind: SourceKind::SingleFile, root: label, parts: vec![part] });
    }
    if !meta.is_dir() {
        return Err(StoreError::NotAModel {
            path: label,
            reason: "the descriptor is neither a regular file nor a directory".into(),
        });
    }
    // The folder as the descriptor sees it (even if it was renamed or its path is not
    // reachable from here), through the kernel's link to the open directory.
    let through = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let root = fs::canonicalize(&through).map_err(|e| StoreError::io(&label, e))?;
    let plan = resolve_dir(root.clone())?;
    for part in &plan.parts {
        for f in &part.files {
            let real = fs::canonicalize(&f.path).map_err(|e| StoreError::io(&f.path, e))?;
            if !real.starts_with(&root) {
                return Err(StoreError::OutsideFolder { folder: root, file: real });
            }
        }
    }
    Ok(plan)
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn list_dir(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn resolve_dir(root: PathBuf) -> Result<Plan, StoreError> {
    let names = list_dir(&root)?;
    if names.iter().any(|n| n == "model_index.json") {
        return resolve_diffusers(root);
    }
    let indexes: Vec<&String> =
        names.iter().filter(|n| n.ends_with(".safetensors.index.json")).collect();
    let singles: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors")).collect();
    match (indexes.as_slice(), singles.as_slice()) {
        ([index], _) => {
            let index = root.join(index);
            let part = resolve_sharded(&index, None)?;
            Ok(Plan { kind: SourceKind::Sharded, root, parts: vec![part] })
        }
        ([], [single]) => {
            let file = OpenedFile::open(&root.join(single))?;
            let part = Part { component: None, files: vec![file], index: None };
            Ok(Plan { kind: SourceKind::SingleFile, root, parts: vec![part] })
        }
        ([], []) => Err(StoreError::NotAModel {
            path: root,
            reason: "directory has no model_index.json, *.safetensors.index.json or *.safetensors"
                .into(),
        }),
        _ => Err(StoreError::NotAModel {
            reason: format!(
                "directory holds several candidate models ({}); open one of them by path",
                indexes
                    .iter()
                    .chain(singles.iter())
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            path: root,
        }),
    }
}

fn read_json_file(path: &Path) -> Result<String, StoreError> {
    let file = fs::File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut text = String::new();
    file.take(MAX_JSON_BYTES + 1).read_to_string(&mut text).map_err(|e| StoreError::io(path, e))?;
    if text.len() as u64 > MAX_JSON_BYTES {
        return Err(StoreError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("JSON file larger than {MAX_JSON_BYTES} bytes"),
            ),
        ));
    }
    Ok(text)
}

/// A JSON object read as its entries in file order, duplicates kept (serde's maps drop them).
struct Entries<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<V>, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    out.push((k, map.next_value()?));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V2(std::marker::PhantomData))
    }
}

#[derive(serde::Deserialize)]
struct IndexJson {
    weight_map: Entries<String>,
    #[serde(default)]
    #[allow(dead_code)]
    metadata: IgnoredAny,
}

/// A shard must be a plain file name beside its index.
fn shard_name_ok(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

fn resolve_sharded(index: &Path, component: Option<String>) -> Result<Part, StoreError> {
    let text = read_json_file(index)?;
    let parsed: IndexJson = serde_json::from_str(&text).map_err(|e| StoreError::IndexInvalid {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let dir = index.parent().unwrap_or(Path::new("/"));
    let mut shard_pos: HashMap<String, usize> = HashMap::new();
    let mut shards: Vec<(String, String)> = Vec::new(); // (shard, first tensor naming it)
    let mut owner: HashMap<&str, &str> = HashMap::new();
    let mut map = Vec::with_capacity(parsed.weight_map.0.len());
    for (tensor, shard) in &parsed.weight_map.0 {
        if let Some(first) = owner.insert(tensor, shard) {
            if first != shard {
                return Err(StoreError::TensorInTwoShards {
                    index: index.to_path_buf(),
                    tensor: tensor.clone(),
                    first: first.to_string(),
                    second: shard.clone(),
                });
            }
            return Err(StoreError::IndexInvalid {
                path: index.to_path_buf(),
                message: format!("tensor {tensor:?} is listed twice in weight_map"),
            });
        }
        if !shard_name_ok(shard) {
            return Err(StoreError::ShardPathEscapes {
                index: index.to_path_buf(),
                shard: shard.clone(),
            });
        }
        let next = shards.len();
        let pos = *shard_pos.entry(shard.clone()).or_insert_with(|| {
            shards.push((shard.clone(), tensor.clone()));
            next
        });
        if shards.len() > MAX_SHARDS {
            return Err(StoreError::TooManyShards {
                index: index.to_path_buf(),
                count: shards.len(),
                limit: MAX_SHARDS,
            });
        }
        map.push((tensor.clone(), pos));
    }
    if shards.is_empty() {
        return Err(StoreError::IndexInvalid {
            path: index.to_path_buf(),
            message: "weight_map is empty".into(),
        });
    }
    let mut files = Vec::with_capacity(shards.len());
    for (shard, tensor) in shards {
        let path = dir.join(&shard);
        match OpenedFile::open(&path) {
            Ok(f) => files.push(f),
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::ShardMissing { index: index.to_path_buf(), shard, tensor });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Part { component, files, index: Some((index.to_path_buf(), map)) })
}

/// One `model_index.json` value: `["diffusers", "UNet2DConditionModel"]`, or `[null, null]`
/// for a component the pipeline leaves out.
fn component_is_listed(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Array(items) => items.iter().any(|v| !v.is_null()),
        _ => false,
    }
}

fn resolve_diffusers(root: PathBuf) -> Result<Plan, StoreError> {
    let index_path = root.join("model_index.json");
    let text = read_json_file(&index_path)?;
    let invalid =
        |message: String| StoreError::ModelIndexInvalid { path: index_path.clone(), message };
    let entries: Entries<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let mut parts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (name, value) in &entries.0 {
        // Keys starting with '_' are the pipeline's own metadata (_class_name, ...).
        if name.starts_with('_') || !component_is_listed(value) {
            continue;
        }
        if !seen.insert(name.as_str()) {
            return Err(invalid(format!("component {name:?} is listed twice")));
        }
        if seen.len() > MAX_COMPONENTS {
            return Err(invalid(format!("more than {MAX_COMPONENTS} components")));
        }
        if !shard_name_ok(name) {
            return Err(invalid(format!("component name {name:?} is not a plain folder name")));
        }
        let dir = root.join(name);
        if !dir.is_dir() {
            return Err(StoreError::ComponentMissing {
                root: root.clone(),
                component: name.clone(),
            });
        }
        if let Some(part) = resolve_component(&root, &dir, name)? {
            parts.push(part);
        }
    }
    if parts.is_empty() {
        return Err(StoreError::NotAModel {
            path: root,
            reason: "model_index.json lists no component with safetensors weights".into(),
        });
    }
    Ok(Plan { kind: SourceKind::Diffusers, root, parts })
}

/// Weight file names diffusers and transformers use, with an optional variant (`fp16`, ...).
fn weight_file_kind(name: &str) -> Option<(bool, Option<&str>)> {
    let (stem, index) = if let Some(s) = name.strip_suffix(".safetensors.index.json") {
        (s, true)
    } else if let Some(s) = name.strip_suffix(".safetensors") {
        (s, false)
    } else {
        return None;
    };
    for base in ["diffusion_pytorch_model", "model"] {
        if stem == base {
            return Some((index, None));
        }
        if let Some(variant) = stem.strip_prefix(base).and_then(|r| r.strip_prefix('.')) {
            // Shards of a sharded set ("model-00001-of-00002") are reached through the index.
            if !variant.is_empty() && variant.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Some((index, Some(variant)));
            }
        }
    }
    None
}

fn resolve_component(root: &Path, dir: &Path, name: &str) -> Result<Option<Part>, StoreError> {
    let names = list_dir(dir)?;
    let candidates: Vec<(&String, bool, Option<&str>)> = names
        .iter()
        .filter_map(|n| weight_file_kind(n).map(|(index, variant)| (n, index, variant)))
        .collect();
    let plain: Vec<_> = candidates.iter().filter(|c| c.2.is_none()).collect();
    let chosen = if !plain.is_empty() {
        plain
    } else {
        let variants: std::collections::BTreeSet<&str> =
            candidates.iter().filter_map(|c| c.2).collect();
        if variants.len() > 1 {
            return Err(StoreError::AmbiguousWeights {
                root: root.to_path_buf(),
                component: name.to_string(),
                found: variants.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
        candidates.iter().collect()
    };
    // Prefer a sharded index over a single file, and diffusers' name over transformers'.
    let pick = chosen.iter().find(|c| c.1).or_else(|| chosen.first());
    let Some((file, is_index, _)) = pick else {
        let others: Vec<&str> = names
            .iter()
            .filter(|n| {
                [".bin", ".ckpt", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5"]
                    .iter()
                    .any(|ext| n.ends_with(ext))
            })
            .map(|s| s.as_str())
            .collect();
        if others.is_empty() {
            // A component without weights (tokenizer, scheduler, feature extractor).
            return Ok(None);
        }
        return Err(StoreError::ComponentNotSafetensors {
            root: root.to_path_buf(),
            component: name.to_string(),
            found: others.join(", "),
        });
    };
    let path = dir.join(file);
    if *is_index {
        return resolve_sharded(&path, Some(name.to_string())).map(Some);
    }
    let f = OpenedFile::open(&path)?;
    Ok(Some(Part { component: Some(name.to_string()), files: vec![f], index: None }))
}

#[cfg(test)]
mod tests {
    use super::weight_file_kind;

    #[test]
    fn weight_file_names() {
        assert_eq!(weight_file_kind("model.safetensors"), Some((false, None)));
        assert_eq!(
            weight_file_kind("diffusion_pytorch_model.fp16.safetensors"),
            Some((false, Some("fp16")))
        );
        assert_eq!(weight_file_kind("model.safetensors.index.json"), Some((true, None)));
        assert_eq!(weight_file_kind("model-00001-of-00002.safetensors"), None);
        assert_eq!(weight_file_kind("model.fp16.bin"), None);
    }
}
