//! Quantized linear layers in a model's forward path, and quantized checkpoints.
//!
//! A model keeps a [`Linears`] beside its f32 parameters: for each parameter that is a linear
//! weight it may hold a [`QuantWeight`] (int8 weight-only, W8A8, or grouped int4), and every
//! matmul of the forward goes through [`Linears::matmul`], which runs the integer kernel when
//! there is one and the f32 GEMM otherwise. The f32 copy of a quantized matrix is dropped, so a
//! quantized model cannot be trained (backward says so); embedding tables keep an f32 copy for
//! the row lookup, dequantized from the stored codes, so lookup and head see the same weights.
//!
//! A quantized checkpoint is a normal checkpoint directory whose `model.safetensors` lacks the
//! quantized matrices; they are in `model.quant.safetensors` under kiln's parameter names, laid
//! out `[n_out, k_in]`: `{name}.qweight` (i8 `[n, k]`, or u8 `[n, k/2]` packed int4, low nibble
//! first), `{name}.scale` (f32 `[n]` for int8, f16 `[n, k/group]` for int4), `{name}.zero`
//! (f16, int4 only) and `{name}.act_scale` (f32 `[k]`, when AWQ or SmoothQuant folded one in).
//! `kiln.json` records the scheme of every quantized tensor under `"quantization"`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use half::f16;
use kiln_tensor::quant::{int4_matmul, int8_weight_matmul, w8a8_matmul, Int4Weight, Int8Weight};
use kiln_tensor::Kernels;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{ck_err, write_atomic};
use crate::ModelError;

/// One quantized linear weight `[n_out, k_in]`.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantWeight {
    /// Weight-only int8: f32 activations, int8 weights dequantized in registers.
    Int8(Int8Weight),
    /// int8 weights and dynamic per-token int8 activations, int32 accumulation.
    W8A8(Int8Weight),
    /// Weight-only grouped asymmetric int4.
    Int4(Int4Weight),
}

/// The scheme names `kiln quantize --scheme` takes and kiln.json records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantScheme {
    Int8,
    W8a8,
    Int4,
}

impl QuantScheme {
    pub fn parse(s: &str) -> Option<QuantScheme> {
        match s {
            "int8" => Some(QuantScheme::Int8),
            "w8a8" => Some(QuantScheme::W8a8),
            "int4" => Some(QuantScheme::Int4),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            QuantScheme::Int8 => "int8",
            QuantScheme::W8a8 => "w8a8",
            QuantScheme::Int4 => "int4",
        }
    }
}

impl QuantWeight {
    pub fn scheme(&self) -> QuantScheme {
        match self {
            QuantWeight::Int8(_) => QuantScheme::Int8,
            QuantWeight::W8A8(_) => QuantScheme::W8a8,
            QuantWeight::Int4(_) => QuantScheme::Int4,
        }
    }

    /// (n_out, k_in).
    pub fn shape(&self) -> (usize, usize) {
        match self {
            QuantWeight::Int8(w) | QuantWeight::W8A8(w) => (w.n, w.k),
            QuantWeight::Int4(w) => (w.n, w.k),
        }
    }

    /// Bytes of codes, scales and zeros the kernels stream per product.
    pub fn weight_bytes(&self) -> usize {
        let act = |a: &Option<Vec<f32>>| a.as_ref().map_or(0, |s| 4 * s.len());
        match self {
            QuantWeight::Int8(w) | QuantWeight::W8A8(w) => w.weight_bytes() + act(&w.act_scale),
            QuantWeight::Int4(w) => w.weight_bytes() + act(&w.act_scale),
        }
    }

    /// `out[m, n] = inp[m, k] · W_effᵀ + bias`.
    pub fn matmul(&self, out: &mut [f32], inp: &[f32], bias: Option<&[f32]>) {
        let (_, k) = self.shape();
        let m = inp.len() / k;
        match self {
            QuantWeight::Int8(w) => int8_weight_matmul(out, inp, w, bias, m),
            QuantWeight::W8A8(w) => w8a8_matmul(out, inp, w, bias, m),
            QuantWeight::Int4(w) => int4_matmul(out, inp, w, bias, m),
        }
    }

