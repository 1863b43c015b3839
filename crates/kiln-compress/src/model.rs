//! Quantizing a whole model: gather every linear layer's input statistics on calibration text
//! (one float forward per sequence, through the model's matmul observer), quantize each weight by
//! the chosen method, and install the results in the model.
//!
//! All layers are calibrated on the float model's activations in one pass (not layer by layer
//! on the already-quantized prefix, as the GPTQ paper does): one forward instead of one per
//! layer, at the price of ignoring the error earlier quantized layers feed into later ones.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kiln_model::{install_quantized, QuantScheme, QuantWeight, TrainableLm};
use kiln_tensor::Kernels;

use crate::{
    awq_int4_with, gptq_int4, gptq_int8, relative_output_error, rtn_int4, rtn_int8, w8a8_smoothquant, AwqOptions,
    CompressError, GptqOptions, LinearCalib, Result,
};

/// How the weights are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Round to nearest: no calibration.
    Rtn,
    /// GPTQ: error feedback through the inverse Hessian of the layer's inputs.
    Gptq,
    /// AWQ: per-input-channel scales from mean |activation|, then a clipping search (int4).
    Awq,
    /// SmoothQuant: migrate activation outliers into the weights (w8a8).
    SmoothQuant,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "rtn" => Some(Method::Rtn),
            "gptq" => Some(Method::Gptq),
            "awq" => Some(Method::Awq),
            "smoothquant" => Some(Method::SmoothQuant),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
            Method::SmoothQuant => "smoothquant",
        }
    }
    pub fn needs_calibration(self) -> bool {
        self != Method::Rtn
    }
}

#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub scheme: QuantScheme,
    pub method: Method,
    /// int4 group size (32, 64 or 128).
    pub group: usize,
    /// SmoothQuant's migration strength α.
    pub alpha: f32,
    pub gptq: GptqOptions,
    pub awq: AwqOptions,
    /// Parameter indices left in f32.
    pub keep: Vec<usize>,
}

/// One quantized tensor: its name, scheme, shape, and the relative output error
/// `‖(W_q − W)Xᵀ‖ / ‖WXᵀ‖` of its weights on the calibration sample (when there was one).
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerReport {
    pub name: String,
    /// The requested scheme, or int8 where an int4 group does not divide the input width.
    pub scheme: QuantScheme,
    pub n: usize,
    pub k: usize,
    pub output_error: Option<f64>,
}

/// Which scheme/method pairs make sense, as a clear error for the rest.
pub fn check_options(o: &QuantizeOptions) -> Result<()> {
    let ok = matches!(
        (o.scheme, o.method),
        (QuantScheme::Int8, Method::Rtn | Method::Gptq)
            | (QuantScheme::W8a8, Method::Rtn | Method::SmoothQuant)
            | (QuantScheme::Int4, Method::Rtn | Method::Gptq | Method::Awq)
    );
    if !ok {
        return Err(CompressError::Option(format!(
            "--scheme {} does not go with --method {} (int8: rtn, gptq; w8a8: rtn, smoothquant; int4: rtn, gptq, awq)",
            o.scheme.name(),
            o.method.name()
        )));
    }
    if o.scheme == QuantScheme::Int4 && !matches!(o.group, 32 | 64 | 128) {
        return Err(CompressError::Option(format!("--group-size {}: use 32, 64 or 128", o.group)));
    }
    if o.method == Method::SmoothQuant && !(0.0..=1.0).contains(&o.alpha) {
        return Err(CompressError::Option(format!("--alpha {}: use a value in [0, 1]", o.alpha)));
    }
    Ok(())
}

/// The statistics being gathered, and the first error an observation hit.
type CalibState = (BTreeMap<usize, LinearCalib>, Option<CompressError>);

/// Input statistics of every linear layer (by parameter index) over `sequences`, run one at a
/// time through the float model. `hessian` is only needed by GPTQ.
pub fn calibrate(
    model: &mut dyn TrainableLm,
    kern: &dyn Kernels,
    sequences: &[Vec<u32>],
    hessian: bool,
    on_sequence: &mut dyn FnMut(usize, usize),
) -> Result<BTreeMap<usize, LinearCalib>> {
    calibrate_only(model, kern, sequences, hessian, None, on_sequence)
}

/// [`calibrate`] for the linear layers in `only` (all when None), through the model as it is
/// now (layers already quantized run quantized).
pub fn calibrate_only(
    model: &mut dyn TrainableLm,
    kern: &dyn Kernels,
    sequences: &[Vec<u32>],
    hessian: bool,
    only: Option<&[usize]>,
    on_sequence: &mut dyn FnMut(usize, usize),
) -> Result<BTreeMap<usize, LinearCalib>> {
    if sequences.is_empty() || sequences.iter().all(|s| s.is_empty()) {
        return Err(CompressError::NoCalibration);
    }
    let dims: BTreeMap<usize, usize> = model
        .linear_params()
        .into_iter()
        .filter(|i| only.is_none_or(|o| o.contains(i)))
        .map(|i| (i, model.param_info()[i].shape[1]))
        .collect();
    let stats: Arc<Mutex<CalibState>> = Arc::new(Mutex::new((
        dims.iter()
            .map(|(&i, &k)| {
                let c = if hessian { LinearCalib::new(k) } else { LinearCalib::without_hessian(k) };
                (i, c)
            })
            .collect(),
        None,
    )));
    let sink = stats.clone();
    model.linears_mut().set_observer(Some(Box::new(move |i, x| {
        let mut g = sink.lock().unwrap_or_else(|e| e.into_inner());
        let (map, err) = &mut *g;
        if let Some(c) = map.get_mut(&i) {
            let rows = x.len() / c.k();
            if let Err(e) = c.observe(x, rows) {
                err.get_or_insert(e);
            }
        }
    })));
    let mut result = Ok(());
    for (j, seq) in sequences.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
        if let Err(e) = model.sequence_logits(kern, seq) {
            result = Err(CompressError::Option(format!("calibration forward failed: {e}")));
            break;
        }
        on_sequence(j + 1, sequences.len());
    }
    model.linears_mut().set_observer(None);
    result?;
    let (map, err) = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
    match err {
        Some(e) => Err(e),
        None => Ok(map),
    }
}

