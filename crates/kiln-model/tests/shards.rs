//! Tensor- and pipeline-parallel shards of GPT-2 against the whole model: the same loss, and
//! gradients that, put back in place, are the whole model's.
//!
//! The whole model is itself checked against PyTorch (pytorch_fixtures.rs); here each shard's
//! sums run in a different order (a row-parallel GEMM sums over half the inputs, then the
//! halves are added), so the bound is f32 round-off: 1e-5 of the largest gradient.

use std::sync::Mutex;
use std::time::Duration;

use kiln_comm::{Comm, ThreadComm};
use kiln_model::{place_tensors, Gpt, GptConfig, ParamInfo, Shard, Slice};
use kiln_tensor::CpuKernels;

const BOUND: f32 = 1e-5;

fn model() -> Gpt {
    let mut cfg = GptConfig::preset("gpt-tiny", Some(97)).unwrap();
    cfg.n_layer = 3;
    Gpt::new(cfg, 7).unwrap()
}

fn batch(b: usize, t: usize, salt: usize) -> (Vec<u32>, Vec<u32>) {
    let x = (0..b * t).map(|i| ((i * 7 + salt) % 97) as u32).collect();
    let y = (0..b * t).map(|i| ((i * 5 + 3 * salt) % 97) as u32).collect();
    (x, y)
}

/// Loss and gradients of the whole model on two micro-batches, each weighted 1/2.
fn whole(m: &mut Gpt, b: usize, t: usize) -> (f32, Vec<Vec<f32>>) {
    let k = CpuKernels::default();
    m.zero_grad();
    let mut loss = 0.0;
    for salt in 0..2 {
        let (x, y) = batch(b, t, salt);
        loss += m.forward(&k, &x, Some(&y), b, t).unwrap().unwrap() / 2.0;
        m.backward(&k, 0.5).unwrap();
    }
    (loss, m.grads.clone())
}

/// A shard's tensor names, slices, gradients and tensor-parallel rank.
type Part = (Vec<ParamInfo>, Vec<Slice>, Vec<Vec<f32>>, usize);

/// Puts shards' gradients back into full-size tensors (tied copies added to the original).
fn assemble(full: &Gpt, shards: &[Part]) -> Vec<Vec<f32>> {
    let mut out: Vec<Vec<f32>> = full.params.iter().map(|p| vec![0.0; p.len()]).collect();
    for (info, slices, grads, tp_rank) in shards {
        place_tensors(&mut out, full.param_info(), grads, info, slices, *tp_rank).unwrap();
    }
    for (info, slices, grads, _) in shards {
        for ((p, s), g) in info.iter().zip(slices).zip(grads) {
            if *s == Slice::TiedCopy {
                let i = full.param_index(&p.name).unwrap();
                out[i].iter_mut().zip(g).for_each(|(o, g)| *o += g);
            }
        }
    }
    out
}

fn assert_grads_close(what: &str, full: &Gpt, got: &[Vec<f32>], want: &[Vec<f32>]) {
    for (i, info) in full.param_info().iter().enumerate() {
        let n: usize = info.shape.iter().product();
        let scale = want[i][..n].iter().fold(0.0f32, |a, x| a.max(x.abs())).max(1e-6);
        let err = got[i][..n].iter().zip(&want[i][..n]).fold(0.0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(err <= BOUND * scale, "{what}: {} differs by {err} (largest gradient {scale})", info.name);
    }
}

#[test]
fn tensor_parallel_shards_compute_the_whole_models_loss_and_gradients() {
    let (b, t) = (2, 12);
    let mut m = model();
    let (want_loss, want) = whole(&mut m, b, t);
    let full = &m;
    let shards: Vec<_> = (0..2)
        .map(|r| Mutex::new(Some(full.to_shard(Shard { tp: 2, tp_rank: r, pp: 1, stage: 0 }).unwrap())))
        .collect();
    let results = ThreadComm::launch(2, Duration::from_secs(30), |c| {
        let k = CpuKernels::default();
        let mut s = shards[c.rank()].lock().unwrap().take().unwrap();
        let shard = s.shard();
        s.set_tp_group(Box::new(c)).unwrap();
        s.zero_grad();
        let mut loss = 0.0;
        for salt in 0..2 {
            let (x, y) = batch(b, t, salt);
            loss += s.forward(&k, &x, Some(&y), b, t).unwrap().unwrap() / 2.0;
            s.backward(&k, 0.5).unwrap();
        }
        (loss, (s.param_info().to_vec(), s.param_slices().to_vec(), s.grads.clone(), shard.tp_rank))
    });
    let mut parts = Vec::new();
    for r in results {
        let (loss, part) = r.unwrap();
        assert!((loss - want_loss).abs() <= BOUND * want_loss, "loss {loss} vs {want_loss}");
        parts.push(part);
    }
    // Each rank holds half of every split tensor.
    let half = parts[0].2.iter().map(Vec::len).sum::<usize>();
    assert!(half < want.iter().map(Vec::len).sum::<usize>());
    assert_grads_close("tp=2", full, &assemble(full, &parts), &want);
}

/// Two stages run by hand in the 1F1B order of the last stage's neighbour: both micro-batches
/// forward (two activation sets in flight), then both backward.
#[test]
fn pipeline_stages_compute_the_whole_models_loss_and_gradients() {
    let (b, t) = (2, 12);
    let k = CpuKernels::default();
    let mut m = model();
    let (want_loss, want) = whole(&mut m, b, t);
    let mut s0 = m.to_shard(Shard { tp: 1, tp_rank: 0, pp: 2, stage: 0 }).unwrap();
    let mut s1 = m.to_shard(Shard { tp: 1, tp_rank: 0, pp: 2, stage: 1 }).unwrap();
    assert!(s0.stage_output().is_none() && s1.logits().is_none());
    s0.zero_grad();
    s1.zero_grad();
    let mut hidden = Vec::new();
    for salt in 0..2 {
        let (x, y) = batch(b, t, salt);
        s0.select_activations(salt);
        assert_eq!(s0.forward_stage(&k, &x, Some(&y), None, b, t).unwrap(), None);
        hidden.push(s0.stage_output().unwrap().to_vec());
    }
    let mut loss = 0.0;
    for (salt, h) in hidden.iter().enumerate() {
        let (x, y) = batch(b, t, salt);
        loss += s1.forward_stage(&k, &x, Some(&y), Some(h), b, t).unwrap().unwrap() / 2.0;
        s1.backward_stage(&k, 0.5, None, &mut |_, _| {}).unwrap();
        let d = s1.stage_input_grad().unwrap().to_vec();
        s0.select_activations(salt);
        s0.backward_stage(&k, 0.5, Some(&d), &mut |_, _| {}).unwrap();
    }
    assert!((loss - want_loss).abs() <= BOUND * want_loss, "loss {loss} vs {want_loss}");
    let parts: Vec<_> =
        [&s0, &s1].iter().map(|s| (s.param_info().to_vec(), s.param_slices().to_vec(), s.grads.clone(), 0)).collect();
    assert_grads_close("pp=2", &m, &assemble(&m, &parts), &want);
    // A stage given the wrong input is an error, not a wrong answer.
    let (x, y) = batch(b, t, 0);
    assert!(s1.forward_stage(&k, &x, Some(&y), None, b, t).is_err());
    let bad = m.to_shard(Shard { tp: 3, tp_rank: 0, pp: 1, stage: 0 });
    assert!(bad.err().unwrap().to_string().contains("--tp 3"));
}
