//! Data parallelism (and ZeRO-1) over a `kiln_comm::Comm`.
//!
//! Every rank holds a full replica of the model and draws the same global micro-batch the
//! single-rank sampler would draw, keeping only its rows; its loss gradient is divided by the
//! rank count before backward and the gradients are summed over the ranks, so a step computes
//! the same mean-loss gradient as one rank on the whole batch (and each rank's activation
//! gradients equal the single rank's on those rows, which keeps fp16 overflows where they were).
//! The gradients travel in buckets of the flattened parameters. On the last micro-batch (earlier
//! ones only accumulate), backward reports each layer's gradients as final
//! (`TrainableLm::backward_with`), and every bucket whose parameters are all final goes to a
//! communication thread at once, so its reduction overlaps the backward of the layers below.
//!
//! The ranks are threads of this process ([`run_data_parallel`]) or processes of an MPI job, one
//! rank each ([`run_as_rank`]); both run the same steps over the `Comm` trait.
//!
//! ZeRO-1 shards the AdamW moments: each bucket is reduce-scattered, each rank updates the
//! parameters of its shard with its moments, and the updated shards are all-gathered. For a
//! checkpoint the moments are all-gathered back into one unsharded `AdamW`, so the file does
//! not depend on the plan.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_comm::{shard_range, Comm, Plan, ReduceOp, ThreadComm};
use kiln_data::{BatchSampler, Dataset};
use kiln_model::TrainableLm;
use kiln_tensor::Kernels;

use crate::optim::{clip_scale, step_params};
use crate::trainer::{checkpoint_due, eval_due};

mod model_parallel;
use crate::{lr_at, AdamW, Event, LossScaler, TrainConfig, TrainError, Trainer};
use model_parallel::{cut_moments, shard_of, ModelParallel, TimedComm};

/// Floats per gradient bucket (4 MB): enough to amortise a collective's barriers, small enough
/// that the staging buffer stays small.
const BUCKET: usize = 1 << 20;

/// The parameters' logical values as one flat index space, tensor after tensor, cut into buckets.
struct Layout {
    /// Start of each tensor, plus the total at the end.
    offsets: Vec<usize>,
    decay: Vec<bool>,
    buckets: Vec<Range<usize>>,
    /// The tensors each bucket holds a piece of.
    bucket_tensors: Vec<Vec<usize>>,
}

impl Layout {
    fn new(model: &dyn TrainableLm, bucket: usize) -> Layout {
        let mut offsets = vec![0];
        for info in model.param_info() {
            offsets.push(offsets[offsets.len() - 1] + info.shape.iter().product::<usize>());
        }
        let total = offsets[offsets.len() - 1];
        let buckets: Vec<Range<usize>> = (0..total).step_by(bucket).map(|s| s..(s + bucket).min(total)).collect();
        let mut layout = Layout {
            offsets,
            decay: model.param_info().iter().map(|p| p.decay).collect(),
            buckets,
            bucket_tensors: Vec::new(),
        };
        layout.bucket_tensors =
            layout.buckets.iter().map(|b| layout.pieces(b.clone()).into_iter().map(|p| p.0).collect()).collect();
        layout
    }

    /// The pieces of flat range `r`: (tensor, range inside the tensor, offset inside `r`).
    fn pieces(&self, r: Range<usize>) -> Vec<(usize, Range<usize>, usize)> {
        let mut out = Vec::new();
        let mut i = self.offsets.partition_point(|&o| o <= r.start).saturating_sub(1);
        let mut pos = r.start;
        while pos < r.end {
            let end = self.offsets[i + 1].min(r.end);
            if end > pos {
                out.push((i, pos - self.offsets[i]..end - self.offsets[i], pos - r.start));
            }
            pos = end;
            i += 1;
        }
        out
    }

    fn pack(&self, r: Range<usize>, tensors: &[Vec<f32>], out: &mut [f32]) {
        for (i, tr, o) in self.pieces(r) {
            out[o..o + tr.len()].copy_from_slice(&tensors[i][tr]);
        }
    }

    fn unpack(&self, r: Range<usize>, src: &[f32], tensors: &mut [Vec<f32>]) {
        for (i, tr, o) in self.pieces(r) {
            let n = tr.len();
            tensors[i][tr].copy_from_slice(&src[o..o + n]);
        }
    }
}

/// This rank's slice of the AdamW state under ZeRO-1: its shard of every bucket, concatenated.
struct ZeroShard {
    m: Vec<f32>,
    v: Vec<f32>,
    /// The reduced gradient of the shard.
    g: Vec<f32>,
    t: u64,
}

/// Fills a whole global micro-batch `(inputs, targets)`, `[batch, seq]` each.
pub(crate) type NextBatch<'a> = dyn FnMut(&mut [u32], &mut [u32]) -> Result<(), TrainError> + 'a;

