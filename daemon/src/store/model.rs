//! A mapped model: its files, tensors, components and layers.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::dtype::Dtype;
use super::error::StoreError;
use super::file::{FileIdentity, WeightFile};
use super::header::Limits;
use super::layout::{self, LayerRule};
use super::source::{self, Part, Plan, SourceKind};

/// Index of a tensor in [`Model::tensors`].
pub type TensorId = usize;

/// One tensor of a model.
#[derive(Clone, Debug, Serialize)]
pub struct TensorInfo {
    /// The name as stored in its file.
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Index of its file in [`Model::files`].
    pub file: usize,
    /// Absolute byte offset in that file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index of its component in [`Model::components`].
    pub component: usize,
    /// Index of its layer in that component's [`Component::layers`].
    pub layer: usize,
}

/// A unit of streaming: tensors that run together.
#[derive(Clone, Debug, Serialize)]
pub struct Layer {
    /// The layer's name (a prefix of its tensors' local names).
    pub name: String,
    /// Tensors, in header order.
    pub tensors: Vec<TensorId>,
    /// Sum of the tensors' lengths.
    pub bytes: u64,
}

/// A named part of a model that runs as a unit (`unet`, `text_encoder`, `vae`, ...).
#[derive(Clone, Debug, Serialize)]
pub struct Component {
    pub name: String,
    /// The key prefix its tensors carry in a single-file checkpoint (`""` otherwise).
    pub prefix: String,
    /// Layers in streaming order.
    pub layers: Vec<Layer>,
    pub bytes: u64,
    /// The component's tensors sorted by name, for lookups.
    #[serde(skip)]
    by_name: Vec<TensorId>,
}

impl Component {
    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.by_name.len()
    }
}

/// The identity of a model: the identities of its files, in order. Opening the same files again
/// (by any path) yields the same key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ModelKey {
    pub kind: SourceKind,
    pub files: Vec<FileIdentity>,
}

impl ModelKey {
    /// A short stable id for logs and tables (FNV-1a over the key).
    pub fn short_id(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&[self.kind as u8]);
        for f in &self.files {
            eat(&f.dev.to_le_bytes());
            eat(&f.ino.to_le_bytes());
            eat(&f.size.to_le_bytes());
            eat(&f.mtime_ns.to_le_bytes());
        }
        format!("{h:016x}")
    }
}

/// An open model. Weight bytes stay in the page cache behind read-only mappings; nothing here
/// copies them.
#[derive(Debug)]
pub struct Model {
    key: ModelKey,
    kind: SourceKind,
    root: PathBuf,
    files: Vec<WeightFile>,
    tensors: Vec<TensorInfo>,
    components: Vec<Component>,
}

impl Model {
    /// Opens the model at `path` (a file, an index, or a folder) with default limits, without the
    /// sharing a [`super::Store`] gives.
    pub fn open(path: impl AsRef<Path>) -> Result<Model, StoreError> {
        let plan = source::resolve(path.as_ref())?;
        Model::build(plan, &Limits::default())
    }

    pub(crate) fn key_of(plan: &Plan) -> ModelKey {
        ModelKey {
            kind: plan.kind,
            files: plan.parts.iter().flat_map(|p| p.files.iter().map(|f| f.identity)).collect(),
        }
    }

    pub(crate) fn build(plan: Plan, limits: &Limits) -> Result<Model, StoreError> {
        let key = Model::key_of(&plan);
        let Plan { kind, root, parts } = plan;
        let mut files = Vec::new();
        // (component name for diffusers parts, tensors) before component assignment.
        let mut groups: Vec<(Option<String>, Vec<TensorInfo>)> = Vec::new();
        for part in parts {
            let (component, tensors) = map_part(part, limits, &mut files)?;
            groups.push((component, tensors));
        }

        let mut tensors = Vec::new();
        let mut components = Vec::new();
        for (component, part_tensors) in groups {
            match component {
                Some(name) => {
                    components.push((
                        name,
                        String::new(),
                        tensors.len()..tensors.len() + part_tensors.len(),
                    ));
                    tensors.extend(part_tensors);
                }
                None => split_checkpoint(part_tensors, &mut tensors, &mut components),
            }
        }

        let mut built = Vec::with_capacity(components.len());
        for (ci, (name, prefix, range)) in components.into_iter().enumerate() {
            let ids: Vec<TensorId> = range.collect();
            built.push(
                make_component(ci, name, prefix, &ids, &mut tensors, &LayerRule::Auto).map_err(
                    |(component, prefix)| StoreError::EmptyLayerPrefix {
                        path: root.clone(),
                        component,
                        prefix,
                    },
                )?,
            );
        }
        // Pipeline order: text encoders, the backbone, the VAE, anything else.
        let mut order: Vec<usize> = (0..built.len()).collect();
        order.sort_by(|&a, &b| {
            let (na, nb) = (&built[a].name, &built[b].name);
            component_rank(na).cmp(&component_rank(nb)).then_with(|| layout::natural_cmp(na, nb))
        });
        let mut remap = vec![0; built.len()];
        for (new, &old) in order.iter().enumerate() {
            remap[old] = new;
        }
        for t in &mut tensors {
            t.component = remap[t.component];
        }
        let mut slots: Vec<Option<Component>> = built.into_iter().map(Some).collect();
        let components = order.iter().filter_map(|&old| slots[old].take()).collect();
        Ok(Model { key, kind, root, files, tensors, components })
    }

