//! Weight loading: safetensors files into Burn modules through burn-store's module `apply` with
//! an adapter (transposes `nn.Linear` weights, tiled, on every core; burn-store's
//! `PyTorchToBurnAdapter` renames LayerNorm `weight`/`bias` to `gamma`/`beta`) and a key-remap
//! table, with typed errors that name the file, the tensor key and the shapes. Only the header is
//! parsed up front; tensors are read from disk in small batches as they are applied, straight into
//! the buffers the tensors keep (on huge pages when large, [`crate::memory::host_bytes`]), so
//! loading holds one copy of the weights.
//!
//! Every checkpoint layout the project reads is described by one [`KeyMap`] constant in this
//! file, one commented rule per line, so the whole mapping from a reference's state-dict tree to
//! ours can be read in one place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use burn_store::{ApplyError, ApplyResult, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, TensorSnapshot};
use safetensors::SafeTensors;

/// Why loading weights failed. Every variant names the file and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a readable safetensors file (truncated, bad header, ...).
    #[error("`{path}` is not a valid safetensors file: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A tensor the model needs is not in the file.
    #[error("`{path}`: missing tensor `{key}`")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The model's tensor path (after remapping).
        key: String,
    },
    /// A tensor has another shape than the model expects.
    #[error("`{path}`: tensor `{key}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// Shape the model expects (in the file's layout).
        expected: Vec<usize>,
        /// Shape found in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype this loader cannot read.
    #[error("`{path}`: tensor `{key}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// The stored dtype.
        dtype: String,
    },
    /// Tensors in the file that no rule accounts for (a file for another model).
    #[error("`{path}`: {count} tensor(s) not used by the model, e.g. {examples:?}")]
    UnusedKeys {
        /// The file.
        path: PathBuf,
        /// How many.
        count: usize,
        /// The first few keys.
        examples: Vec<String>,
    },
    /// Any other failure, with the store's message.
    #[error("`{path}`: {message}")]
    Other {
        /// The file.
        path: PathBuf,
        /// The message.
        message: String,
    },
}

/// A checkpoint layout: how the reference's keys become our module paths, and which of its
/// tensors are derived buffers we recompute rather than load.
#[derive(Clone, Copy, Debug)]
pub struct KeyMap {
    /// `(regex, replacement)` pairs applied in order to every key of the file.
    pub rename: &'static [(&'static str, &'static str)],
    /// Regexes of file keys that are deliberately not loaded (computed buffers).
    pub ignore: &'static [&'static str],
}

/// torchscale `Decoder` (MAGNETO, optional XPOS): the tree is ours already.
pub const TORCHSCALE_DECODER: KeyMap = KeyMap {
    rename: &[],
    ignore: &[
        // XPOS `scale` buffer: zeta_i, recomputed from head_dim by `positions::Xpos`.
        r"\.self_attn\.xpos\.scale$",
        // torchscale registers the token embedding and output projection on the decoder; the
        // decoder stack itself does not own them.
        r"^embed_tokens\.",
        r"^output_projection\.",
    ],
};

/// HF `CLIPVisionModel` (transformers >= 5 saves it without a prefix; older checkpoints and
/// `CLIPModel` exports put it under `vision_model.`).
pub const HF_CLIP_VISION: KeyMap = KeyMap {
    rename: &[
        // Older layout: everything under `vision_model.`.
        (r"^vision_model\.", ""),
    ],
    ignore: &[
        // Non-persistent in current transformers, persisted by some older exports: 0..n positions.
        r"^embeddings\.position_ids$",
    ],
};

/// transformers' `Kosmos2ImageToTextProjection` saved on its own: the tree is ours already
/// (`dense`, `latent_query`, `x_attn.{q,k,v,out}_proj`).
pub const HF_KOSMOS2_PROJECTION: KeyMap = KeyMap {
    rename: &[],
    ignore: &[],
};

