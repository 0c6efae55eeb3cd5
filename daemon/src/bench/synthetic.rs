//! Synthetic models shaped like real ones, and LoRAs for any model, for `ferryctl bench`.
//!
//! Each [`Arch`] lists the tensors of the real architecture, by their real names (diffusers and
//! transformers layouts) and shapes, with every width (channels, hidden sizes, vocabularies)
//! divided by a *scale*: the tensor and layer counts, the layer grouping and the relative sizes
//! stay those of the real model, and the bytes shrink by about the square of the scale.
//!
//! | arch | layout | real size (scale 1) |
//! | --- | --- | --- |
//! | `sdxl` | diffusers folder: `text_encoder` (CLIP-L), `text_encoder_2` (OpenCLIP bigG), `unet`, `vae`; f16 | 6.9 GB |
//! | `flux` | diffusers folder: `text_encoder` (CLIP-L), `text_encoder_2` (T5-XXL, 2 shards), `transformer` (19 double + 38 single blocks, 3 shards), `vae`; bf16 | 33.7 GB |
//! | `llm-7b` | a sharded checkpoint (Llama-2-7B: 32 decoder layers), 2 shards and an index; f16 | 13.5 GB |
//!
//! Tensor bytes are deterministic pseudo-random values of small magnitude (finite, so LoRA
//! merges stay finite). Files are written with ferry's own streaming writer (a header, then the
//! data, no tensor held in memory), in a temporary folder renamed into place once complete, so
//! an interrupted run never leaves a half-written model that a later run would reuse.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::engine::EngineError;
use crate::store::{Dtype, Model};

/// The architectures a synthetic model can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// Stable Diffusion XL (diffusers layout).
    Sdxl,
    /// FLUX.1 (diffusers layout).
    Flux,
    /// A 7B decoder-only LLM (Llama-2-7B shapes, sharded).
    #[value(name = "llm-7b")]
    #[serde(rename = "llm-7b")]
    Llm7b,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sdxl => "sdxl",
            Arch::Flux => "flux",
            Arch::Llm7b => "llm-7b",
        }
    }
}

/// One tensor of a synthetic model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn bytes(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product::<u64>() * self.dtype.bits() / 8
    }
}

/// One component (or, for a checkpoint, the whole model): its folder, file stem, shard count.
#[derive(Clone, Debug)]
pub struct ComponentSpec {
    /// Folder inside the model (`unet`), or `""` for a checkpoint's root.
    pub folder: &'static str,
    /// `diffusion_pytorch_model` or `model`.
    pub stem: &'static str,
    pub shards: usize,
    /// The `model_index.json` entry (`["diffusers", "UNet2DConditionModel"]`), if any.
    pub class: Option<(&'static str, &'static str)>,
    pub tensors: Vec<TensorSpec>,
}

/// Builds tensor lists with widths divided by the scale.
struct B {
    scale: usize,
    dtype: Dtype,
    out: Vec<TensorSpec>,
}

impl B {
    fn new(scale: usize, dtype: Dtype) -> B {
        B { scale: scale.max(1), dtype, out: Vec::new() }
    }

    /// A real width, scaled (rounded, at least 1).
    fn d(&self, real: usize) -> usize {
        ((real + self.scale / 2) / self.scale).max(1)
    }

    fn t(&mut self, name: String, shape: &[usize]) {
        self.out.push(TensorSpec { name, dtype: self.dtype, shape: shape.to_vec() });
    }

    /// `{p}.weight` [out, inp] and, with `bias`, `{p}.bias` [out] (already scaled widths).
    fn linear(&mut self, p: &str, out: usize, inp: usize, bias: bool) {
        self.t(format!("{p}.weight"), &[out, inp]);
        if bias {
            self.t(format!("{p}.bias"), &[out]);
        }
    }

    fn conv(&mut self, p: &str, out: usize, inp: usize, k: usize) {
        self.t(format!("{p}.weight"), &[out, inp, k, k]);
        self.t(format!("{p}.bias"), &[out]);
    }

    fn norm(&mut self, p: &str, c: usize) {
        self.t(format!("{p}.weight"), &[c]);
        self.t(format!("{p}.bias"), &[c]);
    }