/// One rank's communication state for data-parallel steps.
pub(crate) struct DpRank {
    comm: Box<dyn Comm>,
    pool: rayon::ThreadPool,
    layout: Layout,
    /// This rank's shard of each bucket, in flat coordinates.
    mine: Vec<Range<usize>>,
    zero: Option<ZeroShard>,
    staging: Vec<f32>,
    x: Vec<u32>,
    y: Vec<u32>,
    /// Seconds spent in collectives since creation (for the benchmark); for the gradient
    /// reductions, only the time left waiting after backward (the part not overlapped).
    pub comm_secs: f64,
    /// Gradient buckets handed to the communication thread while backward was still running.
    pub early_buckets: usize,
    /// Tensor or pipeline parallel: the shard's side of the plan.
    mp: Option<ModelParallel>,
}

impl DpRank {
    /// A rank whose kernels run on `threads` threads (named after `world_rank`), with
    /// gradient buckets of `bucket` floats; with `zero`, its shard of `opt` is copied out (the
    /// caller may then drop the full moments).
    #[allow(clippy::too_many_arguments)]
    fn with_bucket(
        comm: Box<dyn Comm>,
        threads: usize,
        model: &dyn TrainableLm,
        opt: &AdamW,
        zero: bool,
        cfg: &TrainConfig,
        bucket: usize,
        world_rank: usize,
    ) -> Result<DpRank, TrainError> {
        let (d, r) = (comm.size(), comm.rank());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("kiln-rank{world_rank}-{i}"))
            .build()
            .map_err(|e| TrainError::Parallel(format!("cannot start a rank's thread pool: {e}")))?;
        let layout = Layout::new(model, bucket);
        let mine: Vec<Range<usize>> = layout
            .buckets
            .iter()
            .map(|b| {
                let s = shard_range(b.len(), d, r);
                b.start + s.start..b.start + s.end
            })
            .collect();
        let zero = zero.then(|| {
            let n: usize = mine.iter().map(|r| r.len()).sum();
            let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
            let mut off = 0;
            for fr in &mine {
                layout.pack(fr.clone(), &opt.m, &mut m[off..off + fr.len()]);
                layout.pack(fr.clone(), &opt.v, &mut v[off..off + fr.len()]);
                off += fr.len();
            }
            ZeroShard { m, v, g: vec![0.0; n], t: opt.t }
        });
        let staging = vec![0.0; layout.buckets.iter().map(|b| b.len()).max().unwrap_or(0)];
        let n = cfg.batch * cfg.seq;
        Ok(DpRank {
            comm,
            pool,
            layout,
            mine,
            zero,
            staging,
            x: vec![0; n],
            y: vec![0; n],
            comm_secs: 0.0,
            early_buckets: 0,
            mp: None,
        })
    }

    /// Bytes of optimizer state this rank holds: its moments (full, or its ZeRO shard).
    pub fn optimizer_bytes(&self, opt: &AdamW) -> usize {
        match &self.zero {
            Some(z) => (z.m.len() + z.v.len()) * 4,
            None => opt.memory_bytes(),
        }
    }

    fn timed<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let t0 = Instant::now();
        let r = f(self);
        self.comm_secs += t0.elapsed().as_secs_f64();
        r
    }

    /// One optimizer step on this rank's share of `cfg.grad_accum` global micro-batches, drawn
    /// by `next_batch` (which fills the whole `[batch, seq]` micro-batch). Returns the global
    /// mean loss, the global gradient norm before clipping, and whether fp16 loss scaling
    /// skipped the update: the same on every rank, since every rank decides on the all-reduced
    /// norm and keeps an identical copy of the scaler.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        model: &mut dyn TrainableLm,
        opt: &mut AdamW,
        k: &dyn Kernels,
        cfg: &TrainConfig,
        lr: f32,
        next_batch: &mut NextBatch,
        scaler: Option<&mut LossScaler>,
    ) -> Result<(f32, f32, bool), TrainError> {
        if self.mp.is_some() {
            return self.step_model_parallel(model, opt, k, cfg, lr, next_batch, scaler);
        }
        let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
        let (d, r) = (self.comm.size(), self.comm.rank());
        let (bl, t) = (cfg.batch / d, cfg.seq);
        let rows = r * bl * t..(r + 1) * bl * t;
        model.zero_grad();
        let mut loss = 0.0f64;
        // Pre-divided by the rank count and then summed (not averaged) over ranks: each rank's
        // loss gradient then equals the single rank's on the same rows, so fp16 overflows
        // (row-local) happen exactly where one rank's would.
        let scale = loss_scale / (cfg.grad_accum * d) as f32;
        for micro in 0..cfg.grad_accum {
            next_batch(&mut self.x, &mut self.y)?;
            let (x, y) = (&self.x[rows.clone()], &self.y[rows.clone()]);
            let l = self.pool.install(|| model.forward(k, x, Some(y), bl, t))?.expect("targets given");
            loss += l as f64 / cfg.grad_accum as f64;
            // A one-rank group without ZeRO (the benchmark's baseline) has nothing to exchange.
            if micro + 1 < cfg.grad_accum || (d == 1 && self.zero.is_none()) {
                self.pool.install(|| model.backward(k, scale))?;
            } else {
                self.backward_reducing(model, k, scale)?;
            }
        }
        if self.zero.is_none() {
            let mut l = [loss];
            self.timed(|s| s.comm.all_reduce_f64(&mut l, ReduceOp::Sum))?;
            let (norm, skipped) = self.pool.install(|| opt.step_scaled(model, k, lr, cfg, scaler));
            return Ok(((l[0] / d as f64) as f32, norm, skipped));
        }
        let z = self.zero.as_mut().expect("zero");
        let mut sums = [loss, self.pool.install(|| k.sum_of_squares(&z.g))];
        self.timed(|s| s.comm.all_reduce_f64(&mut sums, ReduceOp::Sum))?;
        let norm = sums[1].sqrt() as f32 / loss_scale;
        let apply = scaler.is_none_or(|s| s.update(norm.is_finite()));
        if apply {
            self.update_shard(model, k, cfg, lr, norm, 1.0 / loss_scale);
            opt.t = self.zero.as_ref().expect("zero").t;
            self.timed(|s| s.all_gather_params(model))?;
        }
        Ok(((sums[0] / d as f64) as f32, norm, !apply))
    }

    /// The last micro-batch's backward, with each gradient bucket reduced (all-reduce, or
    /// reduce-scatter into this rank's ZeRO shard) on a communication thread as soon as
    /// backward has finished every parameter in it. Buckets go out in the order they complete,
    /// which every rank shares (the same model runs the same backward), and the engine sums
    /// each element in rank order, so the result is the same bits as reducing after backward.
    /// The time spent waiting for the reductions after backward is the exposed communication.
    fn backward_reducing(
        &mut self,
        model: &mut dyn TrainableLm,
        k: &dyn Kernels,
        scale: f32,
    ) -> Result<(), TrainError> {
        use std::sync::mpsc;
        let DpRank { comm, pool, layout, mine, zero, comm_secs, early_buckets, .. } = self;
        let zero_on = zero.is_some();
        let (to_comm, inbox) = mpsc::channel::<(usize, Vec<f32>)>();
        let (reply, results) = mpsc::channel::<Result<(usize, Vec<f32>), kiln_comm::CommError>>();
        let (layout, mine): (&Layout, &[Range<usize>]) = (layout, mine);
        let mut done = vec![false; layout.decay.len()];
        let mut sent = vec![false; layout.buckets.len()];
        let (backward, reduced) = std::thread::scope(|s| {
            s.spawn(move || {
                for (b, mut buf) in inbox {
                    let r = if zero_on {
                        let mut shard = vec![0.0f32; mine[b].len()];
                        comm.reduce_scatter(&buf, &mut shard, ReduceOp::Sum).map(|_| (b, shard))
                    } else {
                        comm.all_reduce(&mut buf, ReduceOp::Sum).map(|_| (b, buf))
                    };
                    let failed = r.is_err();
                    if reply.send(r).is_err() || failed {
                        break;
                    }
                }
            });
            let to_comm_ref = &to_comm;
            let backward = pool.install(|| {
                model.backward_with(k, scale, &mut |ids, grads| {
                    ids.iter().for_each(|&i| done[i] = true);
                    let finished = done.iter().all(|&d| d);
                    for (b, range) in layout.buckets.iter().enumerate().rev() {
                        if !sent[b] && layout.bucket_tensors[b].iter().all(|&i| done[i]) {
                            let mut buf = vec![0.0f32; range.len()];
                            layout.pack(range.clone(), grads, &mut buf);
                            sent[b] = true;
                            *early_buckets += usize::from(!finished);
                            // A closed inbox means the reductions failed; the error comes below.
                            let _ = to_comm_ref.send((b, buf));
                        }
                    }
                })
            });
            drop(to_comm);
            let t0 = Instant::now();
            let reduced: Vec<_> = results.iter().collect();
            *comm_secs += t0.elapsed().as_secs_f64();
            (backward, reduced)
        });
        backward?;
        let mut got = 0;
        for r in reduced {
            let (b, buf) = r?;
            match zero.as_mut() {
                None => layout.unpack(layout.buckets[b].clone(), &buf, model.grads_mut()),
                Some(z) => {
                    let off: usize = mine[..b].iter().map(|m| m.len()).sum();
                    z.g[off..off + buf.len()].copy_from_slice(&buf);
                }
            }
            got += 1;
        }
        if got != layout.buckets.len() {
            return Err(TrainError::Parallel(format!(
                "backward reported {got} of {} gradient buckets complete",
                layout.buckets.len()
            )));
        }
        Ok(())
    }

    /// AdamW on this rank's shard, tensor piece by tensor piece (weight decay is per tensor).
    /// `inv_scale` undoes fp16 loss scaling, as in [`AdamW::apply`].
    fn update_shard(
        &mut self,
        model: &mut dyn TrainableLm,
        k: &dyn Kernels,
        cfg: &TrainConfig,
        lr: f32,
        norm: f32,
        inv_scale: f32,
    ) {
        let z = self.zero.as_mut().expect("zero");
        z.t += 1;
        let scale = clip_scale(cfg, norm) * inv_scale;
        let (layout, mine) = (&self.layout, &self.mine);
        self.pool.install(|| {
            let mut off = 0;
            for fr in mine {
                for (i, tr, o) in layout.pieces(fr.clone()) {
                    let s = step_params(cfg, lr, layout.decay[i], z.t, scale);
                    let span = off + o..off + o + tr.len();
                    k.adamw_update(
                        &mut model.params_mut()[i][tr],
                        &z.g[span.clone()],
                        &mut z.m[span.clone()],
                        &mut z.v[span],
                        &s,
                    );
                }
                off += fr.len();
            }
        });
    }

    fn all_gather_params(&mut self, model: &mut dyn TrainableLm) -> Result<(), TrainError> {
        let mut mine_buf = Vec::new();
        for (b, fr) in self.layout.buckets.clone().into_iter().zip(self.mine.clone()) {
            mine_buf.resize(fr.len(), 0.0);
            self.layout.pack(fr, model.params(), &mut mine_buf);
            let buf = &mut self.staging[..b.len()];
            self.comm.all_gather(&mine_buf, buf)?;
            self.layout.unpack(b, buf, model.params_mut());
        }
        Ok(())
    }

    /// Under ZeRO-1, all-gathers the moments (collective). With `keep`, returns them unsharded.
    pub fn gather_moments(&mut self, model: &dyn TrainableLm, keep: bool) -> Result<Option<AdamW>, TrainError> {
        let Some(z) = &self.zero else { return Ok(None) };
        let mut full = keep.then(|| AdamW::new(model));
        let mut off = 0;
        for (b, fr) in self.layout.buckets.iter().zip(&self.mine) {
            for which in 0..2 {
                let src = if which == 0 { &z.m } else { &z.v };
                let buf = &mut self.staging[..b.len()];
                self.comm.all_gather(&src[off..off + fr.len()], buf)?;
                if let Some(f) = full.as_mut() {
                    self.layout.unpack(b.clone(), buf, if which == 0 { &mut f.m } else { &mut f.v });
                }
            }
            off += fr.len();
        }
        Ok(full.map(|mut f| {
            f.t = z.t;
            f
        }))
    }

    pub fn is_zero(&self) -> bool {
        self.zero.is_some()
    }

    /// The whole plan's group: the world of a model-parallel rank, else the dp group.
    fn world(&self) -> &dyn Comm {
        self.mp.as_ref().map_or(self.comm.as_ref(), |m| m.world())
    }

    fn world_barrier(&self) -> Result<(), TrainError> {
        Ok(self.world().barrier()?)
    }

    /// Element-wise maximum over every rank of the plan.
    fn world_max(&self, v: &mut [f64]) -> Result<(), TrainError> {
        Ok(self.world().all_reduce_f64(v, ReduceOp::Max)?)
    }

    fn pipeline_secs(&self) -> f64 {
        self.mp.as_ref().map_or(0.0, |m| m.pipeline_secs)
    }
}