    /// The model's identity.
    pub fn key(&self) -> &ModelKey {
        &self.key
    }

    pub fn kind(&self) -> SourceKind {
        self.kind
    }

    /// The canonical path the model was opened by.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn files(&self) -> &[WeightFile] {
        &self.files
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, id: TensorId) -> Option<&TensorInfo> {
        self.tensors.get(id)
    }

    pub fn components(&self) -> &[Component] {
        &self.components
    }

    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// A tensor of `component` by its local name (the checkpoint prefix removed).
    pub fn find(&self, component: &str, local_name: &str) -> Option<TensorId> {
        let c = self.component(component)?;
        let i = c
            .by_name
            .binary_search_by(|&t| strip(&self.tensors[t].name, &c.prefix).cmp(local_name))
            .ok()?;
        Some(c.by_name[i])
    }

    /// A tensor's name within its component (the checkpoint prefix removed).
    pub fn local_name(&self, id: TensorId) -> Option<&str> {
        let t = self.tensors.get(id)?;
        let prefix = &self.components.get(t.component)?.prefix;
        t.name.get(prefix.len()..)
    }

    /// The tensor's bytes, read in place from the mapping (zero-copy).
    ///
    /// If the file is truncated by another process while mapped, touching these bytes raises
    /// SIGBUS; the streaming engine reads through its guarded copy path instead.
    pub fn tensor_bytes(&self, id: TensorId) -> Option<&[u8]> {
        let t = self.tensors.get(id)?;
        self.files.get(t.file)?.range(t.offset, t.len)
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.components.iter().map(|c| c.bytes).sum()
    }

    /// The layers `component` would have under `rule`, without changing the model.
    pub fn layers_with(&self, component: &str, rule: &LayerRule) -> Result<Vec<Layer>, StoreError> {
        let c = self.component(component).ok_or_else(|| StoreError::UnknownComponent {
            path: self.root.clone(),
            component: component.to_string(),
        })?;
        let mut ids: Vec<TensorId> =
            c.layers.iter().flat_map(|l| l.tensors.iter().copied()).collect();
        ids.sort_unstable();
        let names: Vec<&str> =
            ids.iter().map(|&i| strip(&self.tensors[i].name, &c.prefix)).collect();
        let groups =
            layout::group(&names, rule).map_err(|prefix| StoreError::EmptyLayerPrefix {
                path: self.root.clone(),
                component: component.to_string(),
                prefix,
            })?;
        Ok(groups
            .into_iter()
            .map(|(name, members)| {
                let tensors: Vec<TensorId> = members.iter().map(|&m| ids[m]).collect();
                let bytes = tensors.iter().map(|&t| self.tensors[t].len).sum();
                Layer { name, tensors, bytes }
            })
            .collect())
    }
}

fn component_rank(name: &str) -> u8 {
    match name {
        n if n.starts_with("text_encoder") => 0,
        "unet" | "transformer" | "prior" | "controlnet" => 1,
        "vae" => 2,
        "extra" => 4,
        _ => 3,
    }
}