/// lucidrains' flamingo-pytorch 0.1.2 `PerceiverResampler` onto `kosmos_vision::PerceiverResampler`.
pub const FLAMINGO_PERCEIVER: KeyMap = KeyMap {
    rename: &[
        // `layers.{i}` is a ModuleList [PerceiverAttention, FeedForward]: index 0 is the attention.
        (r"^layers\.(\d+)\.0\.", "layers.$1.attn."),
        // The FeedForward is an nn.Sequential: 0 LayerNorm, 1 Linear, 2 GELU, 3 Linear.
        (r"^layers\.(\d+)\.1\.0\.", "layers.$1.ff.norm."),
        (r"^layers\.(\d+)\.1\.1\.", "layers.$1.ff.fc1."),
        (r"^layers\.(\d+)\.1\.3\.", "layers.$1.ff.fc2."),
    ],
    ignore: &[],
};

/// HF KOSMOS-2 checkpoint keys onto `kosmos_models::Kosmos2` (tied `lm_head`).
pub const HF_KOSMOS2: KeyMap = KeyMap {
    rename: &[
        // Our text model keeps its layer stack in a `Decoder` (layers + final norm) next to the
        // token embedding; HF puts both directly under `text_model.model`.
        (r"^text_model\.model\.layers\.", "text_model.model.decoder.layers."),
        (
            r"^text_model\.model\.layer_norm\.",
            "text_model.model.decoder.layer_norm.",
        ),
    ],
    ignore: &[
        // Tied to `embed_tokens`: save_pretrained omits it, other exports may store a copy.
        r"^text_model\.lm_head\.weight$",
        // Non-persistent buffers that some exports persist: sinusoid table and position ids.
        r"^text_model\.model\.embed_positions\.",
        r"^vision_model\.model\.embeddings\.position_ids$",
    ],
};

/// As [`HF_KOSMOS2`] for checkpoints with an untied `lm_head` (loaded, not ignored).
pub const HF_KOSMOS2_UNTIED: KeyMap = KeyMap {
    rename: HF_KOSMOS2.rename,
    ignore: &[
        r"^text_model\.model\.embed_positions\.",
        r"^vision_model\.model\.embeddings\.position_ids$",
    ],
};

/// Our `Kosmos2` module paths back onto HF KOSMOS-2 keys (the inverse of [`HF_KOSMOS2`]'s
/// renames), for [`save_safetensors`].
pub const HF_KOSMOS2_SAVE: &[(&str, &str)] = &[
    (r"^text_model\.model\.decoder\.layers\.", "text_model.model.layers."),
    (
        r"^text_model\.model\.decoder\.layer_norm\.",
        "text_model.model.layer_norm.",
    ),
];

/// Write a module's parameters as a safetensors file in PyTorch's layout: `nn.Linear` weights
/// transposed back to `[out, in]`, LayerNorm `gamma`/`beta` named `weight`/`bias`
/// (burn-store's `BurnToPyTorchAdapter`), keys renamed by `rename` (`(regex, replacement)`,
/// applied in order), floats in the module's dtype. The file is written to a temporary name in
/// the same directory and renamed into place, so a crash never leaves a partial file at `path`.
pub fn save_safetensors<B: Backend, M: ModuleSnapshot<B>>(
    module: &M,
    path: impl AsRef<Path>,
    rename: &[(&str, &str)],
) -> Result<(), LoadError> {
    let path = path.as_ref();
    let other = |message: String| LoadError::Other {
        path: path.to_path_buf(),
        message,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| other("not a file path".into()))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let remapper =
        burn_store::KeyRemapper::from_patterns(rename.to_vec()).map_err(|e| other(format!("bad rename rule: {e}")))?;
    let mut store = burn_store::SafetensorsStore::from_file(&tmp)
        .with_to_adapter(burn_store::BurnToPyTorchAdapter)
        .remap(remapper)
        .overwrite(true);
    let result = module
        .save_into(&mut store)
        .map_err(|e| other(e.to_string()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| other(format!("renaming {}: {e}", tmp.display()))));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn is_ignored(key: &str, map: &KeyMap) -> bool {
    map.ignore
        .iter()
        .any(|p| regex::Regex::new(p).is_ok_and(|re| re.is_match(key)))
}

/// A file key after the rename rules (as burn-store's remapper applies them: each matching rule
/// in order).
fn rename(key: &str, map: &KeyMap) -> String {
    let mut key = key.to_string();
    for (from, to) in map.rename {
        if let Ok(re) = regex::Regex::new(from) {
            key = re.replace_all(&key, *to).into_owned();
        }
    }
    key
}

/// A Burn module path in PyTorch's naming (LayerNorm `gamma`/`beta` are `weight`/`bias`).
fn pytorch_name(path: &str) -> String {
    match path.rsplit_once('.') {
        Some((head, "gamma")) => format!("{head}.weight"),
        Some((head, "beta")) => format!("{head}.bias"),
        _ => path.to_string(),
    }
}

/// What a successful load did.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Module paths filled from the file.
    pub applied: Vec<String>,
    /// File keys deliberately not loaded (matched an ignore rule).
    pub ignored: Vec<String>,
}