    /// A diffusers ResnetBlock2D; `temb` is the time embedding width (UNet) or `None` (VAE).
    fn resnet(&mut self, p: &str, cin: usize, cout: usize, temb: Option<usize>) {
        self.norm(&format!("{p}.norm1"), cin);
        self.conv(&format!("{p}.conv1"), cout, cin, 3);
        if let Some(t) = temb {
            self.linear(&format!("{p}.time_emb_proj"), cout, t, true);
        }
        self.norm(&format!("{p}.norm2"), cout);
        self.conv(&format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            self.conv(&format!("{p}.conv_shortcut"), cout, cin, 1);
        }
    }

    /// A diffusers Transformer2DModel (SDXL: linear projections), `depth` blocks.
    fn transformer2d(&mut self, p: &str, c: usize, depth: usize, cross: usize) {
        self.norm(&format!("{p}.norm"), c);
        self.linear(&format!("{p}.proj_in"), c, c, true);
        for k in 0..depth {
            let q = format!("{p}.transformer_blocks.{k}");
            self.norm(&format!("{q}.norm1"), c);
            for (attn, kv) in [("attn1", c), ("attn2", cross)] {
                self.linear(&format!("{q}.{attn}.to_q"), c, c, false);
                self.linear(&format!("{q}.{attn}.to_k"), c, kv, false);
                self.linear(&format!("{q}.{attn}.to_v"), c, kv, false);
                self.linear(&format!("{q}.{attn}.to_out.0"), c, c, true);
                if attn == "attn1" {
                    self.norm(&format!("{q}.norm2"), c);
                }
            }
            self.norm(&format!("{q}.norm3"), c);
            self.linear(&format!("{q}.ff.net.0.proj"), 8 * c, c, true);
            self.linear(&format!("{q}.ff.net.2"), c, 4 * c, true);
        }
        self.linear(&format!("{p}.proj_out"), c, c, true);
    }

    /// A CLIP text transformer (`text_model.`), `layers` layers of width `h`, MLP `m`.
    fn clip_text(&mut self, h: usize, layers: usize, m: usize, vocab: usize) {
        self.t("text_model.embeddings.token_embedding.weight".into(), &[vocab, h]);
        self.t("text_model.embeddings.position_embedding.weight".into(), &[77, h]);
        for l in 0..layers {
            let p = format!("text_model.encoder.layers.{l}");
            for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
                self.linear(&format!("{p}.self_attn.{proj}"), h, h, true);
            }
            self.norm(&format!("{p}.layer_norm1"), h);
            self.linear(&format!("{p}.mlp.fc1"), m, h, true);
            self.linear(&format!("{p}.mlp.fc2"), h, m, true);
            self.norm(&format!("{p}.layer_norm2"), h);
        }
        self.norm("text_model.final_layer_norm", h);
    }

    /// A diffusers AutoencoderKL with block widths 128, 256, 512, 512 and `latent` channels.
    fn vae(&mut self, latent: usize, quant_conv: bool) {
        let ch = [self.d(128), self.d(256), self.d(512), self.d(512)];
        self.conv("encoder.conv_in", ch[0], 3, 3);
        let mut prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            self.resnet(&format!("encoder.down_blocks.{i}.resnets.0"), prev, c, None);
            self.resnet(&format!("encoder.down_blocks.{i}.resnets.1"), c, c, None);
            if i < 3 {
                self.conv(&format!("encoder.down_blocks.{i}.downsamplers.0.conv"), c, c, 3);
            }
            prev = c;
        }
        let top = ch[3];
        for side in ["encoder", "decoder"] {
            if side == "decoder" {
                self.conv("decoder.conv_in", top, latent, 3);
            }
            self.resnet(&format!("{side}.mid_block.resnets.0"), top, top, None);
            self.norm(&format!("{side}.mid_block.attentions.0.group_norm"), top);
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                self.linear(&format!("{side}.mid_block.attentions.0.{proj}"), top, top, true);
            }
            self.resnet(&format!("{side}.mid_block.resnets.1"), top, top, None);
            if side == "encoder" {
                self.norm("encoder.conv_norm_out", top);
                self.conv("encoder.conv_out", 2 * latent, top, 3);
            }
        }
        if quant_conv {
            self.conv("quant_conv", 2 * latent, 2 * latent, 1);
            self.conv("post_quant_conv", latent, latent, 1);
        }
        let mut prev = top;
        for (i, &c) in ch.iter().rev().enumerate() {
            for r in 0..3 {
                let cin = if r == 0 { prev } else { c };
                self.resnet(&format!("decoder.up_blocks.{i}.resnets.{r}"), cin, c, None);
            }
            if i < 3 {
                self.conv(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), c, c, 3);
            }
            prev = c;
        }
        self.norm("decoder.conv_norm_out", ch[0]);
        self.conv("decoder.conv_out", 3, ch[0], 3);
    }
}

