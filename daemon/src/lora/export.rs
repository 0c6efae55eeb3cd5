//! `ferryctl export`: a base model with a LoRA stack fused in, written as safetensors.
//!
//! Every weight file of the base is rewritten with the same tensors, dtypes, shapes and data
//! offsets; tensors a LoRA adapts get `W + Σ scale·(alpha/rank)·(up @ down)` (f32 accumulation,
//! rounded once to the weight's dtype), the others are copied byte for byte from the mapping.
//! One tensor is merged at a time, so memory stays at the size of the largest adapted tensor.
//! Files are written beside their destination and renamed into place when complete.
//!
//! Layout: a single-file model becomes one file; a sharded set or a diffusers folder becomes a
//! folder with the same relative paths, with the base's small side files (index, configs,
//! tokenizer files) copied so the result opens like the original.

use std::collections::HashMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::math::{self, Delta, Factor, Patch};
use super::{LoraError, LoraFile, Rows};
use crate::store::{Model, SourceKind, TensorId};

/// What was written.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExportReport {
    /// Files written (weights first, then copied side files).
    pub files: Vec<PathBuf>,
    /// Base tensors that received at least one delta.
    pub merged: usize,
    /// Per LoRA (by path): adapters that matched no tensor of the base.
    pub unmatched: Vec<(PathBuf, Vec<String>)>,
    /// Per LoRA: tensors of adapter kinds ferry does not apply.
    pub unrecognised: Vec<(PathBuf, Vec<String>)>,
}

/// One delta a base tensor receives: adapter `adapter` of LoRA `lora` in the stack, at
/// `strength`, on the tensor's rows `rows` (all of it when `None`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct StackDelta {
    pub lora: usize,
    pub adapter: usize,
    pub strength: f32,
    pub rows: Option<Rows>,
}

/// For each adapted base tensor, the deltas it receives, in stack order.
pub(crate) type StackDeltas = HashMap<TensorId, Vec<StackDelta>>;

/// Largest side file copied along (configs, tokenizers).
const MAX_SIDE_FILE: u64 = 64 << 20;

/// Fuses `loras` (each with its strength) into `base` and writes the result to `out`.
pub fn export_fused(
    base: &Model,
    loras: &[(LoraFile, f32)],
    out: &Path,
) -> Result<ExportReport, LoraError> {
    let mut report = ExportReport::default();
    let deltas = stack_deltas(base, loras, &mut report)?;
    report.merged = deltas.len();

    let single = base.kind() == SourceKind::SingleFile;
    for (fi, file) in base.files().iter().enumerate() {
        let dest =
            if single { out.to_path_buf() } else { out.join(relative(base.root(), &file.path)) };
        write_file(base, fi, loras, &deltas, &dest)?;
        report.files.push(dest);
    }
    if !single {
        copy_side_files(base, out, &mut report)?;
    }
    Ok(report)
}

/// Which deltas reach which base tensor, in stack order. Unmatched adapters and unrecognised tensors go into `report`.
pub(crate) fn stack_deltas(
    base: &Model,
    loras: &[(LoraFile, f32)],
    report: &mut ExportReport,
) -> Result<StackDeltas, LoraError> {
    let mut deltas = StackDeltas::new();
    for (li, (lora, strength)) in loras.iter().enumerate() {
        let matched = super::keys::match_to(lora, base)?;
        for m in &matched.matches {
            deltas.entry(m.tensor).or_default().push(StackDelta {
                lora: li,
                adapter: m.adapter,
                strength: *strength,
                rows: m.rows,
            });
        }
        let path = lora.model.root().to_path_buf();
        report.unmatched.push((path.clone(), matched.unmatched));
        report.unrecognised.push((path, lora.unrecognised.clone()));
    }
    Ok(deltas)
}

fn relative(root: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(root).map(Path::to_path_buf).unwrap_or_else(|_| {
        path.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("model.safetensors"))
    })
}

fn io_err(path: &Path, e: std::io::Error) -> LoraError {
    LoraError::Store(crate::store::StoreError::Io { path: path.to_path_buf(), source: e })
}