fn check_file(path: &Path) -> Result<(), LoadError> {
    std::fs::metadata(path).map(|_| ()).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// What applying one file did.
struct FileResult {
    applied: Vec<String>,
    missing: Vec<String>,
    ignored: Vec<String>,
}

/// Load a safetensors file written from PyTorch into `module`, renaming keys with `map`.
///
/// Every tensor of the module must be found (else [`LoadError::MissingKey`]), with the right shape
/// ([`LoadError::ShapeMismatch`]); every tensor of the file must be used or ignored by a rule
/// ([`LoadError::UnusedKeys`]; ignore rules match keys after renaming). Tensors keep the dtype
/// they are stored in; see [`cast_floats`].
pub fn load_safetensors<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    path: impl AsRef<Path>,
    map: &KeyMap,
) -> Result<LoadReport, LoadError> {
    load_safetensors_files(module, &[path.as_ref()], map)
}

/// Load a checkpoint split over several safetensors files (shards). Each tensor of the module
/// must come from one of them; every tensor of every file must be used or ignored.
pub fn load_safetensors_files<B: Backend, M: ModuleSnapshot<B>, P: AsRef<Path>>(
    module: &mut M,
    paths: &[P],
    map: &KeyMap,
) -> Result<LoadReport, LoadError> {
    let mut report = LoadReport::default();
    let mut missing: Option<std::collections::BTreeSet<String>> = None;
    for path in paths {
        let r = apply_file(module, path.as_ref(), map)?;
        let now: std::collections::BTreeSet<String> = r.missing.into_iter().collect();
        missing = Some(match missing {
            None => now,
            Some(before) => before.intersection(&now).cloned().collect(),
        });
        report.applied.extend(r.applied);
        report.ignored.extend(r.ignored);
    }
    if let Some(key) = missing.and_then(|m| m.into_iter().next()) {
        let path = paths.last().map(|p| p.as_ref().to_path_buf()).unwrap_or_default();
        return Err(LoadError::MissingKey {
            path,
            key: pytorch_name(&key),
        });
    }
    Ok(report)
}

/// Cast every float parameter of `module` to `dtype` (checkpoints stored as f16/bf16 load in
/// their stored dtype; this brings them to the dtype the model runs in). Cast parameters stay
/// trainable leaves on autodiff backends (a plain cast would make them graph nodes without
/// gradients).
pub fn cast_floats<B: Backend, M: Module<B>>(module: M, dtype: burn::tensor::DType) -> M {
    struct Cast(burn::tensor::DType);
    impl<B: Backend> burn::module::ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            let dtype = self.0;
            param.map(|t| {
                if t.dtype() == dtype {
                    return t;
                }
                let trainable = t.is_require_grad();
                let cast = t.cast(dtype).detach();
                if trainable { cast.require_grad() } else { cast }
            })
        }
    }
    module.map(&mut Cast(dtype))
}