fn sdxl_unet(scale: usize) -> Vec<TensorSpec> {
    let mut b = B::new(scale, Dtype::F16);
    let ch = [b.d(320), b.d(640), b.d(1280)];
    let temb = b.d(1280);
    let cross = b.d(2048);
    let depth = [0, 2, 10];
    b.conv("conv_in", ch[0], 4, 3);
    b.linear("time_embedding.linear_1", temb, ch[0], true);
    b.linear("time_embedding.linear_2", temb, temb, true);
    b.linear("add_embedding.linear_1", temb, b.d(2816), true);
    b.linear("add_embedding.linear_2", temb, temb, true);
    let mut prev = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        for r in 0..2 {
            let cin = if r == 0 { prev } else { c };
            b.resnet(&format!("down_blocks.{i}.resnets.{r}"), cin, c, Some(temb));
            if depth[i] > 0 {
                b.transformer2d(&format!("down_blocks.{i}.attentions.{r}"), c, depth[i], cross);
            }
        }
        if i < 2 {
            b.conv(&format!("down_blocks.{i}.downsamplers.0.conv"), c, c, 3);
        }
        prev = c;
    }
    b.resnet("mid_block.resnets.0", ch[2], ch[2], Some(temb));
    b.transformer2d("mid_block.attentions.0", ch[2], 10, cross);
    b.resnet("mid_block.resnets.1", ch[2], ch[2], Some(temb));
    // Up blocks: widths reversed, three resnets each taking a skip connection.
    let skips = [[ch[2], ch[2], ch[1]], [ch[1], ch[1], ch[0]], [ch[0], ch[0], ch[0]]];
    let mut prev = ch[2];
    for (i, &c) in ch.iter().rev().enumerate() {
        let d = depth[2 - i];
        for (r, skip) in skips[i].iter().enumerate() {
            let cin = if r == 0 { prev } else { c };
            b.resnet(&format!("up_blocks.{i}.resnets.{r}"), cin + skip, c, Some(temb));
            if d > 0 {
                b.transformer2d(&format!("up_blocks.{i}.attentions.{r}"), c, d, cross);
            }
        }
        if i < 2 {
            b.conv(&format!("up_blocks.{i}.upsamplers.0.conv"), c, c, 3);
        }
        prev = c;
    }
    b.norm("conv_norm_out", ch[0]);
    b.conv("conv_out", 4, ch[0], 3);
    b.out
}

fn clip(
    scale: usize,
    dtype: Dtype,
    h: usize,
    layers: usize,
    m: usize,
    proj: bool,
) -> Vec<TensorSpec> {
    let mut b = B::new(scale, dtype);
    let (h, m, v) = (b.d(h), b.d(m), b.d(49408));
    b.clip_text(h, layers, m, v);
    if proj {
        b.linear("text_projection", h, h, false);
    }
    b.out
}

fn vae(scale: usize, dtype: Dtype, latent: usize, quant_conv: bool) -> Vec<TensorSpec> {
    let mut b = B::new(scale, dtype);
    b.vae(latent, quant_conv);
    b.out
}

