//! Tensor- and pipeline-parallel shards of a model.
//!
//! A [`Shard`] names the part of a model one rank of a `tp × pp` plan holds: the blocks of one
//! pipeline stage, and within each block one tensor-parallel rank's slice of the attention heads
//! and of the MLP's hidden units (Megatron-LM's split: the matrices that produce heads or hidden
//! units are cut by rows, "column parallel"; the ones that consume them by columns, "row
//! parallel", followed by a sum over the group). Every tensor of a shard carries a [`Slice`]
//! saying where it lies in the full model's tensor of the same name, so a full model can be cut
//! into shards and the shards put back together: checkpoints stay unsharded.

use std::ops::Range;

use crate::{ModelError, ParamInfo};

/// Which part of a model one rank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Tensor-parallel ranks and this rank's place among them.
    pub tp: usize,
    pub tp_rank: usize,
    /// Pipeline stages and this rank's stage.
    pub pp: usize,
    pub stage: usize,
}

impl Shard {
    /// The whole model.
    pub const FULL: Shard = Shard { tp: 1, tp_rank: 0, pp: 1, stage: 0 };

    pub fn is_full(&self) -> bool {
        self.tp == 1 && self.pp == 1
    }

    /// The first stage embeds the tokens.
    pub fn first(&self) -> bool {
        self.stage == 0
    }

    /// The last stage holds the final norm, the head and the loss.
    pub fn last(&self) -> bool {
        self.stage + 1 == self.pp
    }

    /// The blocks of this stage when the last stage also carries `head` blocks' worth of work
    /// (the output head and the loss): contiguous, at least one per stage, split so that the
    /// busiest stage has as little work as possible (a pipeline runs at its slowest stage's
    /// pace) and, among such splits, the work is as even as possible.
    pub fn layers(&self, n_layer: usize, head: f64) -> Range<usize> {
        let bounds = balanced_bounds(n_layer, self.pp, head);
        bounds[self.stage]..bounds[self.stage + 1]
    }

    /// This rank's equal share of `n` units (heads, hidden units) split over the tp ranks.
    pub fn tp_part(&self, n: usize) -> Range<usize> {
        let w = n / self.tp;
        self.tp_rank * w..(self.tp_rank + 1) * w
    }

    /// Rejects plans the model cannot be cut into: `units` lists what tensor parallelism
    /// divides (e.g. `("attention heads", 12)`), every entry a multiple of `tp`; every stage
    /// needs at least one block.
    pub fn check(&self, n_layer: usize, units: &[(&str, usize)]) -> Result<(), ModelError> {
        if self.tp == 0 || self.pp == 0 || self.tp_rank >= self.tp || self.stage >= self.pp {
            return Err(ModelError::BadConfig(format!("shard {self:?} is outside its plan")));
        }
        if self.pp > n_layer {
            return Err(ModelError::BadConfig(format!(
                "--pp {} needs at least one block per stage, and the model has {n_layer}",
                self.pp
            )));
        }
        for (what, n) in units {
            if n % self.tp != 0 {
                return Err(ModelError::BadConfig(format!(
                    "--tp {} must divide the model's {n} {what} (each rank takes an equal share)",
                    self.tp
                )));
            }
        }
        Ok(())
    }
}