fn apply_file<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    path: &Path,
    map: &KeyMap,
) -> Result<FileResult, LoadError> {
    check_file(path)?;
    // Header only: sizes and offsets, checked against the file length (truncation).
    let (data_start, entries) = read_header_entries(path)?;
    let file_shapes: BTreeMap<String, Vec<usize>> = entries.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect();
    for (from, _) in map.rename {
        regex::Regex::new(from).map_err(|e| LoadError::Other {
            path: path.to_path_buf(),
            message: format!("bad remap rule `{from}`: {e}"),
        })?;
    }
    let result = apply_streaming(module, path, data_start, &entries, map)?;
    // The file key a module path came from (for messages in the file's own terms).
    let file_key = |model_path: &str| -> String {
        let candidates = [model_path.to_string(), pytorch_name(model_path)];
        for (key, _) in file_shapes.iter() {
            let renamed = rename(key, map);
            if candidates.contains(&renamed) {
                return key.clone();
            }
        }
        candidates[1].clone()
    };
    if let Some(err) = result.errors.first() {
        return Err(match err {
            ApplyError::ShapeMismatch { path: p, expected, .. } => {
                let key = file_key(p);
                let found = file_shapes.get(&key).cloned().unwrap_or_default();
                let mut expected = expected.to_vec();
                // Linear weights are compared in Burn's [in, out] layout; report PyTorch's [out, in].
                if expected.len() == 2 && found.len() == 2 && p.ends_with(".weight") && found != expected {
                    expected.reverse();
                }
                LoadError::ShapeMismatch {
                    path: path.to_path_buf(),
                    key,
                    expected,
                    found,
                }
            }
            other => LoadError::Other {
                path: path.to_path_buf(),
                message: other.to_string(),
            },
        });
    }
    // burn-store lists file keys it did not match by name, but LayerNorm `weight`/`bias` are
    // matched through the adapter to `gamma`/`beta`; those were applied, so drop them here.
    let applied: std::collections::HashSet<String> = result.applied.iter().map(|p| pytorch_name(p)).collect();
    let (ignored, unused): (Vec<String>, Vec<String>) = result
        .unused
        .into_iter()
        .filter(|k| !applied.contains(k))
        .partition(|k| is_ignored(k, map));
    if !unused.is_empty() {
        return Err(LoadError::UnusedKeys {
            path: path.to_path_buf(),
            count: unused.len(),
            examples: unused.into_iter().take(5).collect(),
        });
    }
    Ok(FileResult {
        missing: result.missing.into_iter().map(|(p, _)| p).collect(),
        applied: result.applied,
        ignored,
    })
}

/// One tensor of a safetensors header.
#[derive(Clone, Debug)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

