//! Weights in and out as Hugging Face GPT-2 checkpoints: `config.json` plus `model.safetensors`
//! with `transformers`' tensor names, its Conv1D matrices stored `[in, out]`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::{Gpt, GptConfig, ModelError};

/// The four GPT-2 weight matrices that `transformers` keeps as Conv1D, i.e. `[in, out]`.
const CONV1D_SUFFIXES: [&str; 4] = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"];

/// Maps kiln's names (`h.0.attn.c_attn.weight`) to the stored names (`transformer.h.0...`).
pub struct HfTensorNames;

impl HfTensorNames {
    pub fn to_hf(name: &str) -> String {
        format!("transformer.{name}")
    }
    pub fn is_conv1d(name: &str) -> bool {
        CONV1D_SUFFIXES.iter().any(|s| name.ends_with(s))
    }
}

pub(crate) fn ck_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), msg: msg.into() }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let io = |e| ModelError::Io { path: path.display().to_string(), source: e };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Every tensor of a safetensors file as f32 (bf16 and f16 are widened), with the header metadata.
#[allow(clippy::type_complexity)]
pub fn read_safetensors_f32(
    path: &Path,
) -> Result<(BTreeMap<String, (Vec<usize>, Vec<f32>)>, HashMap<String, String>), ModelError> {
    let file = std::fs::File::open(path).map_err(|e| ck_err(path, format!("cannot open: {e}")))?;
    // SAFETY: the file is only read; kiln never writes a checkpoint in place (atomic renames).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ck_err(path, format!("cannot map: {e}")))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| ck_err(path, format!("not a valid safetensors file ({e}); truncated or corrupt?")))?;
    let (_, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| ck_err(path, e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::I32 => data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32).collect(),
            Dtype::I64 => {
                data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect()
            }
            other => return Err(ck_err(path, format!("tensor {name} has unsupported dtype {other:?}"))),
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Serialises named f32 tensors (with optional metadata) to safetensors bytes.
pub fn safetensors_bytes(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, ModelError> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| f32_bytes(v)).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    safetensors::serialize(views, meta).map_err(|e| ModelError::Shape(e.to_string()))
}

/// Writes `config.json` and `model.safetensors` for `transformers.GPT2LMHeadModel` into `dir`.
pub fn save_hf_files(model: &Gpt, dir: &Path, eot_token: Option<u32>) -> Result<(), ModelError> {
    save_hf_files_keeping(model, dir, eot_token, &|_| true)
}

/// [`save_hf_files`] with only the tensors `keep` accepts (by kiln name) in model.safetensors.
pub(crate) fn save_hf_files_keeping(
    model: &Gpt,
    dir: &Path,
    eot_token: Option<u32>,
    keep: &dyn Fn(&str) -> bool,
) -> Result<(), ModelError> {
    let cfg = &model.config;
    let mut config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "use_cache": true,
        "torch_dtype": "float32",
    });
    if let Some(e) = eot_token {
        config["bos_token_id"] = e.into();
        config["eos_token_id"] = e.into();
    }
    let text = serde_json::to_string_pretty(&config).expect("json value serialises");
    write_atomic(&dir.join("config.json"), text.as_bytes())?;

    let mut tensors = Vec::new();
    for (i, info) in model.param_info().iter().enumerate() {
        if !keep(&info.name) {
            continue;
        }
        let v = model.param_values(i);
        let (shape, values) = if HfTensorNames::is_conv1d(&info.name) {
            let (o, n) = (info.shape[0], info.shape[1]);
            (vec![n, o], transpose(v, o, n))
        } else {
            (info.shape.clone(), v.to_vec())
        };
        tensors.push((HfTensorNames::to_hf(&info.name), shape, values));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(&dir.join("model.safetensors"), &safetensors_bytes(&tensors, Some(meta))?)
}