/// Writes base file `fi` to `dest` with the deltas merged in.
fn write_file(
    base: &Model,
    fi: usize,
    loras: &[(LoraFile, f32)],
    deltas: &StackDeltas,
    dest: &Path,
) -> Result<(), LoraError> {
    let file = &base.files()[fi];
    // The file's tensors in data order: offsets stay exactly as they were.
    let mut ids: Vec<TensorId> =
        (0..base.tensors().len()).filter(|&t| base.tensors()[t].file == fi).collect();
    ids.sort_by_key(|&t| base.tensors()[t].offset);
    let data_start = file.header.data_start;

    let mut header = serde_json::Map::new();
    let mut meta: serde_json::Map<String, serde_json::Value> = file
        .header
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let stack: Vec<String> =
        loras.iter().map(|(l, s)| format!("{}:{s}", l.model.root().display())).collect();
    meta.insert("ferry_fused_loras".into(), serde_json::Value::String(stack.join(";")));
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    for &t in &ids {
        let info = &base.tensors()[t];
        let begin = info.offset - data_start;
        header.insert(
            info.name.clone(),
            serde_json::json!({
                "dtype": info.dtype.as_str(),
                "shape": info.shape,
                "data_offsets": [begin, begin + info.len],
            }),
        );
    }
    let mut json = serde_json::to_string(&serde_json::Value::Object(header))
        .map_err(|e| io_err(dest, std::io::Error::other(e)))?;
    while json.len() % 8 != 0 {
        json.push(' ');
    }

    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    let tmp = dest.with_extension("safetensors.partial");
    let result = (|| {
        let f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut w = BufWriter::with_capacity(8 << 20, f);
        w.write_all(&(json.len() as u64).to_le_bytes()).map_err(|e| io_err(&tmp, e))?;
        w.write_all(json.as_bytes()).map_err(|e| io_err(&tmp, e))?;
        for &t in &ids {
            let info = &base.tensors()[t];
            let bytes = base.tensor_bytes(t).ok_or_else(|| LoraError::NotALora {
                path: file.path.clone(),
                reason: format!("tensor {:?} lies outside its file", info.name),
            })?;
            match deltas.get(&t) {
                None => w.write_all(bytes).map_err(|e| io_err(&tmp, e))?,
                Some(ds) => {
                    let merged = merge_one(base, t, bytes, loras, ds)?;
                    w.write_all(&merged).map_err(|e| io_err(&tmp, e))?;
                }
            }
        }
        w.flush().map_err(|e| io_err(&tmp, e))?;
        w.get_ref().sync_all().map_err(|e| io_err(&tmp, e))?;
        Ok(())
    })();
    match result {
        Ok(()) => fs::rename(&tmp, dest).map_err(|e| io_err(dest, e)),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The merged bytes of base tensor `t` (whose current bytes are `bytes`), given the deltas
/// that reach it.
pub(crate) fn merge_one(
    base: &Model,
    t: TensorId,
    bytes: &[u8],
    loras: &[(LoraFile, f32)],
    ds: &[StackDelta],
) -> Result<Vec<u8>, LoraError> {
    let info = &base.tensors()[t];
    let mut list = Vec::with_capacity(ds.len());
    for d in ds {
        let lora = &loras[d.lora].0;
        let a = &lora.adapters[d.adapter];
        let factor = |id: TensorId| -> Option<Factor<'_>> {
            let ti = lora.model.tensor(id)?;
            Some(Factor { dtype: ti.dtype, shape: &ti.shape, bytes: lora.model.tensor_bytes(id)? })
        };
        let missing = |what: &'static str| LoraError::IncompleteAdapter {
            path: lora.model.root().to_path_buf(),
            adapter: a.name.clone(),
            missing: what,
        };
        let delta = Delta {
            up: factor(a.up).ok_or_else(|| missing("up"))?,
            down: factor(a.down).ok_or_else(|| missing("down"))?,
            mid: match a.mid {
                Some(m) => Some(factor(m).ok_or_else(|| missing("mid"))?),
                None => None,
            },
            scale: math::scale(d.strength, a.alpha, a.rank),
        };
        list.push(Patch { delta, rows: d.rows });
    }
    math::merge_patches(&info.name, Factor { dtype: info.dtype, shape: &info.shape, bytes }, &list)
}

/// Copies the small non-weight files of a folder model (index, model_index.json, configs,
/// tokenizer files) so that the export opens like the original.
fn copy_side_files(base: &Model, out: &Path, report: &mut ExportReport) -> Result<(), LoraError> {
    let root = base.root();
    let root = if root.is_dir() {
        root.to_path_buf()
    } else {
        root.parent().unwrap_or(root).to_path_buf()
    };
    let weights: std::collections::HashSet<&Path> =
        base.files().iter().map(|f| f.path.as_path()).collect();
    let mut dirs = vec![root.clone()];
    dirs.extend(
        fs::read_dir(&root)
            .map_err(|e| io_err(&root, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir()),
    );
    for dir in dirs {
        for entry in fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?.filter_map(Result::ok) {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let is_weights = path.extension().is_some_and(|e| e == "safetensors");
            if !meta.is_file()
                || is_weights
                || weights.contains(path.as_path())
                || meta.len() > MAX_SIDE_FILE
            {
                continue;
            }
            let dest = out.join(relative(&root, &path));
            if let Some(d) = dest.parent() {
                fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
            }
            fs::copy(&path, &dest).map_err(|e| io_err(&dest, e))?;
            report.files.push(dest);
        }
    }
    Ok(())
}