/// A copy of `model`'s parameters in a model of its own.
fn replica(model: &dyn TrainableLm) -> Result<Box<dyn TrainableLm>, TrainError> {
    let mut m = model.zeros_like()?;
    for (dst, src) in m.params_mut().iter_mut().zip(model.params()) {
        dst.copy_from_slice(src);
    }
    Ok(m)
}

/// Threads each of `d` ranks gets so that together they use the cores rayon would.
fn threads_per_rank(d: usize) -> usize {
    (rayon::current_num_threads() / d).max(1)
}

/// The plan a config asks for.
fn plan_of(cfg: &TrainConfig) -> Plan {
    Plan { dp: cfg.dp, tp: cfg.tp, pp: cfg.pp }
}

/// What world rank `w` trains: a replica of the whole model (data parallel only) or its shard,
/// with the moments cut to match.
fn rank_start(
    plan: Plan,
    w: usize,
    model: &dyn TrainableLm,
    opt: &AdamW,
) -> Result<(Box<dyn TrainableLm>, AdamW), TrainError> {
    if plan.tp * plan.pp == 1 {
        return Ok((replica(model)?, opt.clone()));
    }
    let shard = model.to_shard(shard_of(plan, w))?;
    let moments = cut_moments(model, opt, shard.as_ref())?;
    Ok((shard, moments))
}