    /// The effective f32 weights `[n, k]` the kernels compute with (act_scale folded back).
    pub fn dequantize(&self) -> Vec<f32> {
        let (n, k) = self.shape();
        let mut out = vec![0.0f32; n * k];
        match self {
            QuantWeight::Int8(w) | QuantWeight::W8A8(w) => {
                for o in 0..n {
                    for i in 0..k {
                        out[o * k + i] = w.q[o * k + i] as f32 * w.scale[o];
                    }
                }
                fold_act_scale(&mut out, k, w.act_scale.as_deref());
            }
            QuantWeight::Int4(w) => {
                let g = w.groups_per_row();
                for o in 0..n {
                    for i in 0..k {
                        let j = o * g + i / w.group;
                        let (s, z) = (w.scale[j].to_f32(), w.zero[j].to_f32());
                        out[o * k + i] = (w.code(o, i) as f32 - z) * s;
                    }
                }
                fold_act_scale(&mut out, k, w.act_scale.as_deref());
            }
        }
        out
    }
}

/// The kernels divide the activations by `s`; the equivalent weight is `W·diag(1/s)`.
fn fold_act_scale(w: &mut [f32], k: usize, s: Option<&[f32]>) {
    if let Some(s) = s {
        for row in w.chunks_mut(k) {
            for (x, d) in row.iter_mut().zip(s) {
                *x /= d;
            }
        }
    }
}

/// Called with (parameter index, the `[rows, k]` input of that linear) on every matmul of a
/// forward while set: how calibration sees each layer's activations.
pub type LinearObserver = Box<dyn FnMut(usize, &[f32]) + Send>;

/// The quantized copies of a model's linear weights, and an optional calibration observer.
#[derive(Default)]
pub struct Linears {
    /// Empty, or one entry per parameter tensor.
    quant: Vec<Option<QuantWeight>>,
    observer: Option<Mutex<LinearObserver>>,
}

impl Linears {
    /// `out = inp · W_iᵀ + bias` for parameter `i`: the quantized kernel when `i` is quantized.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul(
        &self,
        k: &dyn Kernels,
        out: &mut [f32],
        inp: &[f32],
        params: &[Vec<f32>],
        i: usize,
        bias: Option<&[f32]>,
        c_in: usize,
        c_out: usize,
    ) {
        if let Some(obs) = &self.observer {
            (obs.lock().unwrap_or_else(|e| e.into_inner()))(i, inp);
        }
        match self.get(i) {
            Some(q) => q.matmul(out, inp, bias),
            None => k.matmul_forward(out, inp, &params[i], bias, c_in, c_out),
        }
    }

    pub fn get(&self, i: usize) -> Option<&QuantWeight> {
        self.quant.get(i).and_then(|q| q.as_ref())
    }

    pub fn is_quantized(&self) -> bool {
        self.quant.iter().any(|q| q.is_some())
    }

    /// Installs `q` as parameter `i` of a model with `n_params` tensors.
    pub fn set(&mut self, n_params: usize, i: usize, q: QuantWeight) {
        if self.quant.len() != n_params {
            self.quant.resize_with(n_params, || None);
        }
        self.quant[i] = Some(q);
    }

    pub fn set_observer(&mut self, observer: Option<LinearObserver>) {
        self.observer = observer.map(Mutex::new);
    }

    /// (parameter index, weight) of every quantized tensor.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &QuantWeight)> {
        self.quant.iter().enumerate().filter_map(|(i, q)| q.as_ref().map(|q| (i, q)))
    }

    pub fn weight_bytes(&self) -> usize {
        self.iter().map(|(_, q)| q.weight_bytes()).sum()
    }
}

/// What kiln.json says about a quantized checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantInfo {
    /// The scheme most tensors use (`int8`, `w8a8`, `int4`).
    pub scheme: QuantScheme,
    /// `rtn`, `gptq`, `awq` or `smoothquant`.
    pub method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_size: Option<usize>,
    /// kiln parameter name → scheme, for every quantized tensor.
    pub tensors: BTreeMap<String, QuantScheme>,
    /// Free-form settings of the method (alpha, damping, calibration samples ...).
    #[serde(default)]
    pub settings: serde_json::Value,
}

