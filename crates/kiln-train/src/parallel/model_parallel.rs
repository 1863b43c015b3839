//! Tensor and pipeline parallelism: one rank of a `dp × tp × pp` plan trains its shard of the
//! model (`TrainableLm::to_shard`).
//!
//! Tensor parallelism lives inside the shard (its forward and backward sum over the tp group).
//! Here is the rest of a step: the pipeline schedule, 1F1B over `M` micro-batches (stage `s` of
//! `P` runs `min(P − s − 1, M)` forwards ahead, then alternates one forward and one backward,
//! so it holds at most `P − s` micro-batches' activations); the tied token table's two copies
//! (first and last stage) summed; the data-parallel reduction of the shard's gradients over the
//! ranks holding the same shard; the global gradient norm and loss over the whole world; and
//! the update of the shard. The trainer's whole model is brought up to date only when it is
//! needed (evaluation, checkpoint, end of run): every rank sends the tensors it owns to world
//! rank 0, which puts them in place, so checkpoints stay unsharded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kiln_comm::{Comm, CommError, Coords, Plan, ReduceOp};
use kiln_model::{cut_tensors, place_tensors, Shard, TrainableLm};
use kiln_tensor::Kernels;

use super::{DpRank, NextBatch};
use crate::{AdamW, LossScaler, TrainConfig, TrainError};

/// Tags of the point-to-point messages: activations, their gradients, the tied table, gathers.
const TAG_FORWARD: u32 = 0;
const TAG_BACKWARD: u32 = 1;
const TAG_TIED_TO_FIRST: u32 = 2;
const TAG_TIED_TO_LAST: u32 = 3;
const TAG_GATHER: u32 = 4;

/// A rank's part in tensor and pipeline parallelism.
pub(crate) struct ModelParallel {
    plan: Plan,
    coords: Coords,
    world: Box<dyn Comm>,
    /// The ranks holding the other stages of this rank's pipeline (same dp and tp index).
    pp: Box<dyn Comm>,
    /// World rank 0 trains this shard while the trainer keeps the whole model (stale between
    /// gathers); on the other ranks the shard is the model the worker passes in.
    local: Option<(Box<dyn TrainableLm>, AdamW)>,
    /// Whether each of the shard's tensors counts once in the model (norm, gather).
    owned: Vec<bool>,
    /// Seconds spent waiting for another stage's activations or gradients.
    pub pipeline_secs: f64,
}

/// `shard`'s AdamW moments, cut out of the whole model's.
pub(crate) fn cut_moments(full: &dyn TrainableLm, opt: &AdamW, shard: &dyn TrainableLm) -> Result<AdamW, TrainError> {
    let lens: Vec<usize> = shard.params().iter().map(Vec::len).collect();
    let (info, slices) = (shard.param_info(), shard.param_slices());
    Ok(AdamW {
        m: cut_tensors(&opt.m, full.param_info(), info, &slices, &lens)?,
        v: cut_tensors(&opt.v, full.param_info(), info, &slices, &lens)?,
        t: opt.t,
    })
}

/// The shard world rank `rank` of `plan` holds.
pub(crate) fn shard_of(plan: Plan, rank: usize) -> Shard {
    let c = plan.coords(rank);
    Shard { tp: plan.tp, tp_rank: c.tp, pp: plan.pp, stage: c.pp }
}

impl ModelParallel {
    /// `local` is world rank 0's shard and moments (None on the other ranks).
    pub(crate) fn new(
        plan: Plan,
        world: Box<dyn Comm>,
        pp: Box<dyn Comm>,
        owned: Vec<bool>,
        local: Option<(Box<dyn TrainableLm>, AdamW)>,
    ) -> ModelParallel {
        let coords = plan.coords(world.rank());
        ModelParallel { plan, coords, world, pp, local, owned, pipeline_secs: 0.0 }
    }

    pub(crate) fn world(&self) -> &dyn Comm {
        self.world.as_ref()
    }
}

/// A group whose all-reduces are timed (the benchmark's tensor-parallel communication).
#[derive(Clone, Default)]
pub(crate) struct TimedComm {
    nanos: Arc<AtomicU64>,
}

struct Timed {
    inner: Box<dyn Comm>,
    nanos: Arc<AtomicU64>,
}

impl TimedComm {
    pub(crate) fn wrap(&self, inner: Box<dyn Comm>) -> impl Comm {
        Timed { inner, nanos: self.nanos.clone() }
    }

