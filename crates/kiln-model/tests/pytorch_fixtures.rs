//! kiln's GPT-2 against PyTorch: logits, loss and every parameter gradient of the fixtures that
//! tools/gpt2_reference.py wrote (nanoGPT-style model, f32), within 1e-4 relative error.

use std::path::PathBuf;

use kiln_model::{read_safetensors_f32, Gpt, GptConfig};
use kiln_tensor::{CpuKernels, Isa, Kernels, ReferenceKernels};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// A fixture's tensors and the model, batch shape and tokens it describes.
struct Fixture {
    t: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    cfg: GptConfig,
    b: usize,
    s: usize,
    x: Vec<u32>,
    y: Vec<u32>,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let (t, meta) = read_safetensors_f32(&fixture(name)).unwrap();
        let get = |k: &str| meta[k].parse::<usize>().unwrap();
        let cfg = GptConfig {
            n_layer: get("n_layer"),
            n_head: get("n_head"),
            n_embd: get("n_embd"),
            block_size: get("block_size"),
            vocab_size: get("vocab_size"),
        };
        let tokens = |k: &str| t[k].1.iter().map(|&v| v as u32).collect::<Vec<u32>>();
        let (x, y) = (tokens("x"), tokens("y"));
        Fixture { cfg, b: get("batch"), s: get("seq"), x, y, t }
    }

    /// The model at the fixture's initial weights.
    fn model(&self) -> Gpt {
        let mut model = Gpt::zeros(self.cfg.clone()).unwrap();
        for info in model.param_info().to_vec() {
            model.set_param(&info.name, &self.t[&info.name].1).unwrap();
        }
        model
    }
}

fn check(name: &str, kernels: &dyn Kernels) {
    let f = Fixture::load(name);
    let (t, cfg, b, s, x, y) = (&f.t, &f.cfg, f.b, f.s, &f.x, &f.y);
    let mut model = f.model();
    let loss = model.forward(kernels, x, Some(y), b, s).unwrap().unwrap();
    let want_loss = t["loss"].1[0];
    assert!(((loss - want_loss) / want_loss).abs() < 1e-5, "{name} loss {loss} vs PyTorch {want_loss}");

    let (v, vp) = (cfg.vocab_size, cfg.padded_vocab());
    let logits: Vec<f32> = model.logits().unwrap().chunks(vp).flat_map(|row| row[..v].to_vec()).collect();
    let e = rel_err(&logits, &t["logits"].1);
    assert!(e < 1e-4, "{name} logits relative error {e:e}");

    model.zero_grad();
    model.backward(kernels, 1.0).unwrap();
    let mut worst = (0.0, String::new());
    for (i, info) in model.param_info().iter().enumerate() {
        let e = rel_err(model.grad_values(i), &t[&format!("grad.{}", info.name)].1);
        assert!(e < 1e-4, "{name} [{}] grad {} relative error {e:e}", kernels.name(), info.name);
        if e > worst.0 {
            worst = (e, info.name.clone());
        }
    }
    eprintln!(
        "{name} [{}]: loss {loss} (PyTorch {want_loss}), logits err {e:.2e}, worst grad err {:.2e} ({})",
        kernels.name(),
        worst.0,
        worst.1
    );
}

#[test]
fn gpt_tiny_matches_pytorch() {
    for isa in Isa::all_supported() {
        check("gpt_tiny.safetensors", &CpuKernels::with_isa(isa));
    }
    check("gpt_tiny.safetensors", &ReferenceKernels);
}

#[test]
fn gpt_s_shaped_layer_matches_pytorch() {
    check("gpt_s_small.safetensors", &CpuKernels::default());
    check("gpt_s_small.safetensors", &ReferenceKernels);
}

/// Mixed precision against `torch.autocast('cpu', dtype)` (tools/autocast_reference.py): the
/// same weights and batch, forward and backward with bf16 or fp16 linear layers.
///
/// Two implementations that both round to bf16 (8 significant bits) but accumulate in different
/// orders, and where PyTorch also runs attention's matmuls in bf16, agree only to about
/// bf16's own resolution: the bound is 1e-2 relative for logits and gradients (bf16's unit
/// roundoff is 3.9e-3) and 2e-3 for the loss; fp16 (11 bits) gets bounds 8× tighter. Each run
/// must also sit measurably away from the f32 result, so a path that skipped the rounding fails.
#[test]
fn mixed_precision_matches_pytorch_autocast() {
    use kiln_tensor::{LowPrecision, MixedPrecisionKernels};
    for (name, with_grads) in [("gpt_tiny", true), ("gpt_s_small", false)] {
        let fx = Fixture::load(&format!("{name}.safetensors"));
        let (ac, _) = read_safetensors_f32(&fixture(&format!("{name}_autocast.safetensors"))).unwrap();
        let (f, cfg, b, s, x, y) = (&fx.t, &fx.cfg, fx.b, fx.s, &fx.x, &fx.y);
        for (tag, p, tol) in [("bf16", LowPrecision::Bf16, 1e-2f64), ("fp16", LowPrecision::Fp16, 1.25e-3)] {
            let k = MixedPrecisionKernels::new(Box::new(CpuKernels::default()), p, false);
            let mut model = fx.model();
            let loss = model.forward(&k, x, Some(y), b, s).unwrap().unwrap();
            let want_loss = ac[&format!("{tag}.loss")].1[0];
            let loss_err = ((loss - want_loss) / want_loss).abs();
            assert!((loss_err as f64) < tol / 5.0, "{name} {tag}: loss {loss} vs autocast {want_loss}");
            let (v, vp) = (cfg.vocab_size, cfg.padded_vocab());
            let logits: Vec<f32> = model.logits().unwrap().chunks(vp).flat_map(|r| r[..v].to_vec()).collect();
            let e = rel_err(&logits, &ac[&format!("{tag}.logits")].1);
            let from_f32 = rel_err(&logits, &f["logits"].1);
            assert!(e < tol, "{name} {tag}: logits differ from autocast by {e:e}");
            assert!(from_f32 > tol / 100.0, "{name} {tag}: logits equal f32's ({from_f32:e}): nothing was rounded");
            let mut worst = 0.0f64;
            if with_grads {
                model.zero_grad();
                model.backward(&k, 1.0).unwrap();
                for (i, info) in model.param_info().iter().enumerate() {
                    let e = rel_err(model.grad_values(i), &ac[&format!("{tag}.grad.{}", info.name)].1);
                    assert!(e < tol, "{name} {tag} grad {}: {e:e} from autocast", info.name);
                    worst = worst.max(e);
                }
            }
            eprintln!(
                "{name} {tag}: loss err {loss_err:.1e}, logits err {e:.2e} (from f32 {from_f32:.2e}), worst grad err {worst:.2e}"
            );
        }
    }
}