/// Stage boundaries `[0, b1, …, n_layer]` for [`Shard::layers`]: each block costs 1, the last
/// stage `head` more. First the least possible cost of the busiest stage, then, among the
/// splits that reach it, the one with the least sum of squared stage costs (the most even).
fn balanced_bounds(n_layer: usize, pp: usize, head: f64) -> Vec<usize> {
    if pp <= 1 || pp > n_layer {
        return (0..=pp).map(|s| if s == 0 { 0 } else { n_layer }).collect();
    }
    let last = |j: usize| (n_layer - j) as f64 + head;
    // Least busiest-stage cost: with unit blocks, the non-last stages of blocks 0..j can
    // reach ceil(j / (pp − 1)) at best.
    let busiest = (pp - 1..n_layer).map(|j| (j.div_ceil(pp - 1) as f64).max(last(j))).fold(f64::INFINITY, f64::min);
    let limit = busiest + 1e-9;
    // sq[s][i]: least sum of squares of blocks 0..i over s non-last stages, each within limit.
    let mut sq = vec![vec![f64::INFINITY; n_layer + 1]; pp];
    let mut cut = vec![vec![0usize; n_layer + 1]; pp];
    sq[0][0] = 0.0;
    for st in 1..pp {
        for i in st..=n_layer {
            // Descending: on a tie the earlier stages keep the extra blocks.
            for j in (st - 1..i).rev() {
                let c = (i - j) as f64;
                if c <= limit && sq[st - 1][j] + c * c < sq[st][i] {
                    (sq[st][i], cut[st][i]) = (sq[st - 1][j] + c * c, j);
                }
            }
        }
    }
    let start = (pp - 1..n_layer)
        .rev()
        .filter(|&j| last(j) <= limit)
        .min_by(|&a, &b| (sq[pp - 1][a] + last(a).powi(2)).total_cmp(&(sq[pp - 1][b] + last(b).powi(2))))
        .unwrap_or(n_layer - 1);
    let mut bounds = vec![n_layer; pp + 1];
    bounds[pp - 1] = start;
    for st in (1..pp - 1).rev() {
        bounds[st] = cut[st + 1][bounds[st + 1]];
    }
    bounds[0] = 0;
    bounds
}

/// Where a shard's tensor lies in the full model's tensor of the same name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slice {
    /// All of it, the same on every tensor-parallel rank of the stage (norms, embeddings, the
    /// biases of row-parallel layers).
    Whole,
    /// These ranges of the first dimension, concatenated: column-parallel weights `[out, in]`
    /// and their biases. GPT-2's fused QKV takes one range from each of q, k and v.
    Rows(Vec<Range<usize>>),
    /// This range of the second dimension: row-parallel weights `[out, in]`.
    Cols(Range<usize>),
    /// A copy of a tensor that the first stage holds as `Whole` (GPT-2's tied head on the last
    /// stage): the two copies' gradients are summed each step, and the first stage's is saved.
    TiedCopy,
}

impl Slice {
    /// Whether this rank's values count once in the model (the gradient norm, the gathered
    /// checkpoint): pieces of a split tensor always, replicated tensors on tensor-parallel rank
    /// 0 only, tied copies never.
    pub fn owned(&self, tp_rank: usize) -> bool {
        match self {
            Slice::Rows(_) | Slice::Cols(_) => true,
            Slice::Whole => tp_rank == 0,
            Slice::TiedCopy => false,
        }
    }

    /// Copies this slice of `full` (a tensor of logical shape `shape`) into `out`. Whole
    /// tensors copy the common length, so padded buffers (GPT-2's token table) copy as they are.
    pub fn extract(&self, full: &[f32], shape: &[usize], out: &mut [f32]) {
        self.visit(shape, out.len(), full.len(), &mut |f, o| out[o.clone()].copy_from_slice(&full[f]));
    }

    /// Writes `part`, this slice's values, into their place in `full`.
    pub fn place(&self, full: &mut [f32], shape: &[usize], part: &[f32]) {
        self.visit(shape, part.len(), full.len(), &mut |f, o| full[f].copy_from_slice(&part[o]));
    }

    /// Calls `copy(range in full, range in part)` for every contiguous run of the slice.
    fn visit(
        &self,
        shape: &[usize],
        part_len: usize,
        full_len: usize,
        copy: &mut dyn FnMut(Range<usize>, Range<usize>),
    ) {
        let row = shape.get(1..).map_or(1, |d| d.iter().product());
        match self {
            Slice::Whole | Slice::TiedCopy => {
                let n = part_len.min(full_len);
                copy(0..n, 0..n);
            }
            Slice::Rows(ranges) => {
                let mut o = 0;
                for r in ranges {
                    let n = r.len() * row;
                    copy(r.start * row..r.end * row, o..o + n);
                    o += n;
                }
            }
            Slice::Cols(cols) => {
                let w = cols.len();
                for r in 0..shape[0] {
                    copy(r * row + cols.start..r * row + cols.end, r * w..(r + 1) * w);
                }
            }
        }
    }
}