fn le_bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn le_bytes_f16(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes the quantized tensors of `names[i]` to `path` (see the module docs for the layout).
pub fn write_quant_tensors(path: &Path, lin: &Linears, names: &[String]) -> Result<(), ModelError> {
    let mut parts: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, q) in lin.iter() {
        let name = &names[i];
        let (n, k) = q.shape();
        let act = match q {
            QuantWeight::Int8(w) | QuantWeight::W8A8(w) => {
                parts.push((format!("{name}.qweight"), Dtype::I8, vec![n, k], w.q.iter().map(|&x| x as u8).collect()));
                parts.push((format!("{name}.scale"), Dtype::F32, vec![n], le_bytes_f32(&w.scale)));
                &w.act_scale
            }
            QuantWeight::Int4(w) => {
                let g = w.groups_per_row();
                parts.push((format!("{name}.qweight"), Dtype::U8, vec![n, k / 2], w.packed.clone()));
                parts.push((format!("{name}.scale"), Dtype::F16, vec![n, g], le_bytes_f16(&w.scale)));
                parts.push((format!("{name}.zero"), Dtype::F16, vec![n, g], le_bytes_f16(&w.zero)));
                &w.act_scale
            }
        };
        if let Some(s) = act {
            parts.push((format!("{name}.act_scale"), Dtype::F32, vec![k], le_bytes_f32(s)));
        }
    }
    let views: Vec<(String, TensorView)> = parts
        .iter()
        .map(|(n, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    let meta = HashMap::from([("format".to_string(), "kiln-quant".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| ModelError::Shape(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Reads `model.quant.safetensors` back: one [`QuantWeight`] per tensor kiln.json lists.
pub fn read_quant_tensors(path: &Path, info: &QuantInfo) -> Result<BTreeMap<String, QuantWeight>, ModelError> {
    let file = std::fs::File::open(path).map_err(|e| ck_err(path, format!("cannot open: {e}")))?;
    // SAFETY: read-only map of a file kiln never rewrites in place (atomic renames).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ck_err(path, format!("cannot map: {e}")))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| ck_err(path, format!("not a valid safetensors file ({e}); truncated or corrupt?")))?;
    let get = |name: &str, dtype: Dtype| -> Result<(Vec<usize>, &[u8]), ModelError> {
        let v = st.tensor(name).map_err(|_| ck_err(path, format!("missing tensor {name}")))?;
        if v.dtype() != dtype {
            return Err(ck_err(path, format!("tensor {name} is {:?}, expected {dtype:?}", v.dtype())));
        }
        Ok((v.shape().to_vec(), v.data()))
    };
    let f32s =
        |b: &[u8]| -> Vec<f32> { b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect() };
    let f16s = |b: &[u8]| -> Vec<f16> { b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect() };
    let bad = |name: &str, e: kiln_tensor::quant::QuantError| ck_err(path, format!("tensor {name}: {e}"));
    let mut out = BTreeMap::new();
    for (name, scheme) in &info.tensors {
        let act = match st.tensor(&format!("{name}.act_scale")) {
            Ok(_) => Some(f32s(get(&format!("{name}.act_scale"), Dtype::F32)?.1)),
            Err(_) => None,
        };
        let q = match scheme {
            QuantScheme::Int8 | QuantScheme::W8a8 => {
                let (shape, q) = get(&format!("{name}.qweight"), Dtype::I8)?;
                let [n, k] = shape[..] else { return Err(ck_err(path, format!("{name}.qweight is not 2-D"))) };
                let (_, s) = get(&format!("{name}.scale"), Dtype::F32)?;
                let w = Int8Weight::from_parts(n, k, q.iter().map(|&x| x as i8).collect(), f32s(s), act)
                    .map_err(|e| bad(name, e))?;
                if *scheme == QuantScheme::Int8 {
                    QuantWeight::Int8(w)
                } else {
                    QuantWeight::W8A8(w)
                }
            }
            QuantScheme::Int4 => {
                let (shape, packed) = get(&format!("{name}.qweight"), Dtype::U8)?;
                let [n, half_k] = shape[..] else { return Err(ck_err(path, format!("{name}.qweight is not 2-D"))) };
                let (sshape, s) = get(&format!("{name}.scale"), Dtype::F16)?;
                let (_, z) = get(&format!("{name}.zero"), Dtype::F16)?;
                let groups = sshape.get(1).copied().unwrap_or(0).max(1);
                let k = 2 * half_k;
                let w = Int4Weight::from_parts(n, k, k / groups, packed.to_vec(), f16s(s), f16s(z), act)
                    .map_err(|e| bad(name, e))?;
                QuantWeight::Int4(w)
            }
        };
        out.insert(name.clone(), q);
    }
    Ok(out)
}

/// The `"quantization"` entry of a checkpoint's kiln.json, if it has one.
pub fn read_quant_info(dir: &Path) -> Result<Option<QuantInfo>, ModelError> {
    let path = dir.join("kiln.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ck_err(&path, format!("invalid JSON: {e}")))?;
    match v.get("quantization") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(q) => serde_json::from_value(q.clone())
            .map(Some)
            .map_err(|e| ck_err(&path, format!("invalid \"quantization\" entry: {e}"))),
    }
}