/// Parse a safetensors header without reading the data: `(offset of the data, entries)`. Fails
/// with [`LoadError::Corrupt`] on a bad header or a file shorter than the header says.
fn read_header_entries(path: &Path) -> Result<(u64, BTreeMap<String, HeaderEntry>), LoadError> {
    use std::io::Read;
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |message: String| LoadError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| corrupt("shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(corrupt(format!(
            "header of {n} bytes does not fit the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|_| corrupt("truncated header".into()))?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| corrupt(format!("bad header: {e}")))?;
    let object = json
        .as_object()
        .ok_or_else(|| corrupt("header is not a JSON object".into()))?;
    let mut entries = BTreeMap::new();
    let mut data_end = 0u64;
    for (key, v) in object {
        if key == "__metadata__" {
            continue;
        }
        let bad = || corrupt(format!("bad header entry for `{key}`"));
        let dtype = v["dtype"].as_str().ok_or_else(bad)?.to_string();
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let offsets = v["data_offsets"].as_array().ok_or_else(bad)?;
        let (begin, end) = match (
            offsets.first().and_then(|o| o.as_u64()),
            offsets.get(1).and_then(|o| o.as_u64()),
        ) {
            (Some(b), Some(e)) if b <= e => (b, e),
            _ => return Err(bad()),
        };
        data_end = data_end.max(end);
        entries.insert(
            key.clone(),
            HeaderEntry {
                dtype,
                shape,
                begin,
                end,
            },
        );
    }
    if 8 + n + data_end > file_len {
        return Err(corrupt(format!(
            "truncated: the header describes {} bytes of data, the file has {}",
            data_end,
            file_len - 8 - n
        )));
    }
    Ok((8 + n, entries))
}

/// Bytes per element of the float dtypes a checkpoint may use.
fn float_dtype(name: &str) -> Option<(burn::tensor::DType, usize)> {
    match name {
        "F32" => Some((burn::tensor::DType::F32, 4)),
        "F16" => Some((burn::tensor::DType::F16, 2)),
        "BF16" => Some((burn::tensor::DType::BF16, 2)),
        "F64" => Some((burn::tensor::DType::F64, 8)),
        _ => None,
    }
}

/// burn-store's `PyTorchToBurnAdapter` with our own transposition of `nn.Linear` weights
/// (`[out, in]` in PyTorch, `[in, out]` in Burn): tiled and on every core, into a buffer from
/// [`crate::memory::host_bytes`] that the tensor keeps. burn-store's copies one element at a time
/// down the columns and then once more into an aligned buffer: about half of the full-size
/// model's 37 s of loading, against under a second here. Every other rule (LayerNorm
/// `weight`/`bias` to `gamma`/`beta`) is burn-store's.
#[derive(Clone, Copy, Debug, Default)]
struct HfAdapter;

impl ModuleAdapter for HfAdapter {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let linear_weight = snapshot.module_type().as_deref() == Some("Struct:Linear")
            && snapshot.path_stack.as_ref().and_then(|p| p.last()).map(String::as_str) == Some("weight")
            && snapshot.shape.len() == 2;
        if !linear_weight {
            return PyTorchToBurnAdapter.adapt(snapshot);
        }
        let (rows, cols) = (snapshot.shape[0], snapshot.shape[1]);
        let source = snapshot.clone();
        TensorSnapshot::from_closure(
            std::rc::Rc::new(move || {
                let data = source.to_data()?;
                let size = data.dtype.size();
                let mut out = crate::memory::host_bytes(rows * cols * size);
                transpose(data.as_bytes(), &mut out, rows, cols, size);
                Ok(TensorData::from_bytes(out, [cols, rows], data.dtype))
            }),
            snapshot.dtype,
            [cols, rows].into(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn get_alternative_param_name(&self, param_name: &str, container_type: &str) -> Option<String> {
        PyTorchToBurnAdapter.get_alternative_param_name(param_name, container_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(*self)
    }
}

/// `dst[j, i] = src[i, j]` for a row-major `[rows, cols]` matrix of `size`-byte elements.
pub(crate) fn transpose(src: &[u8], dst: &mut [u8], rows: usize, cols: usize, size: usize) {
    assert!(src.len() >= rows * cols * size && dst.len() >= rows * cols * size);
    fn typed<T: Copy + Send + Sync>(src: &[T], dst: &mut [T], rows: usize, cols: usize) {
        use rayon::prelude::*;
        /// Elements per side of a tile: a 32 x 32 tile of f32 reads 32 lines and writes 32.
        const TILE: usize = 32;
        if rows == 0 || cols == 0 {
            return;
        }
        // Each task writes TILE whole rows of `dst` (TILE columns of `src`).
        dst[..rows * cols]
            .par_chunks_mut(TILE * rows)
            .enumerate()
            .for_each(|(t, out)| {
                let c0 = t * TILE;
                let width = out.len() / rows;
                for r0 in (0..rows).step_by(TILE) {
                    for c in 0..width {
                        let dst_row = &mut out[c * rows..(c + 1) * rows];
                        for r in r0..(r0 + TILE).min(rows) {
                            dst_row[r] = src[r * cols + c0 + c];
                        }
                    }
                }
            });
    }
    macro_rules! as_typed {
        ($t:ty) => {{
            // SAFETY: any bytes are valid values of these plain integer types; the aligned middle
            // parts are used only when they cover the whole slices.
            let (a, s, b) = unsafe { src.align_to::<$t>() };
            let (c, d, e) = unsafe { dst.align_to_mut::<$t>() };
            if a.is_empty() && b.is_empty() && c.is_empty() && e.is_empty() {
                return typed(s, d, rows, cols);
            }
        }};
    }
    match size {
        4 => as_typed!(u32),
        2 => as_typed!(u16),
        8 => as_typed!(u64),
        _ => {}
    }
    // Any other element size, or misaligned buffers: byte by byte.
    for i in 0..rows {
        for j in 0..cols {
            let (from, to) = ((i * cols + j) * size, (j * rows + i) * size);
            dst[to..to + size].copy_from_slice(&src[from..from + size]);
        }
    }
}

/// Apply a file's tensors to the module a few at a time, each read from disk only when it is
/// applied, so that loading holds one copy of the weights (plus the tensor in flight).
fn apply_streaming<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    path: &Path,
    data_start: u64,
    entries: &BTreeMap<String, HeaderEntry>,
    map: &KeyMap,
) -> Result<ApplyResult, LoadError> {
    use std::os::unix::fs::FileExt;
    use std::rc::Rc;
    let file = Rc::new(std::fs::File::open(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?);
    const CHUNK_BYTES: u64 = 256 << 20;
    let mut merged: Option<ApplyResult> = None;
    let mut batch: Vec<TensorSnapshot> = Vec::new();
    let mut batch_bytes = 0u64;
    let keys: Vec<&String> = entries.keys().collect();
    for (i, key) in keys.iter().enumerate() {
        let entry = &entries[*key];
        let (dtype, width) = float_dtype(&entry.dtype).ok_or_else(|| LoadError::UnsupportedDtype {
            path: path.to_path_buf(),
            key: (*key).clone(),
            dtype: entry.dtype.clone(),
        })?;
        let count: usize = entry.shape.iter().product();
        if (entry.end - entry.begin) as usize != count * width {
            return Err(LoadError::Corrupt {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{key}`: {} bytes for shape {:?} of {}",
                    entry.end - entry.begin,
                    entry.shape,
                    entry.dtype
                ),
            });
        }
        let (f, shape, offset, len) = (
            file.clone(),
            entry.shape.clone(),
            data_start + entry.begin,
            entry.end - entry.begin,
        );
        let read = move || -> Result<TensorData, burn_store::TensorSnapshotError> {
            // Read straight into the buffer the tensor keeps (on huge pages when large).
            let mut bytes = crate::memory::host_bytes(len as usize);
            f.read_exact_at(&mut bytes, offset)
                .map_err(|e| burn_store::TensorSnapshotError::IoError(e.to_string()))?;
            Ok(TensorData::from_bytes(bytes, shape.clone(), dtype))
        };
        let renamed = rename(key, map);
        let path_stack: Vec<String> = renamed.split('.').map(str::to_string).collect();
        batch.push(TensorSnapshot::from_closure(
            Rc::new(read),
            dtype,
            entry.shape.clone().into(),
            path_stack,
            Vec::new(),
            burn::module::ParamId::new(),
        ));
        batch_bytes += len;
        if batch_bytes >= CHUNK_BYTES || i + 1 == keys.len() {
            let result = module.apply(std::mem::take(&mut batch), None, Some(Box::new(HfAdapter)), false);
            batch_bytes = 0;
            merged = Some(match merged {
                None => result,
                Some(mut m) => {
                    m.applied.extend(result.applied);
                    m.unused.extend(result.unused);
                    m.errors.extend(result.errors);
                    let still: std::collections::BTreeSet<String> =
                        result.missing.iter().map(|(p, _)| p.clone()).collect();
                    m.missing.retain(|(p, _)| still.contains(p));
                    m
                }
            });
        }
    }
    Ok(merged.unwrap_or_else(|| module.apply(Vec::new(), None, None, false)))
}

/// Keys and shapes of a safetensors file, reading only its header.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, Vec<usize>>, LoadError> {
    Ok(read_header_entries(path)?
        .1
        .into_iter()
        .map(|(k, e)| (k, e.shape))
        .collect())
}

/// A safetensors file opened for reading individual tensors by key (fixtures, inputs,
/// embeddings), converting f16/bf16/f64/integer storage to the requested element type.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    /// Read the file and check its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        SafeTensors::deserialize(&bytes).map_err(|e| LoadError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(Self { path, bytes })
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("header checked at open")
    }

    /// The keys in the file.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.view().names().into_iter().map(str::to_string).collect();
        keys.sort();
        keys
    }

    /// The tensor `key` as host data (float tensors as f32; integer, byte and bool tensors as i64).
    pub fn data(&self, key: &str) -> Result<TensorData, LoadError> {
        use safetensors::Dtype;
        let st = self.view();
        let view = st.tensor(key).map_err(|_| LoadError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })?;
        let shape = view.shape().to_vec();
        let raw = view.data();
        let floats = |width: usize, f: &dyn Fn(&[u8]) -> f32| -> Vec<f32> { raw.chunks_exact(width).map(f).collect() };
        let data = match view.dtype() {
            Dtype::F32 => TensorData::new(floats(4, &|b| f32::from_le_bytes(b.try_into().unwrap())), shape),
            Dtype::F64 => TensorData::new(floats(8, &|b| f64::from_le_bytes(b.try_into().unwrap()) as f32), shape),
            Dtype::F16 => TensorData::new(
                floats(2, &|b| burn::tensor::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                shape,
            ),
            Dtype::BF16 => TensorData::new(
                floats(2, &|b| burn::tensor::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                shape,
            ),
            Dtype::I64 => TensorData::new(
                raw.chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect::<Vec<_>>(),
                shape,
            ),
            Dtype::I32 => TensorData::new(
                raw.chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                    .collect::<Vec<_>>(),
                shape,
            ),
            Dtype::U8 | Dtype::BOOL => TensorData::new(raw.iter().map(|&b| b as i64).collect::<Vec<_>>(), shape),
            other => {
                return Err(LoadError::UnsupportedDtype {
                    path: self.path.clone(),
                    key: key.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(data)
    }

    /// The float tensor `key` with `D` dimensions on `device`.
    pub fn tensor<B: Backend, const D: usize>(&self, key: &str, device: &B::Device) -> Result<Tensor<B, D>, LoadError> {
        let data = self.data(key)?;
        if data.shape.len() != D {
            return Err(LoadError::ShapeMismatch {
                path: self.path.clone(),
                key: key.to_string(),
                expected: vec![0; D],
                found: data.shape.to_vec(),
            });
        }
        Ok(Tensor::from_data(data.convert::<f32>(), device))
    }
}

#[cfg(test)]
mod tests {
    use super::transpose;

    /// The plain definition, element by element.
    fn naive(src: &[u8], rows: usize, cols: usize, size: usize) -> Vec<u8> {
        let mut out = vec![0u8; src.len()];
        for i in 0..rows {
            for j in 0..cols {
                let (from, to) = ((i * cols + j) * size, (j * rows + i) * size);
                out[to..to + size].copy_from_slice(&src[from..from + size]);
            }
        }
        out
    }

    #[test]
    fn transpose_matches_the_definition_for_every_shape_and_element_size() {
        // Shapes around the tile (32) on both sides, element sizes with a typed path (2, 4, 8)
        // and without (1, 3), buffers aligned and misaligned by one byte.
        let dims = [1, 2, 7, 31, 32, 33, 64, 65, 100];
        for size in [1, 2, 3, 4, 8] {
            for &rows in &dims {
                for &cols in &dims {
                    let n = rows * cols * size;
                    for offset in [0, 1] {
                        let mut src = vec![0u8; n + offset];
                        for (i, v) in src.iter_mut().enumerate() {
                            *v = (i * 131 % 251) as u8;
                        }
                        let src = &src[offset..];
                        let mut dst = vec![0u8; n + offset];
                        transpose(src, &mut dst[offset..], rows, cols, size);
                        assert_eq!(
                            &dst[offset..],
                            &naive(src, rows, cols, size)[..],
                            "{rows}x{cols}, {size} B, +{offset}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn transpose_twice_is_the_identity() {
        let (rows, cols) = (300, 129);
        let src: Vec<u8> = (0..rows * cols * 4).map(|i| (i % 253) as u8).collect();
        let mut once = vec![0u8; src.len()];
        let mut twice = vec![0u8; src.len()];
        transpose(&src, &mut once, rows, cols, 4);
        transpose(&once, &mut twice, cols, rows, 4);
        assert_eq!(twice, src);
    }
}