    pub(crate) fn secs(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

impl Timed {
    fn time<R>(&self, f: impl FnOnce() -> R) -> R {
        let t0 = Instant::now();
        let r = f();
        self.nanos.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

impl Comm for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.time(|| self.inner.all_reduce(buf, op))
    }
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<(), CommError> {
        self.time(|| self.inner.all_reduce_f64(buf, op))
    }
    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.time(|| self.inner.reduce_scatter(input, output, op))
    }
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        self.time(|| self.inner.all_gather(input, output))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        self.time(|| self.inner.broadcast(buf, root))
    }
    fn send(&self, buf: &[f32], dest: usize, tag: u32) -> Result<(), CommError> {
        self.time(|| self.inner.send(buf, dest, tag))
    }
    fn recv(&self, buf: &mut [f32], src: usize, tag: u32) -> Result<(), CommError> {
        self.time(|| self.inner.recv(buf, src, tag))
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.time(|| self.inner.barrier())
    }
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Comm>, CommError> {
        self.inner.split(color, key)
    }
}

/// Runs `f`, adding its time to `secs`.
fn timed<R>(secs: &mut f64, f: impl FnOnce() -> R) -> R {
    let t0 = Instant::now();
    let r = f();
    *secs += t0.elapsed().as_secs_f64();
    r
}

/// Forward and backward of `m` micro-batches of `bm` rows (`x`, `y`: `[m·bm, t]`) through this
/// rank's stage in the 1F1B order, each micro-batch's loss gradient scaled by `scale`. Returns
/// the sum of the micro-batches' mean losses (last stage; 0 elsewhere).
#[allow(clippy::too_many_arguments)]
fn one_f_one_b(
    model: &mut dyn TrainableLm,
    k: &dyn Kernels,
    pp: &mut dyn Comm,
    x: &[u32],
    y: &[u32],
    (m, bm, t): (usize, usize, usize),
    scale: f32,
    wait: &mut f64,
) -> Result<f64, TrainError> {
    let (p, s) = (pp.size(), pp.rank());
    let pp: &dyn Comm = pp;
    let (first, last) = (s == 0, s + 1 == p);
    let warmup = (p - s - 1).min(m);
    let slots = (p - s).min(m);
    let mut order: Vec<(bool, usize)> = (0..warmup).map(|j| (true, j)).collect();
    for i in 0..m - warmup {
        order.extend([(true, warmup + i), (false, i)]);
    }
    order.extend((m - warmup..m).map(|i| (false, i)));
    let n = bm * t;
    let mut buf = vec![0.0f32; n * model.hidden_width()];
    let mut loss = 0.0f64;
    for (forward, j) in order {
        model.select_activations(j % slots);
        let tag = |dir: u32| 2 * j as u32 + dir + 8;
        if forward {
            let rows = j * n..(j + 1) * n;
            if !first {
                timed(wait, || pp.recv(&mut buf, s - 1, tag(TAG_FORWARD)))?;
            }
            let hidden = (!first).then_some(&buf[..]);
            let l = model.forward_stage(k, &x[rows.clone()], Some(&y[rows]), hidden, bm, t)?;
            match l {
                Some(l) if last => loss += l as f64,
                _ => pp.send(stage_data(model.stage_output(), "output")?, s + 1, tag(TAG_FORWARD))?,
            }
        } else {
            if !last {
                timed(wait, || pp.recv(&mut buf, s + 1, tag(TAG_BACKWARD)))?;
            }
            let d_out = (!last).then_some(&buf[..]);
            model.backward_stage(k, scale, d_out, &mut |_, _| {})?;
            if !first {
                pp.send(stage_data(model.stage_input_grad(), "input gradient")?, s - 1, tag(TAG_BACKWARD))?;
            }
        }
    }
    Ok(loss)
}

fn stage_data<'a>(v: Option<&'a [f32]>, what: &str) -> Result<&'a [f32], TrainError> {
    v.ok_or_else(|| TrainError::Parallel(format!("the pipeline stage produced no {what}")))
}

/// Sums the gradients of the tied token table's two copies (first and last stage).
fn sum_tied_copies(model: &mut dyn TrainableLm, pp: &dyn Comm) -> Result<(), TrainError> {
    let (p, s) = (pp.size(), pp.rank());
    let Some(i) = model.tied_param() else { return Ok(()) };
    let g = &mut model.grads_mut()[i];
    if s == 0 {
        let mut other = vec![0.0f32; g.len()];
        pp.recv(&mut other, p - 1, TAG_TIED_TO_FIRST)?;
        g.iter_mut().zip(&other).for_each(|(a, b)| *a += b);
        pp.send(g, p - 1, TAG_TIED_TO_LAST)?;
    } else {
        pp.send(g, 0, TAG_TIED_TO_FIRST)?;
        pp.recv(g, 0, TAG_TIED_TO_LAST)?;
    }
    Ok(())
}

