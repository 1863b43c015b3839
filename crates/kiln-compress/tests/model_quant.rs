//! Whole-model quantization through kiln-model's matmul hook: the quantized forward equals the
//! float forward on the dequantized weights, checkpoints round-trip bit for bit, cached decode
//! equals full recompute, and a quantized model refuses to train.

use std::path::PathBuf;

use kiln_compress::{calibrate, quantize_model, Method, QuantizeOptions};
use kiln_model::{load_trainable, save_quantized, QuantInfo, QuantScheme, TrainableLm};
use kiln_tensor::CpuKernels;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kiln-model/tests/fixtures").join(name)
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn options(scheme: QuantScheme, method: Method) -> QuantizeOptions {
    QuantizeOptions {
        scheme,
        method,
        group: 32,
        alpha: 0.5,
        gptq: Default::default(),
        awq: Default::default(),
        keep: Vec::new(),
    }
}

fn models() -> Vec<(&'static str, Box<dyn TrainableLm>)> {
    vec![
        ("llama", load_trainable(&fixture("hf_llama_tiny")).unwrap()),
        ("qwen2", load_trainable(&fixture("hf_qwen2_tiny")).unwrap()),
        ("gpt2", kiln_model::new_trainable("gpt-tiny", Some(300), Default::default(), 5).unwrap()),
    ]
}

fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 131 + salt * 17 + 7) % vocab) as u32).collect()
}

/// Every scheme and method: the quantized model's logits equal those of a float model holding
/// the effective (dequantized) weights, and stay near the original float model's. (The
/// fixtures' weights are scaled up four-fold and calibrated on 192 random tokens, so the
/// float bounds are loose: this checks the wiring, the quality figures are in BENCHMARKS.md.)
#[test]
fn quantized_forward_is_the_float_forward_on_the_effective_weights() {
    let k = CpuKernels::default();
    let cases = [
        (QuantScheme::Int8, Method::Rtn, 0.05, 0.05),
        (QuantScheme::Int8, Method::Gptq, 0.05, 0.05),
        (QuantScheme::W8a8, Method::SmoothQuant, 0.05, 0.08),
        (QuantScheme::Int4, Method::Rtn, 0.05, 0.3),
        (QuantScheme::Int4, Method::Gptq, 0.05, 0.3),
        (QuantScheme::Int4, Method::Awq, 0.05, 0.3),
    ];
    for (name, _) in models() {
        for &(scheme, method, exact_bound, float_bound) in &cases {
            let mut model = models().into_iter().find(|(n, _)| *n == name).unwrap().1;
            let v = model.vocab_size();
            let x = tokens(40, v, 1);
            let want = model.sequence_logits(&k, &x).unwrap();
            let calib: Vec<Vec<u32>> = (0..4).map(|s| tokens(48, v, s + 2)).collect();
            let stats = calibrate(model.as_mut(), &k, &calib, method == Method::Gptq, &mut |_, _| {}).unwrap();
            let layers = quantize_model(model.as_mut(), &options(scheme, method), &stats, &mut |_, _, _| {}).unwrap();
            assert_eq!(layers.len(), model.linear_params().len());
            let got = model.sequence_logits(&k, &x).unwrap();

            // The same weights in f32: every quantized tensor replaced by its dequantized values.
            let mut twin = models().into_iter().find(|(n, _)| *n == name).unwrap().1;
            for (i, q) in model.linears().iter() {
                let w = q.dequantize();
                twin.params_mut()[i][..w.len()].copy_from_slice(&w);
            }
            let eff = twin.sequence_logits(&k, &x).unwrap();
            let e_eff = rel_err(&got, &eff);
            let e_float = rel_err(&got, &want);
            eprintln!("{name} {scheme:?}/{method:?}: vs effective weights {e_eff:.2e}, vs float {e_float:.2e}");
            // Every scheme also rounds the activations to int8 (w8a8 per token, int8 and int4 per
            // 32 block as llama.cpp's Q8_0 and Q4_0 × Q8_0), which the f32 twin does not.
            assert!(e_eff < exact_bound, "{name} {scheme:?}/{method:?}: {e_eff:e} from the effective-weight model");
            assert!(e_float < float_bound, "{name} {scheme:?}/{method:?}: {e_float:e} from the float model");
            assert!(model.backward(&k, 1.0).is_err(), "a quantized model must refuse to train");
        }
    }
}