/// Quantizes every linear weight of `model` not in `opts.keep` and installs the result.
pub fn quantize_model(
    model: &mut dyn TrainableLm,
    opts: &QuantizeOptions,
    calib: &BTreeMap<usize, LinearCalib>,
    on_layer: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<LayerReport>> {
    let targets: Vec<usize> = model.linear_params().into_iter().filter(|i| !opts.keep.contains(i)).collect();
    quantize_linears(model, opts, calib, &targets, 0, targets.len(), on_layer)
}

/// The transformer block a parameter belongs to (`h.3.…`, `model.layers.3.…`), None for the
/// embeddings and the output head.
fn block_of(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "h" || p == "layers" {
            return parts.next().and_then(|n| n.parse().ok());
        }
    }
    None
}

/// GPTQ's "true sequential" order: block by block from the input, each block's linear layers
/// calibrated on the activations of the model with every earlier block already quantized (so
/// a layer compensates the error upstream of it, as in the GPTQ reference code), then the
/// output head last. Costs one calibration pass per block instead of one in all.
pub fn quantize_model_sequential(
    model: &mut dyn TrainableLm,
    kern: &dyn Kernels,
    sequences: &[Vec<u32>],
    opts: &QuantizeOptions,
    on_layer: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<LayerReport>> {
    check_options(opts)?;
    let targets: Vec<usize> = model.linear_params().into_iter().filter(|i| !opts.keep.contains(i)).collect();
    let mut blocks: BTreeMap<(bool, usize), Vec<usize>> = BTreeMap::new();
    for &i in &targets {
        let key = match block_of(&model.param_info()[i].name) {
            Some(b) => (false, b),
            None => (true, 0), // after every block
        };
        blocks.entry(key).or_default().push(i);
    }
    let hessian = opts.method == Method::Gptq;
    let mut reports = Vec::with_capacity(targets.len());
    for group in blocks.values() {
        let calib = calibrate_only(model, kern, sequences, hessian, Some(group), &mut |_, _| {})?;
        let done = reports.len();
        reports.extend(quantize_linears(model, opts, &calib, group, done, targets.len(), on_layer)?);
    }
    Ok(reports)
}

/// Quantizes and installs the linear weights `targets`; progress counts from `first` of `total`.
fn quantize_linears(
    model: &mut dyn TrainableLm,
    opts: &QuantizeOptions,
    calib: &BTreeMap<usize, LinearCalib>,
    targets: &[usize],
    first: usize,
    total: usize,
    on_layer: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<LayerReport>> {
    check_options(opts)?;
    let mut reports = Vec::with_capacity(targets.len());
    for (j, &i) in targets.iter().enumerate() {
        let name = model.param_info()[i].name.clone();
        on_layer(first + j, total, &name);
        let k = model.param_info()[i].shape[1];
        let w = model.params()[i].clone();
        let n = w.len() / k;
        let c = calib.get(&i);
        let need = || c.ok_or(CompressError::NoCalibration);
        // Rows that int4 groups cannot tile fall back to int8, as llama.cpp falls back to a
        // wider type for such tensors.
        let int4_fits = k.is_multiple_of(opts.group);
        let q = match (opts.scheme, opts.method) {
            (QuantScheme::Int4, Method::Gptq) if !int4_fits => {
                QuantWeight::Int8(gptq_int8(&w, n, k, need()?, &opts.gptq)?)
            }
            (QuantScheme::Int4, _) if !int4_fits => QuantWeight::Int8(rtn_int8(&w, n, k)?),
            (QuantScheme::Int8, Method::Rtn) => QuantWeight::Int8(rtn_int8(&w, n, k)?),
            (QuantScheme::Int8, Method::Gptq) => QuantWeight::Int8(gptq_int8(&w, n, k, need()?, &opts.gptq)?),
            (QuantScheme::W8a8, Method::Rtn) => QuantWeight::W8A8(rtn_int8(&w, n, k)?),
            (QuantScheme::W8a8, Method::SmoothQuant) => {
                QuantWeight::W8A8(w8a8_smoothquant(&w, n, k, need()?, opts.alpha)?)
            }
            (QuantScheme::Int4, Method::Rtn) => QuantWeight::Int4(rtn_int4(&w, n, k, opts.group)?),
            (QuantScheme::Int4, Method::Gptq) => {
                QuantWeight::Int4(gptq_int4(&w, n, k, opts.group, need()?, &opts.gptq)?)
            }
            (QuantScheme::Int4, Method::Awq) => {
                QuantWeight::Int4(awq_int4_with(&w, n, k, opts.group, need()?, &opts.awq)?)
            }
            _ => unreachable!("check_options rejected the other pairs"),
        };
        let output_error = c.filter(|c| c.sample_rows() > 0).map(|c| {
            let w_eff = q.dequantize();
            relative_output_error(&w, &w_eff, n, k, c.samples(), c.sample_rows())
        });
        let scheme = q.scheme();
        install_quantized(model, i, q).map_err(|e| CompressError::Option(e.to_string()))?;
        reports.push(LayerReport { name, scheme, n, k, output_error });
    }
    Ok(reports)
}