fn flux_transformer(scale: usize) -> Vec<TensorSpec> {
    let mut b = B::new(scale, Dtype::BF16);
    let (d, head) = (b.d(3072), b.d(128));
    let (t5, pooled) = (b.d(4096), b.d(768));
    b.linear("x_embedder", d, 64, true);
    b.linear("context_embedder", d, t5, true);
    for (emb, inp) in
        [("timestep_embedder", 256), ("guidance_embedder", 256), ("text_embedder", pooled)]
    {
        b.linear(&format!("time_text_embed.{emb}.linear_1"), d, inp, true);
        b.linear(&format!("time_text_embed.{emb}.linear_2"), d, d, true);
    }
    for i in 0..19 {
        let p = format!("transformer_blocks.{i}");
        b.linear(&format!("{p}.norm1.linear"), 6 * d, d, true);
        b.linear(&format!("{p}.norm1_context.linear"), 6 * d, d, true);
        for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            b.t(format!("{p}.attn.{n}.weight"), &[head]);
        }
        for proj in ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"] {
            b.linear(&format!("{p}.attn.{proj}"), d, d, true);
        }
        b.linear(&format!("{p}.attn.to_out.0"), d, d, true);
        b.linear(&format!("{p}.attn.to_add_out"), d, d, true);
        for ff in ["ff", "ff_context"] {
            b.linear(&format!("{p}.{ff}.net.0.proj"), 4 * d, d, true);
            b.linear(&format!("{p}.{ff}.net.2"), d, 4 * d, true);
        }
    }
    for i in 0..38 {
        let p = format!("single_transformer_blocks.{i}");
        b.linear(&format!("{p}.norm.linear"), 3 * d, d, true);
        b.linear(&format!("{p}.proj_mlp"), 4 * d, d, true);
        b.linear(&format!("{p}.proj_out"), d, 5 * d, true);
        for n in ["norm_q", "norm_k"] {
            b.t(format!("{p}.attn.{n}.weight"), &[head]);
        }
        for proj in ["to_q", "to_k", "to_v"] {
            b.linear(&format!("{p}.attn.{proj}"), d, d, true);
        }
    }
    b.linear("norm_out.linear", 2 * d, d, true);
    b.linear("proj_out", 64, d, true);
    b.out
}

fn t5_xxl(scale: usize) -> Vec<TensorSpec> {
    let mut b = B::new(scale, Dtype::BF16);
    let (d, ff, v) = (b.d(4096), b.d(10240), b.d(32128));
    b.t("shared.weight".into(), &[v, d]);
    for i in 0..24 {
        let p = format!("encoder.block.{i}.layer");
        for w in ["q", "k", "v", "o"] {
            b.linear(&format!("{p}.0.SelfAttention.{w}"), d, d, false);
        }
        if i == 0 {
            b.t(format!("{p}.0.SelfAttention.relative_attention_bias.weight"), &[32, b.d(64)]);
        }
        b.t(format!("{p}.0.layer_norm.weight"), &[d]);
        b.linear(&format!("{p}.1.DenseReluDense.wi_0"), ff, d, false);
        b.linear(&format!("{p}.1.DenseReluDense.wi_1"), ff, d, false);
        b.linear(&format!("{p}.1.DenseReluDense.wo"), d, ff, false);
        b.t(format!("{p}.1.layer_norm.weight"), &[d]);
    }
    b.t("encoder.final_layer_norm.weight".into(), &[d]);
    b.out
}

fn llama_7b(scale: usize) -> Vec<TensorSpec> {
    let mut b = B::new(scale, Dtype::F16);
    let (h, ff, v) = (b.d(4096), b.d(11008), b.d(32000));
    b.t("model.embed_tokens.weight".into(), &[v, h]);
    for l in 0..32 {
        let p = format!("model.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            b.linear(&format!("{p}.self_attn.{proj}"), h, h, false);
        }
        b.linear(&format!("{p}.mlp.gate_proj"), ff, h, false);
        b.linear(&format!("{p}.mlp.up_proj"), ff, h, false);
        b.linear(&format!("{p}.mlp.down_proj"), h, ff, false);
        b.t(format!("{p}.input_layernorm.weight"), &[h]);
        b.t(format!("{p}.post_attention_layernorm.weight"), &[h]);
    }
    b.t("model.norm.weight".into(), &[h]);
    b.t("lm_head.weight".into(), &[v, h]);
    b.out
}

/// The components of `arch` at `scale`, in pipeline order.
pub fn components(arch: Arch, scale: usize) -> Vec<ComponentSpec> {
    let c = |folder, stem, shards, class, tensors| ComponentSpec {
        folder,
        stem,
        shards,
        class: Some(class),
        tensors,
    };
    const TF: &str = "transformers";
    const DF: &str = "diffusers";
    match arch {
        Arch::Sdxl => vec![
            c(
                "text_encoder",
                "model",
                1,
                (TF, "CLIPTextModel"),
                clip(scale, Dtype::F16, 768, 12, 3072, false),
            ),
            c(
                "text_encoder_2",
                "model",
                1,
                (TF, "CLIPTextModelWithProjection"),
                clip(scale, Dtype::F16, 1280, 32, 5120, true),
            ),
            c("unet", "diffusion_pytorch_model", 1, (DF, "UNet2DConditionModel"), sdxl_unet(scale)),
            c(
                "vae",
                "diffusion_pytorch_model",
                1,
                (DF, "AutoencoderKL"),
                vae(scale, Dtype::F16, 4, true),
            ),
        ],
        Arch::Flux => vec![
            c(
                "text_encoder",
                "model",
                1,
                (TF, "CLIPTextModel"),
                clip(scale, Dtype::BF16, 768, 12, 3072, false),
            ),
            c("text_encoder_2", "model", 2, (TF, "T5EncoderModel"), t5_xxl(scale)),
            c(
                "transformer",
                "diffusion_pytorch_model",
                3,
                (DF, "FluxTransformer2DModel"),
                flux_transformer(scale),
            ),
            c(
                "vae",
                "diffusion_pytorch_model",
                1,
                (DF, "AutoencoderKL"),
                vae(scale, Dtype::BF16, 16, false),
            ),
        ],
        Arch::Llm7b => vec![ComponentSpec {
            folder: "",
            stem: "model",
            shards: 2,
            class: None,
            tensors: llama_7b(scale),
        }],
    }
}