/// Save, load: the same logits bit for bit; cached decode equals full recompute.
#[test]
fn quantized_checkpoints_round_trip_and_decode_matches_recompute() {
    let k = CpuKernels::default();
    for (scheme, method) in
        [(QuantScheme::Int4, Method::Awq), (QuantScheme::W8a8, Method::SmoothQuant), (QuantScheme::Int8, Method::Rtn)]
    {
        for (name, mut model) in models() {
            let v = model.vocab_size();
            let calib: Vec<Vec<u32>> = (0..3).map(|s| tokens(32, v, s)).collect();
            let stats = calibrate(model.as_mut(), &k, &calib, false, &mut |_, _| {}).unwrap();
            let layers = quantize_model(model.as_mut(), &options(scheme, method), &stats, &mut |_, _, _| {}).unwrap();
            let info = QuantInfo {
                scheme,
                method: method.name().into(),
                group_size: Some(32),
                tensors: layers.iter().map(|l| (l.name.clone(), l.scheme)).collect(),
                settings: serde_json::Value::Null,
            };
            let dir = tempfile::tempdir().unwrap();
            save_quantized(model.as_ref(), dir.path(), None, &info).unwrap();
            let kiln_json = serde_json::json!({ "quantization": info });
            std::fs::write(dir.path().join("kiln.json"), kiln_json.to_string()).unwrap();
            let mut back = load_trainable(dir.path()).unwrap();
            let x = tokens(33, v, 9);
            assert_eq!(model.sequence_logits(&k, &x).unwrap(), back.sequence_logits(&k, &x).unwrap(), "{name}");

            // Prefill 20 tokens, decode 13 more (the one-row kernels): the last logits match a full forward.
            let mut cache = back.new_cache(1);
            let mut logits = back.prefill(&k, &mut cache, 0, &x[..20]).unwrap();
            for &t in &x[20..] {
                logits = back.decode(&k, &mut cache, &[0], &[t]).unwrap();
            }
            let full = back.sequence_logits(&k, &x).unwrap();
            let e = rel_err(&logits, &full[(x.len() - 1) * v..]);
            // w8a8 and int4 round each row's activations with that row's own scales, so batch
            // shape does not change the result; the bound covers f32 summation order only.
            let bound = 1e-4;
            eprintln!("{name} {scheme:?}: decode vs recompute {e:.2e}");
            assert!(e < bound, "{name} {scheme:?}: decode vs recompute {e:e}");

            // A corrupted quantized tensor file is an error, not a panic.
            std::fs::write(dir.path().join("model.quant.safetensors"), b"garbage").unwrap();
            assert!(load_trainable(dir.path()).is_err());
        }
    }
}

/// Sequential GPTQ: every linear layer is quantized exactly once, in block order with the head
/// last, and the first block comes out exactly as the one-pass method makes it (both calibrate
/// it on the float model), while later blocks differ (they were calibrated downstream of an
/// already quantized block).
#[test]
fn sequential_gptq_calibrates_each_block_on_the_quantized_blocks_before_it() {
    use kiln_compress::quantize_model_sequential;
    let k = CpuKernels::default();
    let opts = options(QuantScheme::Int4, Method::Gptq);
    for (name, mut one_pass) in models() {
        let mut seq = match name {
            "gpt2" => kiln_model::new_trainable("gpt-tiny", Some(300), Default::default(), 5).unwrap(),
            _ => load_trainable(&fixture(if name == "llama" { "hf_llama_tiny" } else { "hf_qwen2_tiny" })).unwrap(),
        };
        let v = one_pass.vocab_size();
        let windows: Vec<Vec<u32>> = (0..3).map(|s| tokens(64, v, s)).collect();
        let calib = calibrate(one_pass.as_mut(), &k, &windows, true, &mut |_, _| {}).unwrap();
        let a = quantize_model(one_pass.as_mut(), &opts, &calib, &mut |_, _, _| {}).unwrap();
        let mut order = Vec::new();
        let b = quantize_model_sequential(seq.as_mut(), &k, &windows, &opts, &mut |_, _, n| order.push(n.to_string()))
            .unwrap();
        let names = |r: &[kiln_compress::LayerReport]| r.iter().map(|l| l.name.clone()).collect::<Vec<_>>();
        let mut sorted = names(&b);
        sorted.sort();
        let mut want = names(&a);
        want.sort();
        assert_eq!(sorted, want, "{name}: every linear once");
        assert_eq!(order, names(&b), "{name}: progress follows the order of work");
        let block = |n: &str| n.split('.').skip_while(|p| *p != "h" && *p != "layers").nth(1).map(str::to_string);
        assert_eq!(block(&order[0]).as_deref(), Some("0"), "{name}: starts at block 0");
        let first_block = |r: &kiln_compress::LayerReport| block(&r.name).as_deref() == Some("0");
        let later = |r: &kiln_compress::LayerReport| block(&r.name).is_some_and(|b| b != "0");
        let err = |rs: &[kiln_compress::LayerReport], f: &dyn Fn(&kiln_compress::LayerReport) -> bool| {
            rs.iter().filter(|r| f(r)).map(|r| (r.name.clone(), r.output_error.unwrap().to_bits())).collect::<Vec<_>>()
        };
        let sorted_err = |mut v: Vec<(String, u64)>| {
            v.sort();
            v
        };
        assert_eq!(sorted_err(err(&a, &first_block)), sorted_err(err(&b, &first_block)), "{name}: block 0");
        assert_ne!(sorted_err(err(&a, &later)), sorted_err(err(&b, &later)), "{name}: later blocks");
    }
}