/// Builds world rank `world.rank()`'s side of `plan` (collective over `world`: the plan's
/// groups are split from it). `model` and `opt` are what the rank trains, except on a rank 0
/// that keeps the whole model for evaluation and checkpoints and trains `local`, its shard.
/// Under ZeRO-1 the moments of what it trains move into the rank's shard of them.
#[allow(clippy::too_many_arguments)]
fn build_rank(
    world: Box<dyn Comm>,
    plan: Plan,
    threads: usize,
    model: &mut dyn TrainableLm,
    opt: &mut AdamW,
    mut local: Option<(Box<dyn TrainableLm>, AdamW)>,
    cfg: &TrainConfig,
    timed_tp: Option<&TimedComm>,
) -> Result<DpRank, TrainError> {
    let (zero, w) = (cfg.zero == 1, world.rank());
    if plan.tp * plan.pp == 1 {
        let rank = DpRank::with_bucket(world, threads, model, opt, zero, cfg, BUCKET, w)?;
        if zero {
            opt.m = Vec::new();
            opt.v = Vec::new();
        }
        return Ok(rank);
    }
    let g = plan.groups(world.as_ref())?;
    let (shard, shard_opt): (&mut dyn TrainableLm, &mut AdamW) = match local.as_mut() {
        Some((m, o)) => (m.as_mut(), o),
        None => (model, opt),
    };
    let tp = match timed_tp {
        Some(t) => Box::new(t.wrap(g.tp)),
        None => g.tp,
    };
    shard.set_tp_group(tp)?;
    let mut rank = DpRank::with_bucket(g.dp, threads, shard, shard_opt, zero, cfg, BUCKET, w)?;
    if zero {
        shard_opt.m = Vec::new();
        shard_opt.v = Vec::new();
    }
    let owned = shard.param_slices().iter().map(|s| s.owned(g.coords.tp)).collect();
    rank.mp = Some(ModelParallel::new(plan, world, g.pp, owned, local));
    Ok(rank)
}