/// Total tensor bytes of `arch` at `scale` (without writing anything).
pub fn total_bytes(arch: Arch, scale: usize) -> u64 {
    components(arch, scale).iter().flat_map(|c| &c.tensors).map(TensorSpec::bytes).sum()
}

fn io_err(what: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::Config(format!("writing the synthetic model {}: {e}", what.display()))
}

/// Writes the synthetic model under `dir` (reusing it when a complete one is there) and returns
/// the path to open: the diffusers folder, or the checkpoint's index.
pub fn write(dir: &Path, arch: Arch, scale: usize) -> Result<PathBuf, EngineError> {
    if scale == 0 {
        return Err(EngineError::Config("the synthetic model's scale must be at least 1".into()));
    }
    let root = dir.join(format!("ferry-synthetic-{}-scale{scale}", arch.name()));
    let open_path = |root: &Path| match arch {
        Arch::Llm7b => root.join("model.safetensors.index.json"),
        _ => root.to_path_buf(),
    };
    if root.join(".complete").exists() {
        return Ok(open_path(&root));
    }
    let tmp = dir.join(format!(
        ".ferry-synthetic-{}-scale{scale}.tmp{}",
        arch.name(),
        std::process::id()
    ));
    let err = io_err(&tmp);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(&err)?;
    }
    std::fs::create_dir_all(&tmp).map_err(&err)?;
    let comps = components(arch, scale);
    let mut index = serde_json::Map::new();
    match arch {
        Arch::Sdxl => index.insert("_class_name".into(), "StableDiffusionXLPipeline".into()),
        Arch::Flux => index.insert("_class_name".into(), "FluxPipeline".into()),
        Arch::Llm7b => None,
    };
    index.insert("_diffusers_version".into(), "0.30.0".into());
    let mut seed = 0u64;
    for comp in &comps {
        let folder = tmp.join(comp.folder);
        std::fs::create_dir_all(&folder).map_err(&err)?;
        write_component(&folder, comp, &mut seed)?;
        if let Some((lib, class)) = comp.class {
            index.insert(comp.folder.into(), serde_json::json!([lib, class]));
        }
    }
    if arch != Arch::Llm7b {
        let text = serde_json::to_vec_pretty(&index).map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(tmp.join("model_index.json"), text).map_err(&err)?;
    }
    std::fs::write(tmp.join(".complete"), b"").map_err(&err)?;
    if root.exists() {
        // An incomplete leftover of an interrupted run (no `.complete`).
        std::fs::remove_dir_all(&root).map_err(io_err(&root))?;
    }
    std::fs::rename(&tmp, &root).map_err(io_err(&root))?;
    Ok(open_path(&root))
}

/// Writes one component's files (shards and index when `shards > 1`).
fn write_component(folder: &Path, comp: &ComponentSpec, seed: &mut u64) -> Result<(), EngineError> {
    let shards = comp.shards.max(1);
    let total: u64 = comp.tensors.iter().map(TensorSpec::bytes).sum();
    let per = total.div_ceil(shards as u64).max(1);
    // Contiguous runs of tensors of about `per` bytes each.
    let mut groups: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut acc = 0u64;
    for t in &comp.tensors {
        if acc >= per && groups.len() < shards {
            groups.push(Vec::new());
            acc = 0;
        }
        acc += t.bytes();
        if let Some(g) = groups.last_mut() {
            g.push(t);
        }
    }
    if shards == 1 {
        let path = folder.join(format!("{}.safetensors", comp.stem));
        return write_file(&path, &groups[0], seed);
    }
    let n = groups.len();
    let mut weight_map = serde_json::Map::new();
    for (i, g) in groups.iter().enumerate() {
        let name = format!("{}-{:05}-of-{:05}.safetensors", comp.stem, i + 1, n);
        write_file(&folder.join(&name), g, seed)?;
        for t in g {
            weight_map.insert(t.name.clone(), name.clone().into());
        }
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let path = folder.join(format!("{}.safetensors.index.json", comp.stem));
    let err = io_err(&path);
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&index).map_err(|e| err(std::io::Error::other(e)))?,
    )
    .map_err(&err)
}