impl DpRank {
    pub(crate) fn is_model_parallel(&self) -> bool {
        self.mp.is_some()
    }

    /// [`DpRank::step`] for a rank of a plan with tp or pp above 1.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn step_model_parallel(
        &mut self,
        model: &mut dyn TrainableLm,
        opt: &mut AdamW,
        k: &dyn Kernels,
        cfg: &TrainConfig,
        lr: f32,
        next_batch: &mut NextBatch,
        scaler: Option<&mut LossScaler>,
    ) -> Result<(f32, f32, bool), TrainError> {
        let mut mp = self.mp.take().expect("model parallel");
        let r = self.step_shard(&mut mp, model, opt, k, cfg, lr, next_batch, scaler);
        self.mp = Some(mp);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn step_shard(
        &mut self,
        mp: &mut ModelParallel,
        model: &mut dyn TrainableLm,
        opt: &mut AdamW,
        k: &dyn Kernels,
        cfg: &TrainConfig,
        lr: f32,
        next_batch: &mut NextBatch,
        scaler: Option<&mut LossScaler>,
    ) -> Result<(f32, f32, bool), TrainError> {
        let (model, opt): (&mut dyn TrainableLm, &mut AdamW) = match mp.local.as_mut() {
            Some((m, o)) => (m.as_mut(), o),
            None => (model, opt),
        };
        let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
        let (d, r) = (self.comm.size(), self.comm.rank());
        let micro = cfg.pipeline_micro_batches();
        let (bl, t) = (cfg.batch / d, cfg.seq);
        let rows = r * bl * t..(r + 1) * bl * t;
        model.zero_grad();
        // Every micro-batch's mean-loss gradient, pre-divided so the sums over micro-batches,
        // accumulation steps and dp ranks make the mean over the global batch.
        let scale = loss_scale / (cfg.grad_accum * d * micro) as f32;
        let mut loss = 0.0f64;
        for _ in 0..cfg.grad_accum {
            next_batch(&mut self.x, &mut self.y)?;
            let (x, y) = (&self.x[rows.clone()], &self.y[rows.clone()]);
            let (pp, wait) = (mp.pp.as_mut(), &mut mp.pipeline_secs);
            let shape = (micro, bl / micro, t);
            let sum = self.pool.install(|| one_f_one_b(&mut *model, k, pp, x, y, shape, scale, wait))?;
            loss += sum / (micro * cfg.grad_accum) as f64;
        }
        let t0 = Instant::now();
        sum_tied_copies(model, mp.pp.as_ref())?;
        if d > 1 || self.zero.is_some() {
            self.reduce_all_buckets(model)?;
        }
        // The norm counts each tensor once: its owner's piece, on one dp rank (all of them
        // under ZeRO, each holding a different shard of the reduced gradient).
        let sumsq = match &self.zero {
            Some(z) => {
                let mut total = 0.0;
                let mut off = 0;
                for fr in &self.mine {
                    for (i, tr, o) in self.layout.pieces(fr.clone()) {
                        if mp.owned[i] {
                            total += k.sum_of_squares(&z.g[off + o..off + o + tr.len()]);
                        }
                    }
                    off += fr.len();
                }
                total
            }
            None if r == 0 => {
                let g = model.grads();
                (0..g.len()).filter(|&i| mp.owned[i]).map(|i| k.sum_of_squares(&g[i])).sum()
            }
            None => 0.0,
        };
        let reports_loss = mp.coords.pp + 1 == mp.plan.pp && mp.coords.tp == 0;
        let mut sums = [if reports_loss { loss } else { 0.0 }, sumsq];
        mp.world.all_reduce_f64(&mut sums, ReduceOp::Sum)?;
        self.comm_secs += t0.elapsed().as_secs_f64();
        let norm = sums[1].sqrt() as f32 / loss_scale;
        let apply = scaler.is_none_or(|s| s.update(norm.is_finite()));
        if apply {
            if self.zero.is_some() {
                self.update_shard(model, k, cfg, lr, norm, 1.0 / loss_scale);
                opt.t = self.zero.as_ref().expect("zero").t;
                self.timed(|s| s.all_gather_params(model))?;
            } else {
                self.pool.install(|| opt.apply(model, k, lr, cfg, norm, 1.0 / loss_scale));
            }
        }
        Ok(((sums[0] / d as f64) as f32, norm, !apply))
    }

    /// Reduces every gradient bucket over the dp group after backward (all-reduce, or
    /// reduce-scatter into the ZeRO shard).
    fn reduce_all_buckets(&mut self, model: &mut dyn TrainableLm) -> Result<(), TrainError> {
        for (b, range) in self.layout.buckets.clone().into_iter().enumerate() {
            let buf = &mut self.staging[..range.len()];
            self.layout.pack(range.clone(), model.grads(), buf);
            match self.zero.as_mut() {
                None => {
                    self.comm.all_reduce(buf, ReduceOp::Sum)?;
                    self.layout.unpack(range, buf, model.grads_mut());
                }
                Some(z) => {
                    let off: usize = self.mine[..b].iter().map(|m| m.len()).sum();
                    let n = self.mine[b].len();
                    self.comm.reduce_scatter(buf, &mut z.g[off..off + n], ReduceOp::Sum)?;
                }
            }
        }
        Ok(())
    }

    /// Brings the whole model and its moments on world rank 0 up to date from every rank's
    /// shard (collective over the world). On rank 0, `model` and `opt` are the whole ones to
    /// fill; elsewhere they are this rank's shard and its moments.
    pub(crate) fn gather_whole_model(
        &mut self,
        model: &mut dyn TrainableLm,
        opt: &mut AdamW,
    ) -> Result<(), TrainError> {
        let mut mp = self.mp.take().expect("model parallel");
        let r = self.gather_into_root(&mut mp, model, opt);
        self.mp = Some(mp);
        r
    }

    fn gather_into_root(
        &mut self,
        mp: &mut ModelParallel,
        model: &mut dyn TrainableLm,
        opt: &mut AdamW,
    ) -> Result<(), TrainError> {
        let root = mp.local.is_some();
        let keep = self.comm.rank() == 0;
        let gathered = {
            let shard: &dyn TrainableLm = match &mp.local {
                Some((m, _)) => m.as_ref(),
                None => &*model,
            };
            self.gather_moments(shard, keep)?
        };
        if !keep {
            return Ok(());
        }
        if !root {
            let moments = gathered.as_ref().unwrap_or(opt);
            let mut buf = Vec::new();
            for (i, owned) in mp.owned.iter().enumerate() {
                if *owned {
                    buf.extend_from_slice(&model.params()[i]);
                    buf.extend_from_slice(&moments.m[i]);
                    buf.extend_from_slice(&moments.v[i]);
                }
            }
            mp.world.send(&buf, 0, TAG_GATHER)?;
            return Ok(());
        }
        let (shard, shard_opt) = mp.local.as_ref().expect("root");
        let moments = gathered.as_ref().unwrap_or(shard_opt);
        place_part(model, opt, shard.as_ref(), shard.params(), &moments.m, &moments.v)?;
        opt.t = moments.t;
        for w in 1..mp.plan.world_size() {
            if mp.plan.coords(w).dp != 0 {
                continue;
            }
            let template = model.to_shard(shard_of(mp.plan, w))?;
            let slices = template.param_slices();
            let lens: Vec<usize> = template.params().iter().map(Vec::len).collect();
            let total: usize =
                lens.iter().zip(&slices).filter(|(_, s)| s.owned(mp.plan.coords(w).tp)).map(|(n, _)| 3 * n).sum();
            let mut buf = vec![0.0f32; total];
            mp.world.recv(&mut buf, w, TAG_GATHER)?;
            let (mut p, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
            let mut off = 0;
            for (n, s) in lens.iter().zip(&slices) {
                if s.owned(mp.plan.coords(w).tp) {
                    for out in [&mut p, &mut m, &mut v] {
                        out.push(buf[off..off + n].to_vec());
                        off += n;
                    }
                } else {
                    for out in [&mut p, &mut m, &mut v] {
                        out.push(Vec::new());
                    }
                }
            }
            place_part(model, opt, template.as_ref(), &p, &m, &v)?;
        }
        Ok(())
    }
}

/// Writes a shard's parameters and moments into their places in the whole model's.
fn place_part(
    model: &mut dyn TrainableLm,
    opt: &mut AdamW,
    part: &dyn TrainableLm,
    p: &[Vec<f32>],
    m: &[Vec<f32>],
    v: &[Vec<f32>],
) -> Result<(), TrainError> {
    let (full_info, info, slices) = (model.param_info().to_vec(), part.param_info(), part.param_slices());
    let tp_rank = part.shard().tp_rank;
    place_tensors(model.params_mut(), &full_info, p, info, &slices, tp_rank)?;
    place_tensors(&mut opt.m, &full_info, m, info, &slices, tp_rank)?;
    place_tensors(&mut opt.v, &full_info, v, info, &slices, tp_rank)?;
    Ok(())
}
