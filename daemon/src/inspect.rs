//! `ferryctl inspect`: a model described as components, layers and tensors.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use crate::store::{Model, SourceKind};
use crate::units;

/// What `inspect` reports, serialised as is for `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub path: String,
    pub id: String,
    pub kind: SourceKind,
    pub files: Vec<FileReport>,
    pub total_bytes: u64,
    pub tensor_count: usize,
    pub components: Vec<ComponentReport>,
    /// Every tensor, only with `--tensors`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<TensorReport>>,
}

#[derive(Debug, Serialize)]
pub struct FileReport {
    pub path: String,
    pub bytes: u64,
    pub header_bytes: u64,
    pub tensors: usize,
}

#[derive(Debug, Serialize)]
pub struct ComponentReport {
    pub name: String,
    pub prefix: String,
    pub bytes: u64,
    pub tensor_count: usize,
    pub dtypes: Vec<String>,
    pub layers: Vec<LayerReport>,
}

#[derive(Debug, Serialize)]
pub struct LayerReport {
    pub index: usize,
    pub name: String,
    pub tensors: usize,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct TensorReport {
    pub component: String,
    pub layer: String,
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub file: String,
    pub offset: u64,
    pub bytes: u64,
}

/// Describes `model`; with `tensors`, lists every tensor too.
pub fn report(model: &Model, tensors: bool) -> Report {
    let files = model
        .files()
        .iter()
        .map(|f| FileReport {
            path: f.path.display().to_string(),
            bytes: f.len(),
            header_bytes: f.header.header_len,
            tensors: f.tensor_count,
        })
        .collect();
    let components = model
        .components()
        .iter()
        .map(|c| {
            let dtypes: BTreeSet<&str> = c
                .layers
                .iter()
                .flat_map(|l| l.tensors.iter())
                .filter_map(|&t| model.tensor(t))
                .map(|t| t.dtype.as_str())
                .collect();
            ComponentReport {
                name: c.name.clone(),
                prefix: c.prefix.clone(),
                bytes: c.bytes,
                tensor_count: c.tensor_count(),
                dtypes: dtypes.into_iter().map(str::to_string).collect(),
                layers: c
                    .layers
                    .iter()
                    .enumerate()
                    .map(|(index, l)| LayerReport {
                        index,
                        name: l.name.clone(),
                        tensors: l.tensors.len(),
                        bytes: l.bytes,
                    })
                    .collect(),
            }
        })
        .collect();
    let tensors = tensors.then(|| {
        model
            .components()
            .iter()
            .flat_map(|c| {
                c.layers.iter().flat_map(move |l| l.tensors.iter().map(move |&t| (c, l, t)))
            })
            .filter_map(|(c, l, id)| {
                let t = model.tensor(id)?;
                let file = model.files().get(t.file)?;
                Some(TensorReport {
                    component: c.name.clone(),
                    layer: l.name.clone(),
                    name: t.name.clone(),
                    dtype: t.dtype.to_string(),
                    shape: t.shape.clone(),
                    file: file.path.display().to_string(),
                    offset: t.offset,
                    bytes: t.len,
                })
            })
            .collect()
    });
    Report {
        path: model.root().display().to_string(),
        id: model.key().short_id(),
        kind: model.kind(),
        files,
        total_bytes: model.total_bytes(),
        tensor_count: model.tensors().len(),
        components,
        tensors,
    }
}

/// Renders a report as the human table `ferryctl inspect` prints.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let kind = match r.kind {
        SourceKind::SingleFile => "single file",
        SourceKind::Sharded => "sharded",
        SourceKind::Diffusers => "diffusers pipeline",
    };
    let _ = writeln!(out, "model   {}", r.path);
    let _ = writeln!(
        out,
        "layout  {kind}, {} file{}, id {}",
        r.files.len(),
        if r.files.len() == 1 { "" } else { "s" },
        r.id
    );
    let _ = writeln!(out, "total   {} tensors, {}", r.tensor_count, units::bytes(r.total_bytes));
    let _ = writeln!(out);
    let name_w = r.components.iter().map(|c| c.name.len()).max().unwrap_or(0).max(9);
    let _ = writeln!(
        out,
        "{:<name_w$}  {:>6}  {:>7}  {:>10}  {:<16}  prefix",
        "component", "layers", "tensors", "bytes", "dtypes"
    );
    for c in &r.components {
        let _ = writeln!(
            out,
            "{:<name_w$}  {:>6}  {:>7}  {:>10}  {:<16}  {}",
            c.name,
            c.layers.len(),
            c.tensor_count,
            units::bytes(c.bytes),
            c.dtypes.join(","),
            if c.prefix.is_empty() { "-" } else { &c.prefix }
        );
    }
    for c in &r.components {
        let _ = writeln!(out);
        let _ = writeln!(out, "{} ({} layers)", c.name, c.layers.len());
        let w = c.layers.iter().map(|l| l.name.len()).max().unwrap_or(0).max(5);
        let _ = writeln!(out, "  {:>4}  {:<w$}  {:>7}  {:>10}", "#", "layer", "tensors", "bytes");
        for l in &c.layers {
            let _ = writeln!(
                out,
                "  {:>4}  {:<w$}  {:>7}  {:>10}",
                l.index,
                l.name,
                l.tensors,
                units::bytes(l.bytes)
            );
        }
    }
    if let Some(tensors) = &r.tensors {
        let _ = writeln!(out);
        let w = tensors.iter().map(|t| t.name.len()).max().unwrap_or(0).max(6);
        let _ = writeln!(
            out,
            "{:<w$}  {:<11}  {:<20}  {:>12}  {:>10}  layer",
            "tensor", "dtype", "shape", "offset", "bytes"
        );
        for t in tensors {
            let shape = format!("{:?}", t.shape);
            let _ = writeln!(
                out,
                "{:<w$}  {:<11}  {:<20}  {:>12}  {:>10}  {}/{}",
                t.name, t.dtype, shape, t.offset, t.bytes, t.component, t.layer
            );
        }
    }
    out
}