/// A rank other than 0: trains its model in lockstep with rank 0 and does no I/O.
struct Worker {
    rank: DpRank,
    sampler: BatchSampler,
    data: Arc<Dataset>,
    kernels: Arc<dyn Kernels>,
    /// fp16: this rank's copy of the loss scaler, updated exactly as rank 0's.
    scaler: Option<LossScaler>,
    cfg: TrainConfig,
    start: u64,
    stop: u64,
    /// Whether rank 0 evaluates (it has validation data): a sharded model is gathered for it.
    evaluates: bool,
}

impl Worker {
    /// Trains `model` with `opt` (this rank's replica or shard and its optimizer state).
    fn run(mut self, model: &mut dyn TrainableLm, opt: &mut AdamW) -> Result<(), TrainError> {
        let (cfg, data) = (&self.cfg, &self.data);
        for step in self.start..self.stop {
            let sampler = &mut self.sampler;
            let mut next =
                |x: &mut [u32], y: &mut [u32]| sampler.next_batch(&data.train, x, y).map_err(TrainError::from);
            self.rank.step(
                model,
                opt,
                self.kernels.as_ref(),
                cfg,
                lr_at(step, cfg),
                &mut next,
                self.scaler.as_mut(),
            )?;
            // Rank 0 gathers what it evaluates and checkpoints: take part.
            let checkpoint = checkpoint_due(step + 1, self.stop, cfg);
            if self.rank.is_model_parallel() {
                if checkpoint || (self.evaluates && eval_due(step + 1, cfg)) {
                    self.rank.gather_whole_model(model, opt)?;
                }
            } else if checkpoint {
                self.rank.gather_moments(model, false)?;
            }
        }
        if !self.rank.is_model_parallel() {
            self.rank.gather_moments(model, false)?;
        }
        Ok(())
    }
}

/// `Trainer::run_until` for a plan of more than one rank: ranks 1.. run on scoped threads,
/// rank 0 on this thread (it logs, evaluates and checkpoints through `on_event`).
pub(crate) fn run_data_parallel(
    tr: &mut Trainer,
    stop: u64,
    on_event: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let cfg = tr.cfg.clone();
    let plan = plan_of(&cfg);
    let n = plan.world_size();
    let stop = stop.min(cfg.steps);
    let threads = threads_per_rank(n);
    let mut comms = ThreadComm::group(n, Duration::from_secs(cfg.comm_timeout_s)).into_iter();
    let comm0 = comms.next().expect("a world of at least one rank");
    let mut workers = Vec::with_capacity(n - 1);
    for (w, comm) in (1..n).zip(comms) {
        let start = rank_start(plan, w, tr.model.as_ref(), &tr.opt)?;
        let worker = (
            BatchSampler::from_state(tr.sampler_state(), cfg.batch, cfg.seq),
            tr.data.clone(),
            tr.kernels.clone(),
            tr.scaler.clone(),
        );
        workers.push((comm, start, worker));
    }
    let local = if cfg.is_model_parallel() { Some(rank_start(plan, 0, tr.model.as_ref(), &tr.opt)?) } else { None };
    let evaluates = tr.evaluates();
    let start_step = tr.step;
    std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .into_iter()
            .map(|(comm, (mut model, mut opt), (sampler, data, kernels, scaler))| {
                let cfg = cfg.clone();
                s.spawn(move || -> Result<(), TrainError> {
                    let rank = build_rank(Box::new(comm), plan, threads, model.as_mut(), &mut opt, None, &cfg, None)?;
                    let w = Worker { rank, sampler, data, kernels, scaler, cfg, start: start_step, stop, evaluates };
                    w.run(model.as_mut(), &mut opt)
                })
            })
            .collect();
        let mut r0 = build_rank(Box::new(comm0), plan, threads, tr.model.as_mut(), &mut tr.opt, local, &cfg, None)
            .map(|rank| tr.dp = Some(rank));
        if r0.is_ok() {
            r0 = tr.run_loop(stop, on_event);
        }
        if r0.is_ok() {
            r0 = tr.finish_data_parallel();
        }
        tr.leave_parallel(r0.is_ok());
        let others: Vec<Result<(), TrainError>> = handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.join().unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(TrainError::RankPanicked { rank: i + 1, msg })
                })
            })
            .collect();
        first_cause(r0, others)
    })
}