/// Maps a part's files and returns its tensors (file indices into `files`).
fn map_part(
    part: Part,
    limits: &Limits,
    files: &mut Vec<WeightFile>,
) -> Result<(Option<String>, Vec<TensorInfo>), StoreError> {
    let base = files.len();
    let mut tensors = Vec::new();
    for opened in part.files {
        let mut wf = opened.map(limits)?;
        let file = files.len();
        tensors.extend(std::mem::take(&mut wf.header.tensors).into_iter().map(|t| TensorInfo {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            file,
            offset: t.offset,
            len: t.len,
            component: 0,
            layer: 0,
        }));
        files.push(wf);
    }
    let Some((index, map)) = &part.index else {
        return Ok((part.component, tensors));
    };
    // Shards of one set: no tensor in two of them, and each where the index says.
    let mut by_name: Vec<&TensorInfo> = tensors.iter().collect();
    by_name.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = by_name.windows(2).find(|w| w[0].name == w[1].name) {
        let (first, second) = if w[0].file < w[1].file { (w[0], w[1]) } else { (w[1], w[0]) };
        return Err(StoreError::TensorInTwoShards {
            index: index.clone(),
            tensor: first.name.clone(),
            first: file_name(&files[first.file].path),
            second: file_name(&files[second.file].path),
        });
    }
    for (tensor, pos) in map {
        let found =
            by_name.binary_search_by(|t| t.name.as_str().cmp(tensor)).ok().map(|i| by_name[i].file);
        if found != Some(base + pos) {
            return Err(StoreError::IndexedTensorMissing {
                index: index.clone(),
                tensor: tensor.clone(),
                shard: file_name(&files[base + pos].path),
            });
        }
    }
    Ok((part.component, tensors))
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

type ComponentPlan = (String, String, std::ops::Range<usize>);

/// Splits one file's (or sharded set's) tensors into components by checkpoint prefix, appending
/// them to `out` grouped so that each component is a contiguous range.
fn split_checkpoint(
    part: Vec<TensorInfo>,
    out: &mut Vec<TensorInfo>,
    comps: &mut Vec<ComponentPlan>,
) {
    let assigned: Vec<Option<(String, usize)>> =
        part.iter().map(|t| layout::checkpoint_component(&t.name)).collect();
    if assigned.iter().all(Option::is_none) {
        comps.push(("model".to_string(), String::new(), out.len()..out.len() + part.len()));
        out.extend(part);
        return;
    }
    // (component, prefix) in first-seen order. Two prefixes that name the same component
    // (`cond_stage_model.` and `text_encoders.clip_l.` are both `text_encoder`) stay apart: the
    // second takes its prefix as its name, so component names stay unique and every member of
    // a component carries its prefix.
    let mut names: Vec<(String, String)> = Vec::new();
    let mut member: Vec<usize> = Vec::with_capacity(part.len());
    for (t, a) in part.iter().zip(&assigned) {
        let (name, prefix) = match a {
            Some((c, n)) => (c.clone(), t.name.get(..*n).unwrap_or_default().to_string()),
            None => ("extra".to_string(), String::new()),
        };
        let idx = match names.iter().position(|(_, p)| *p == prefix) {
            Some(i) => i,
            None => {
                let name = if names.iter().any(|(c, _)| *c == name) {
                    prefix.trim_end_matches('.').to_string()
                } else {
                    name
                };
                names.push((name, prefix));
                names.len() - 1
            }
        };
        member.push(idx);
    }
    for (ci, (name, prefix)) in names.into_iter().enumerate() {
        let start = out.len();
        out.extend(part.iter().zip(&member).filter(|(_, m)| **m == ci).map(|(t, _)| t.clone()));
        let range = start..out.len();
        let name =
            if name == "unet" { backbone(&out[range.clone()], &prefix).to_string() } else { name };
        comps.push((name, prefix, range));
    }
}

fn backbone(tensors: &[TensorInfo], prefix: &str) -> &'static str {
    layout::backbone_name(tensors.iter().map(|t| strip(&t.name, prefix)))
}

/// A tensor's local name: its name without its component's prefix. Every tensor of a component
/// starts with the component's prefix; should that ever not hold, the full name is returned
/// rather than a panic.
fn strip<'a>(name: &'a str, prefix: &str) -> &'a str {
    name.strip_prefix(prefix).unwrap_or(name)
}

/// Builds component `ci` over tensors `ids`, setting each tensor's component and layer.
fn make_component(
    ci: usize,
    name: String,
    prefix: String,
    ids: &[TensorId],
    tensors: &mut [TensorInfo],
    rule: &LayerRule,
) -> Result<Component, (String, String)> {
    let names: Vec<&str> = ids.iter().map(|&i| strip(&tensors[i].name, &prefix)).collect();
    let mut by_name = ids.to_vec();
    by_name.sort_unstable_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
    let groups = layout::group(&names, rule).map_err(|p| (name.clone(), p))?;
    let mut layers = Vec::with_capacity(groups.len());
    let mut bytes = 0;
    for (li, (lname, members)) in groups.into_iter().enumerate() {
        let ids: Vec<TensorId> = members.iter().map(|&m| ids[m]).collect();
        let mut lbytes = 0u64;
        for &t in &ids {
            tensors[t].component = ci;
            tensors[t].layer = li;
            lbytes += tensors[t].len;
        }
        bytes += lbytes;
        layers.push(Layer { name: lname, tensors: ids, bytes: lbytes });
    }
    Ok(Component { name, prefix, layers, bytes, by_name })
}
