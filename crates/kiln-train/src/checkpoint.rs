//! Checkpoint directories: `config.json` + `model.safetensors` (Hugging Face GPT-2), the
//! tokenizer, `training_state.safetensors` (AdamW moments by parameter name, step, data cursor)
//! and `kiln.json`. Written into a temporary directory and swapped into place, so a crash
//! leaves the previous checkpoint whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_data::{SamplerState, Tokenizer};
use kiln_model::{load_trainable, read_safetensors_f32, safetensors_bytes, write_atomic, TrainableLm};
use serde::{Deserialize, Serialize};

use crate::{AdamW, LossScaler, TrainConfig, TrainError};

/// Where a run stands: enough, with the weights and moments, to continue bit-identically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimizer steps completed.
    pub step: u64,
    pub sampler: SamplerState,
    pub config: TrainConfig,
    /// fp16 runs: the dynamic loss scale where the run stood.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
}

pub struct Checkpoint {
    pub model: Box<dyn TrainableLm>,
    pub tokenizer: Option<Tokenizer>,
    pub optimizer: Option<AdamW>,
    pub state: Option<TrainingState>,
}

fn ck_err(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: path.display().to_string(), msg: msg.into() }
}

/// Accepts a run directory (`<out>`, holding `checkpoint/`) or the checkpoint directory itself.
pub fn resolve_checkpoint_dir(path: &Path) -> PathBuf {
    let inner = path.join("checkpoint");
    if !path.join("config.json").exists() && inner.join("config.json").exists() {
        inner
    } else {
        path.to_path_buf()
    }
}

pub fn save_checkpoint(
    dir: &Path,
    model: &dyn TrainableLm,
    opt: &AdamW,
    state: &TrainingState,
    tokenizer: &Tokenizer,
) -> Result<(), TrainError> {
    let io = |p: &Path, e: std::io::Error| TrainError::Io { path: p.display().to_string(), source: e };
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;

    model.save_hf(&tmp, tokenizer.eot_id())?;
    tokenizer.save(&tmp.join("tokenizer.json"))?;

    let mut tensors = Vec::new();
    for (i, info) in model.param_info().iter().enumerate() {
        let n: usize = info.shape.iter().product();
        tensors.push((format!("m.{}", info.name), info.shape.clone(), opt.m[i][..n].to_vec()));
        tensors.push((format!("v.{}", info.name), info.shape.clone(), opt.v[i][..n].to_vec()));
    }
    let meta = HashMap::from([
        ("format".to_string(), "kiln-training-state".to_string()),
        ("adam_t".to_string(), opt.t.to_string()),
        ("state".to_string(), serde_json::to_string(state).expect("state serialises")),
    ]);
    write_atomic(&tmp.join("training_state.safetensors"), &safetensors_bytes(&tensors, Some(meta))?)?;

    let kiln = serde_json::json!({
        "format": "kiln-checkpoint",
        "version": 1,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "architecture": model.model_type(),
        "precision": state.config.precision.to_string(),
        "quantization": null,
        "pruning": null,
        "step": state.step,
        "train_config": state.config,
    });
    write_atomic(&tmp.join("kiln.json"), serde_json::to_string_pretty(&kiln).expect("json").as_bytes())?;

    // Swap: the old checkpoint is moved aside first and removed only once the new one is in place.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    }
    Ok(())
}

/// Loads weights, and where present the tokenizer and the training state.
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint, TrainError> {
    let dir = resolve_checkpoint_dir(path);
    if !dir.join("config.json").exists() {
        return Err(ck_err(&dir, "no config.json here: not a kiln or Hugging Face checkpoint directory"));
    }
    let model = load_trainable(&dir)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() { Some(Tokenizer::from_file(&tok_path)?) } else { None };
    let state_path = dir.join("training_state.safetensors");
    let (optimizer, state) = if state_path.exists() {
        let (tensors, meta) = read_safetensors_f32(&state_path)?;
        let state: TrainingState = meta
            .get("state")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| ck_err(&state_path, "missing or invalid training state metadata"))?;
        let adam_t =
            meta.get("adam_t").and_then(|s| s.parse().ok()).ok_or_else(|| ck_err(&state_path, "missing adam_t"))?;
        let mut opt = AdamW::new(model.as_ref());
        opt.t = adam_t;
        for (i, info) in model.param_info().iter().enumerate() {
            let n: usize = info.shape.iter().product();
            for (prefix, buf) in [("m", &mut opt.m[i]), ("v", &mut opt.v[i])] {
                let key = format!("{prefix}.{}", info.name);
                let (_, vals) =
                    tensors.get(&key).ok_or_else(|| ck_err(&state_path, format!("missing tensor {key}")))?;
                if vals.len() != n {
                    return Err(ck_err(&state_path, format!("tensor {key} has {} values, expected {n}", vals.len())));
                }
                buf[..n].copy_from_slice(vals);
            }
        }
        (Some(opt), Some(state))
    } else {
        (None, None)
    };
    Ok(Checkpoint { model, tokenizer, optimizer, state })
}