/// `Trainer::run_until` with this process as one rank of `comm`, a group that spans processes
/// (an MPI world started by `mpirun`): every process builds the same trainer, rank 0 logs,
/// evaluates and checkpoints through `on_event`, the others train in lockstep and do no I/O.
/// The steps are the thread engine's, so the losses are too, bit for bit.
pub(crate) fn run_as_rank(
    tr: &mut Trainer,
    comm: Box<dyn Comm>,
    stop: u64,
    on_event: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let cfg = tr.cfg.clone();
    let plan = plan_of(&cfg);
    if comm.size() != plan.world_size() {
        let n = plan.world_size();
        return Err(TrainError::Config(format!(
            "--dp {} × --tp {} × --pp {} needs {n} process(es), but {} were started: launch one per rank, e.g. `mpirun -np {n} kiln train --comm mpi --dp {} --tp {} --pp {} ...`",
            cfg.dp,
            cfg.tp,
            cfg.pp,
            comm.size(),
            cfg.dp,
            cfg.tp,
            cfg.pp
        )));
    }
    let stop = stop.min(cfg.steps);
    let threads = rayon::current_num_threads();
    let w = comm.rank();
    if w != 0 {
        // This process is the rank: it trains the trainer's own model (or its shard of it).
        let sampler = BatchSampler::from_state(tr.sampler_state(), cfg.batch, cfg.seq);
        let evaluates = tr.evaluates();
        let mut shard =
            if cfg.is_model_parallel() { Some(rank_start(plan, w, tr.model.as_ref(), &tr.opt)?) } else { None };
        let (model, opt): (&mut dyn TrainableLm, &mut AdamW) = match shard.as_mut() {
            Some((m, o)) => (m.as_mut(), o),
            None => (tr.model.as_mut(), &mut tr.opt),
        };
        let rank = build_rank(comm, plan, threads, model, opt, None, &cfg, None)?;
        let worker = Worker {
            sampler,
            data: tr.data.clone(),
            kernels: tr.kernels.clone(),
            scaler: tr.scaler.clone(),
            evaluates,
            cfg,
            start: tr.step,
            stop,
            rank,
        };
        return worker.run(model, opt);
    }
    let local = if cfg.is_model_parallel() { Some(rank_start(plan, 0, tr.model.as_ref(), &tr.opt)?) } else { None };
    let rank = build_rank(comm, plan, threads, tr.model.as_mut(), &mut tr.opt, local, &cfg, None)?;
    tr.dp = Some(rank);
    let mut r = tr.run_loop(stop, on_event);
    if r.is_ok() {
        r = tr.finish_data_parallel();
    }
    tr.leave_parallel(r.is_ok());
    r
}

/// The error that explains a failed run: a rank's own failure rather than the "peer failed"
/// or timeout errors it caused on the other ranks.
fn first_cause(r0: Result<(), TrainError>, others: Vec<Result<(), TrainError>>) -> Result<(), TrainError> {
    let mut all: Vec<TrainError> = r0.err().into_iter().chain(others.into_iter().filter_map(|r| r.err())).collect();
    if all.is_empty() {
        return Ok(());
    }
    // A rank's own error first; then a timeout (it names the rank that stalled), then rank 0's.
    let pos = all
        .iter()
        .position(|e| comm_error(e).is_none())
        .or_else(|| all.iter().position(|e| matches!(comm_error(e), Some(kiln_comm::CommError::Timeout { .. }))))
        .unwrap_or(0);
    Err(all.swap_remove(pos))
}

/// The communication failure behind `e`, whether a collective of the trainer or one inside
/// the model (tensor parallelism) raised it.
fn comm_error(e: &TrainError) -> Option<&kiln_comm::CommError> {
    match e {
        TrainError::Comm(c) | TrainError::Model(kiln_model::ModelError::Comm(c)) => Some(c),
        _ => None,
    }
}

/// One parallel training-step benchmark result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DpBench {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub micro_batches: usize,
    pub zero: u8,
    pub threads_per_rank: usize,
    pub tokens_per_s: f64,
    pub step_ms: f64,
    /// Time in data-parallel collectives and the global loss/norm reduction per step (the
    /// slowest rank), including waiting for slower ranks.
    pub comm_ms: f64,
    /// Time in the tensor-parallel all-reduces per step (the slowest rank).
    pub tp_comm_ms: f64,
    /// Time a pipeline stage waits for its neighbours' activations and gradients per step
    /// (the slowest rank): the pipeline bubble plus the transfers.
    pub pipeline_wait_ms: f64,
    /// AdamW moments held by one rank.
    pub optimizer_mb_per_rank: f64,
}