/// A shard's tensors (`shard_info` order, buffers as long as `lens`) cut out of the full
/// model's `full` (by name: `full_info`).
pub fn cut_tensors(
    full: &[Vec<f32>],
    full_info: &[ParamInfo],
    shard_info: &[ParamInfo],
    slices: &[Slice],
    lens: &[usize],
) -> Result<Vec<Vec<f32>>, ModelError> {
    shard_info
        .iter()
        .zip(slices)
        .zip(lens)
        .map(|((info, slice), &len)| {
            let i = index_of(full_info, &info.name)?;
            let mut out = vec![0.0; len];
            slice.extract(&full[i], &full_info[i].shape, &mut out);
            Ok(out)
        })
        .collect()
}

/// Writes a shard's tensors back into the full model's, skipping the ones it does not own.
pub fn place_tensors(
    full: &mut [Vec<f32>],
    full_info: &[ParamInfo],
    part: &[Vec<f32>],
    shard_info: &[ParamInfo],
    slices: &[Slice],
    tp_rank: usize,
) -> Result<(), ModelError> {
    for ((info, slice), values) in shard_info.iter().zip(slices).zip(part) {
        if slice.owned(tp_rank) {
            let i = index_of(full_info, &info.name)?;
            slice.place(&mut full[i], &full_info[i].shape, values);
        }
    }
    Ok(())
}

fn index_of(info: &[ParamInfo], name: &str) -> Result<usize, ModelError> {
    info.iter()
        .position(|p| p.name == name)
        .ok_or_else(|| ModelError::Shape(format!("the full model has no tensor named {name}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cutting a `[6, 4]` tensor into its row and column slices and placing them back gives the
    /// tensor again; each slice reads the values its definition names.
    #[test]
    fn slices_cut_and_place_their_part() {
        let shape = [6, 4];
        let full: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let rows = Slice::Rows(vec![1..2, 4..6]);
        let mut part = vec![0.0; 12];
        rows.extract(&full, &shape, &mut part);
        assert_eq!(part, [4., 5., 6., 7., 16., 17., 18., 19., 20., 21., 22., 23.]);
        let cols = Slice::Cols(2..4);
        let mut c = vec![0.0; 12];
        cols.extract(&full, &shape, &mut c);
        assert_eq!(c, [2., 3., 6., 7., 10., 11., 14., 15., 18., 19., 22., 23.]);
        let mut back = vec![0.0; 24];
        Slice::Cols(0..2).place(&mut back, &shape, &{
            let mut p = vec![0.0; 12];
            Slice::Cols(0..2).extract(&full, &shape, &mut p);
            p
        });
        cols.place(&mut back, &shape, &c);
        assert_eq!(back, full);
        // A 1-D bias cut by rows.
        let mut b = vec![0.0; 3];
        Slice::Rows(vec![0..1, 3..5]).extract(&full[..6], &[6], &mut b);
        assert_eq!(b, [0., 3., 4.]);
        assert!(Slice::Whole.owned(0) && !Slice::Whole.owned(1) && !Slice::TiedCopy.owned(0));
    }

    #[test]
    fn stages_take_contiguous_blocks_and_bad_plans_are_errors() {
        let s = |tp_rank, stage| Shard { tp: 2, tp_rank, pp: 3, stage };
        // Without a head to carry, 7 blocks over 3 stages go 3 + 2 + 2.
        assert_eq!(s(0, 0).layers(7, 0.0), 0..3);
        assert_eq!(s(1, 1).layers(7, 0.0), 3..5);
        assert_eq!(s(1, 2).layers(7, 0.0), 5..7);
        // gpt-s: 6 blocks and a head worth 1.8 of them over 2 stages: 4 + (2 + head).
        let two = |stage| Shard { tp: 1, tp_rank: 0, pp: 2, stage };
        assert_eq!((two(0).layers(6, 1.8), two(1).layers(6, 1.8)), (0..4, 4..6));
        // A head heavier than the blocks still leaves the last stage one block.
        assert_eq!(two(1).layers(3, 10.0), 2..3);
        assert_eq!(Shard::FULL.layers(5, 3.0), 0..5);
        assert_eq!(s(1, 0).tp_part(12), 6..12);
        assert!(s(0, 0).check(7, &[("heads", 4)]).is_ok());
        assert!(s(0, 0).check(2, &[("heads", 4)]).unwrap_err().to_string().contains("--pp 3"));
        assert!(s(0, 0).check(7, &[("heads", 3)]).unwrap_err().to_string().contains("--tp 2 must divide"));
    }
}