/// Reads a GPT-2 `config.json` (Hugging Face fields) into a [`GptConfig`].
pub fn read_hf_config(path: &Path) -> Result<GptConfig, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ck_err(path, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ck_err(path, format!("invalid JSON: {e}")))?;
    if let Some(mt) = v.get("model_type").and_then(|m| m.as_str()) {
        if mt != "gpt2" {
            return Err(ck_err(path, format!("model_type '{mt}' is not supported yet (only gpt2)")));
        }
    }
    if let Some(act) = v.get("activation_function").and_then(|m| m.as_str()) {
        if !matches!(act, "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") {
            return Err(ck_err(path, format!("activation '{act}' differs from GPT-2's tanh GELU")));
        }
    }
    let get = |keys: &[&str]| -> Result<usize, ModelError> {
        keys.iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_u64()))
            .map(|x| x as usize)
            .ok_or_else(|| ck_err(path, format!("missing field {}", keys[0])))
    };
    let cfg = GptConfig {
        n_layer: get(&["n_layer", "num_hidden_layers"])?,
        n_head: get(&["n_head", "num_attention_heads"])?,
        n_embd: get(&["n_embd", "hidden_size"])?,
        block_size: get(&["n_positions", "n_ctx", "max_position_embeddings"])?,
        vocab_size: get(&["vocab_size"])?,
    };
    cfg.validate().map_err(|e| ck_err(path, e.to_string()))?;
    Ok(cfg)
}

/// Loads a GPT-2 checkpoint directory (ours or one saved by `transformers`).
pub fn load_hf_dir(dir: &Path) -> Result<Gpt, ModelError> {
    load_hf_dir_skipping(dir, &|_| false)
}

/// [`load_hf_dir`] leaving the tensors `skip` names (kiln names) zero: they are stored elsewhere.
pub(crate) fn load_hf_dir_skipping(dir: &Path, skip: &dyn Fn(&str) -> bool) -> Result<Gpt, ModelError> {
    if !dir.is_dir() {
        return Err(ck_err(dir, "not a directory"));
    }
    let cfg = read_hf_config(&dir.join("config.json"))?;
    let st_path = dir.join("model.safetensors");
    let (tensors, _) = read_safetensors_f32(&st_path)?;
    let mut model = Gpt::zeros(cfg)?;
    let infos = model.param_info().to_vec();
    for info in infos.into_iter().filter(|i| !skip(&i.name)) {
        let found = [HfTensorNames::to_hf(&info.name), info.name.clone()].into_iter().find_map(|n| tensors.get(&n));
        let (shape, values) =
            found.ok_or_else(|| ck_err(&st_path, format!("missing tensor {}", HfTensorNames::to_hf(&info.name))))?;
        let conv = HfTensorNames::is_conv1d(&info.name);
        let want: Vec<usize> = if conv { vec![info.shape[1], info.shape[0]] } else { info.shape.clone() };
        if *shape != want {
            return Err(ck_err(
                &st_path,
                format!("tensor {} has shape {shape:?}, the config implies {want:?}", info.name),
            ));
        }
        let values = if conv { transpose(values, info.shape[1], info.shape[0]) } else { values.clone() };
        model.set_param(&info.name, &values)?;
    }
    Ok(model)
}

/// The `model_type` of a checkpoint's config.json (`gpt2` when the field is absent, as in
/// early GPT-2 files).
pub fn read_model_type(dir: &Path) -> Result<String, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ck_err(&path, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ck_err(&path, format!("invalid JSON: {e}")))?;
    Ok(v.get("model_type").and_then(|m| m.as_str()).unwrap_or("gpt2").to_string())
}

/// The end-of-sequence token ids a checkpoint declares: `eos_token_id` (a number or a list)
/// in generation_config.json, else in config.json. Empty when neither names one.
pub fn read_eos_token_ids(dir: &Path) -> Vec<u32> {
    let ids = |file: &str| -> Option<Vec<u32>> {
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        match v.get("eos_token_id")? {
            serde_json::Value::Number(n) => Some(vec![n.as_u64()? as u32]),
            serde_json::Value::Array(a) => Some(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()),
            _ => None,
        }
    };
    ids("generation_config.json").or_else(|| ids("config.json")).unwrap_or_default()
}

/// The directory holding config.json: `path` itself, or the `checkpoint/` inside a kiln run
/// directory.
pub fn resolve_model_dir(path: &Path) -> std::path::PathBuf {
    let inner = path.join("checkpoint");
    if !path.join("config.json").is_file() && inner.join("config.json").is_file() {
        inner
    } else {
        path.to_path_buf()
    }
}

/// Loads any supported checkpoint directory (config.json + safetensors; a kiln run directory
/// works too) as a generating model.
pub fn load_causal_lm(dir: &Path) -> Result<Box<dyn crate::CausalLm>, ModelError> {
    Ok(crate::load_trainable(dir)?)
}