/// A plan to benchmark: `dp × tp × pp` ranks, pipeline micro-batches (None: pp), ZeRO stage.
#[derive(Clone, Copy, Debug)]
pub struct BenchPlan {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub micro_batches: Option<usize>,
    pub zero: u8,
}

/// Times `steps` parallel training steps (after `warmup`) on random tokens, each rank a thread
/// with its share of the cores; batch is the global micro-batch.
#[allow(clippy::too_many_arguments)]
pub fn bench_data_parallel(
    preset: &str,
    vocab: Option<usize>,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    plan: BenchPlan,
    k: &dyn Kernels,
) -> Result<DpBench, TrainError> {
    use rand::{Rng, SeedableRng};
    let BenchPlan { dp, tp, pp, micro_batches, zero } = plan;
    let cfg = TrainConfig { batch, seq, dp, tp, pp, micro_batches, zero, ..Default::default() };
    cfg.validate()?;
    if steps == 0 {
        return Err(TrainError::Config("--steps must be at least 1".into()));
    }
    let world = plan_of(&cfg);
    let threads = threads_per_rank(world.world_size());
    let timeout = Duration::from_secs(cfg.comm_timeout_s);
    let results = ThreadComm::launch(world.world_size(), timeout, |c| -> Result<_, TrainError> {
        let w = c.rank();
        let full = kiln_model::new_trainable(preset, vocab, Default::default(), 1)?;
        let v = full.vocab_size() as u32;
        let full_opt = AdamW::new(full.as_ref());
        let (mut model, mut opt) =
            if cfg.is_model_parallel() { rank_start(world, w, full.as_ref(), &full_opt)? } else { (full, full_opt) };
        let tp_time = TimedComm::default();
        let mut rank = build_rank(Box::new(c), world, threads, model.as_mut(), &mut opt, None, &cfg, Some(&tp_time))?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut next = |x: &mut [u32], y: &mut [u32]| {
            x.iter_mut().chain(y.iter_mut()).for_each(|t| *t = rng.random_range(0..v));
            Ok(())
        };
        let mut times = Vec::new();
        for i in 0..warmup + steps {
            rank.world_barrier()?;
            let (t0, c0, tp0, pp0) = (Instant::now(), rank.comm_secs, tp_time.secs(), rank.pipeline_secs());
            rank.step(model.as_mut(), &mut opt, k, &cfg, 1e-4, &mut next, None)?;
            let mut dt =
                [t0.elapsed().as_secs_f64(), rank.comm_secs - c0, tp_time.secs() - tp0, rank.pipeline_secs() - pp0];
            rank.world_max(&mut dt)?;
            if i >= warmup {
                times.push(dt);
            }
        }
        Ok((times, rank.optimizer_bytes(&opt)))
    });
    let mut out = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        out.push(r.map_err(|_| TrainError::RankPanicked { rank: i, msg: "in the benchmark".into() })??);
    }
    let (times, opt_bytes) = out.swap_remove(0);
    let median = |j: usize| {
        let mut v: Vec<f64> = times.iter().map(|t| t[j]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let step_s = median(0);
    Ok(DpBench {
        dp,
        tp,
        pp,
        micro_batches: cfg.pipeline_micro_batches(),
        zero,
        threads_per_rank: threads,
        tokens_per_s: (batch * seq) as f64 / step_s,
        step_ms: step_s * 1e3,
        comm_ms: median(1) * 1e3,
        tp_comm_ms: median(2) * 1e3,
        pipeline_wait_ms: median(3) * 1e3,
        optimizer_mb_per_rank: opt_bytes as f64 / 1e6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With small buckets, most gradient reductions start before backward ends (all but the
    /// buckets holding the embeddings, whose gradients are final last), on every rank, and the
    /// replicas' gradients come out equal.
    #[test]
    fn gradient_buckets_are_reduced_while_backward_runs() {
        use rand::{Rng, SeedableRng};
        let cfg = TrainConfig { batch: 4, seq: 16, dp: 2, ..Default::default() };
        for zero in [false, true] {
            let out = ThreadComm::launch(2, Duration::from_secs(30), |c| -> Result<_, TrainError> {
                let mut model = kiln_model::new_trainable("gpt-tiny", Some(97), Default::default(), 1)?;
                let mut opt = AdamW::new(model.as_ref());
                let mut rank = DpRank::with_bucket(Box::new(c), 1, model.as_ref(), &opt, zero, &cfg, 4096, 0)?;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
                let mut next = |x: &mut [u32], y: &mut [u32]| {
                    x.iter_mut().chain(y.iter_mut()).for_each(|v| *v = rng.random_range(0..97));
                    Ok::<(), TrainError>(())
                };
                let k = kiln_tensor::CpuKernels::default();
                rank.step(model.as_mut(), &mut opt, &k, &cfg, 1e-3, &mut next, None)?;
                let embedding_buckets =
                    rank.layout.bucket_tensors.iter().filter(|t| t.contains(&0) || t.contains(&1)).count();
                Ok((rank.early_buckets, rank.layout.buckets.len() - embedding_buckets, model.params().to_vec()))
            });
            let results: Vec<_> = out.into_iter().map(|r| r.unwrap().unwrap()).collect();
            for (early, want, _) in &results {
                assert!(*want > 10, "the test needs many buckets");
                assert_eq!(early, want, "zero {zero}: buckets reduced during backward");
            }
            assert!(results[0].2 == results[1].2, "zero {zero}: the replicas differ after the step");
        }
    }

    /// A rank of a tp=2 × pp=2 plan dies in the middle of a step (between two accumulated
    /// micro-batches): the other three fail with a communication error naming it (rank 0
    /// waits on rank 2, which gave up on its tensor-parallel peer 3: the chain is followed),
    /// promptly, instead of waiting out the 60 s timeout.
    #[test]
    fn a_rank_that_dies_mid_step_fails_the_others_promptly() {
        use rand::{Rng, SeedableRng};
        let cfg = TrainConfig { batch: 4, seq: 16, tp: 2, pp: 2, grad_accum: 2, ..Default::default() };
        let plan = plan_of(&cfg);
        let t0 = Instant::now();
        let out = ThreadComm::launch(4, Duration::from_secs(60), |c| -> Result<(), TrainError> {
            let w = c.rank();
            let full = kiln_model::new_trainable("gpt-tiny", Some(97), Default::default(), 1)?;
            let (mut model, mut opt) = rank_start(plan, w, full.as_ref(), &AdamW::new(full.as_ref()))?;
            let mut rank = build_rank(Box::new(c), plan, 1, model.as_mut(), &mut opt, None, &cfg, None)?;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let mut batches = 0;
            let mut next = |x: &mut [u32], y: &mut [u32]| {
                batches += 1;
                assert!(!(w == 3 && batches == 4), "rank 3 killed in the middle of step 2");
                x.iter_mut().chain(y.iter_mut()).for_each(|v| *v = rng.random_range(0..97));
                Ok::<(), TrainError>(())
            };
            let k = kiln_tensor::CpuKernels::default();
            for _ in 0..5 {
                rank.step(model.as_mut(), &mut opt, &k, &cfg, 1e-3, &mut next, None)?;
            }
            Ok(())
        });
        assert!(t0.elapsed() < Duration::from_secs(20), "took {:?}", t0.elapsed());
        assert!(out[3].is_err(), "rank 3 panicked");
        for (w, r) in out.iter().enumerate().take(3) {
            match r {
                Ok(Err(e)) if comm_error(e).is_some() => assert!(e.to_string().contains("rank 3"), "rank {w}: {e}"),
                other => panic!("rank {w} should fail on the lost peer, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_root_cause_of_a_failed_run_is_reported() {
        use kiln_comm::CommError;
        let peer = || TrainError::Comm(CommError::PeerFailed { op: "all_reduce", rank: 1 });
        let stall = CommError::Timeout { op: "all_reduce", waiting_for: 0, timeout: Duration::from_secs(1) };
        let own = first_cause(Err(peer()), vec![Err(TrainError::Config("disk full".into()))]);
        assert!(matches!(own, Err(TrainError::Config(_))), "{own:?}");
        let timed = first_cause(Err(peer()), vec![Err(TrainError::Comm(stall))]);
        assert!(matches!(timed, Err(TrainError::Comm(CommError::Timeout { waiting_for: 0, .. }))), "{timed:?}");
        assert!(first_cause(Ok(()), vec![Ok(()), Ok(())]).is_ok());
    }

    #[test]
    fn layout_pieces_cover_ranges_across_tensor_boundaries() {
        let cfg = kiln_model::GptConfig::preset("gpt-tiny", Some(101)).unwrap();
        let model = kiln_model::Gpt::new(cfg, 3).unwrap();
        let layout = Layout::new(&model, 1000);
        let total = layout.offsets[layout.offsets.len() - 1];
        assert_eq!(layout.buckets.iter().map(|b| b.len()).sum::<usize>(), total);
        // Pack then unpack every bucket, cut into 3 shards: the identity.
        let mut copy: Vec<Vec<f32>> = model.params.iter().map(|p| vec![0.0; p.len()]).collect();
        for b in &layout.buckets {
            for r in 0..3 {
                let s = shard_range(b.len(), 3, r);
                let fr = b.start + s.start..b.start + s.end;
                let mut buf = vec![0.0; fr.len()];
                layout.pack(fr.clone(), &model.params, &mut buf);
                layout.unpack(fr, &buf, &mut copy);
            }
        }
        for i in 0..model.params.len() {
            assert_eq!(model.param_values(i), &copy[i][..model.param_values(i).len()], "tensor {i}");
        }
    }
}