/// One safetensors file: the header (tensors end to end, in the given order), then the data.
fn write_file(path: &Path, tensors: &[&TensorSpec], seed: &mut u64) -> Result<(), EngineError> {
    let err = io_err(path);
    let mut header = String::from(r#"{"__metadata__":{"format":"pt","writer":"ferry bench"}"#);
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.bytes();
        let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        header.push_str(&format!(
            r#","{}":{{"dtype":"{}","shape":[{}],"data_offsets":[{offset},{end}]}}"#,
            t.name,
            t.dtype.as_str(),
            shape.join(",")
        ));
        offset = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut f =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(&err)?);
    f.write_all(&(header.len() as u64).to_le_bytes()).map_err(&err)?;
    f.write_all(header.as_bytes()).map_err(&err)?;
    let mut chunk = vec![0u8; 1 << 20];
    for t in tensors {
        *seed += 1;
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0xd6e8_feb8_6659_fd93);
        // Random sign and mantissa, a fixed small exponent: finite values of magnitude about
        // 0.01 to 0.03 (f16: 2^-6; bf16: 2^-7; f32: 2^-6).
        let (mask, set) = match t.dtype {
            Dtype::BF16 => (0x807f_807f_807f_807fu64, 0x3c00_3c00_3c00_3c00u64),
            Dtype::F32 => (0x807f_ffff_807f_ffffu64, 0x3c80_0000_3c80_0000u64),
            _ => (0x83ff_83ff_83ff_83ffu64, 0x2400_2400_2400_2400u64),
        };
        let mut left = t.bytes() as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            let fill = n.next_multiple_of(8).min(chunk.len());
            for w in chunk[..fill].chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&((x & mask) | set).to_le_bytes());
            }
            f.write_all(&chunk[..n]).map_err(&err)?;
            left -= n;
        }
    }
    f.flush().map_err(&err)
}

// ─── LoRAs for any model ──────────────────────────────────────────────────────────────────────

/// Module names LoRAs usually adapt: attention projections (diffusers, CLIP, Llama, T5).
const ATTENTION: [&str; 17] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "out_proj",
    "q",
    "k",
    "v",
    "o",
];

/// Components whose dotted PEFT names can carry the component as a prefix.
const PEFT_COMPONENTS: [&str; 5] =
    ["unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"];

/// The base tensors a synthetic LoRA adapts: 2-D float `….weight`s of attention projections, in
/// every component but VAEs and non-CLIP text encoders (T5), as trained LoRAs do. Returns
/// (component, local module path, out, in).
pub fn lora_targets(model: &Model) -> Vec<(String, String, usize, usize)> {
    let mut out = Vec::new();
    for (id, t) in model.tensors().iter().enumerate() {
        let Some(comp) = model.components().get(t.component) else { continue };
        let Some(local) = model.local_name(id) else { continue };
        if comp.name.starts_with("vae")
            || (comp.name.starts_with("text_encoder") && !local.starts_with("text_model."))
        {
            continue;
        }
        let Some(module) = local.strip_suffix(".weight") else { continue };
        let float = matches!(t.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32);
        if !float
            || t.shape.len() != 2
            || !ATTENTION.iter().any(|a| module.ends_with(&format!(".{a}")))
        {
            continue;
        }
        out.push((comp.name.clone(), module.to_string(), t.shape[0] as usize, t.shape[1] as usize));
    }
    out
}

