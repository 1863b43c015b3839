//! Llama-family checkpoints as `transformers` writes them: config.json and model.safetensors,
//! or shards named by model.safetensors.index.json.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{Llama, LlamaConfig};
use crate::checkpoint::{read_safetensors_f32, safetensors_bytes, write_atomic};
use crate::ModelError;

fn ck_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), msg: msg.into() }
}

/// Every tensor of a checkpoint directory: the single file, or each shard the index names.
#[allow(clippy::type_complexity)]
pub fn read_hf_tensors(dir: &Path) -> Result<BTreeMap<String, (Vec<usize>, Vec<f32>)>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(read_safetensors_f32(&single)?.0);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .map_err(|_| ck_err(dir, "neither model.safetensors nor model.safetensors.index.json is here"))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ck_err(&index, format!("invalid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ck_err(&index, "no weight_map"))?;
    let mut shards: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    let mut out = BTreeMap::new();
    for shard in shards {
        if shard.contains('/') || shard.contains("..") {
            return Err(ck_err(&index, format!("shard name '{shard}' leaves the directory")));
        }
        out.extend(read_safetensors_f32(&dir.join(shard))?.0);
    }
    for name in map.keys() {
        if !out.contains_key(name) {
            return Err(ck_err(&index, format!("tensor {name} is not in the shard the index names")));
        }
    }
    Ok(out)
}

/// Loads a `LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM` directory.
pub fn load_llama_dir(dir: &Path) -> Result<Llama, ModelError> {
    load_llama_dir_skipping(dir, &|_| false)
}

/// [`load_llama_dir`] leaving the tensors `skip` names zero: they are stored elsewhere.
pub(crate) fn load_llama_dir_skipping(dir: &Path, skip: &dyn Fn(&str) -> bool) -> Result<Llama, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ck_err(&path, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ck_err(&path, format!("invalid JSON: {e}")))?;
    let cfg = LlamaConfig::from_hf_json(&v).map_err(|e| ck_err(&path, e.to_string()))?;
    let tensors = read_hf_tensors(dir)?;
    let mut model = Llama::zeros(cfg)?;
    for info in model.param_info().to_vec().into_iter().filter(|i| !skip(&i.name)) {
        let (shape, values) =
            tensors.get(&info.name).ok_or_else(|| ck_err(dir, format!("missing tensor {}", info.name)))?;
        if *shape != info.shape {
            return Err(ck_err(
                dir,
                format!("tensor {} has shape {shape:?}, the config implies {:?}", info.name, info.shape),
            ));
        }
        model.set_param(&info.name, values)?;
    }
    Ok(model)
}

/// Writes config.json and model.safetensors that `transformers` loads as the same model.
pub fn save_llama_hf_files(model: &Llama, dir: &Path, eos: Option<u32>, bos: Option<u32>) -> Result<(), ModelError> {
    save_llama_hf_files_keeping(model, dir, eos, bos, &|_| true)
}

/// [`save_llama_hf_files`] with only the tensors `keep` accepts in model.safetensors.
pub(crate) fn save_llama_hf_files_keeping(
    model: &Llama,
    dir: &Path,
    eos: Option<u32>,
    bos: Option<u32>,
    keep: &dyn Fn(&str) -> bool,
) -> Result<(), ModelError> {
    let config = serde_json::to_string_pretty(&model.config.to_hf_json(eos, bos)).expect("json value serialises");
    write_atomic(&dir.join("config.json"), config.as_bytes())?;
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = model
        .param_info()
        .iter()
        .zip(&model.params)
        .filter(|(info, _)| keep(&info.name))
        .map(|(info, p)| (info.name.clone(), info.shape.clone(), p.clone()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(&dir.join("model.safetensors"), &safetensors_bytes(&tensors, Some(meta))?)
}