struct Raw {
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `count` PEFT-format LoRAs of rank `rank` (at most each target's smaller side) over
/// [`lora_targets`] of `model`, as `{stem}-lora{k}-r{rank}.safetensors` in `dir` (reused when
/// present). Fails when the model has no target.
pub fn write_loras(
    model: &Model,
    dir: &Path,
    stem: &str,
    count: usize,
    rank: usize,
) -> Result<Vec<PathBuf>, EngineError> {
    let targets = lora_targets(model);
    if targets.is_empty() {
        return Err(EngineError::Config(
            "the model has no attention projection weights a LoRA could adapt".into(),
        ));
    }
    let mut paths = Vec::with_capacity(count);
    for k in 0..count {
        let path = dir.join(format!("{stem}-lora{k}-r{rank}.safetensors"));
        paths.push(path.clone());
        if path.exists() {
            continue;
        }
        let mut tensors: Vec<(String, Raw)> = Vec::with_capacity(2 * targets.len());
        for (i, (comp, module, out, inp)) in targets.iter().enumerate() {
            let r = rank.min(*out).min(*inp).max(1);
            let prefix = if PEFT_COMPONENTS.contains(&comp.as_str()) {
                format!("{comp}.")
            } else {
                String::new()
            };
            let mut x = (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64 + 1);
            let mut values = |n: usize| -> Vec<u8> {
                (0..n)
                    .flat_map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04).to_le_bytes()
                    })
                    .collect()
            };
            let a = Raw { shape: vec![r, *inp], data: values(r * inp) };
            let b = Raw { shape: vec![*out, r], data: values(out * r) };
            tensors.push((format!("{prefix}{module}.lora_A.weight"), a));
            tensors.push((format!("{prefix}{module}.lora_B.weight"), b));
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &tmp)
            .map_err(|e| EngineError::Config(format!("writing {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(arch: Arch) -> u64 {
        components(arch, 1).iter().flat_map(|c| &c.tensors).map(|t| t.bytes() / 2).sum()
    }

    #[test]
    fn real_sizes_match_the_architectures() {
        // Parameter counts of the real models (scale 1), within 2%.
        let near = |got: u64, want: f64| (got as f64 / want - 1.0).abs() < 0.02;
        let sdxl: Vec<u64> = components(Arch::Sdxl, 1)
            .iter()
            .map(|c| c.tensors.iter().map(|t| t.bytes() / 2).sum())
            .collect();
        assert!(near(sdxl[0], 123.06e6), "CLIP-L {}", sdxl[0]);
        assert!(near(sdxl[1], 694.66e6), "bigG {}", sdxl[1]);
        assert!(near(sdxl[2], 2567.46e6), "SDXL UNet {}", sdxl[2]);
        assert!(near(sdxl[3], 83.65e6), "VAE {}", sdxl[3]);
        let flux: Vec<u64> = components(Arch::Flux, 1)
            .iter()
            .map(|c| c.tensors.iter().map(|t| t.bytes() / 2).sum())
            .collect();
        assert!(near(flux[1], 4762.3e6), "T5-XXL {}", flux[1]);
        assert!(near(flux[2], 11901.4e6), "FLUX transformer {}", flux[2]);
        assert!(near(params(Arch::Llm7b), 6738.4e6), "Llama-2-7B {}", params(Arch::Llm7b));
    }

    #[test]
    fn written_models_open_with_the_real_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (arch, comps) in [
            (Arch::Sdxl, vec!["text_encoder", "text_encoder_2", "unet", "vae"]),
            (Arch::Flux, vec!["text_encoder", "text_encoder_2", "transformer", "vae"]),
            (Arch::Llm7b, vec!["model"]),
        ] {
            let path = write(dir.path(), arch, 64).expect("write");
            let m = Model::open(&path).expect("open");
            let names: Vec<&str> = m.components().iter().map(|c| c.name.as_str()).collect();
            assert_eq!(names, comps, "{arch:?}");
            assert_eq!(m.total_bytes(), total_bytes(arch, 64), "{arch:?}");
            let want: usize = components(arch, 64).iter().map(|c| c.tensors.len()).sum();
            assert_eq!(m.tensors().len(), want);
            // Reused on the second call.
            assert_eq!(write(dir.path(), arch, 64).expect("again"), path);
            let loras = write_loras(&m, dir.path(), arch.name(), 2, 16).expect("loras");
            assert_eq!(loras.len(), 2);
        }
        let m = Model::open(write(dir.path(), Arch::Llm7b, 64).expect("llm")).expect("open");
        let layers: Vec<&str> = m.components()[0].layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(layers.len(), 32 + 3, "{layers:?}");
        assert_eq!(layers[0], "model.embed_tokens");
        assert_eq!(lora_targets(&m).len(), 32 * 4);
    }
}
