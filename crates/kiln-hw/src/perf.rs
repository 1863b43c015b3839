//! The performance, resource and energy model: every op of prefill and of a decode step costed
//! on a target, rolled up per layer and per phase, with the assumptions it made.

use serde::Serialize;

use crate::error::{HwError, Result};
use crate::lower::{lower, Op, OpKind, Phase, Special, Workload};
use crate::shape::ModelShape;
use crate::spec::{Kind, Precision, Target, VectorOp};
use crate::systolic::{fold_cycles, traffic, BufferBytes, Dataflow, Gemm, Operands, Traffic};

/// Electricity price used for the running-cost figure.
pub const USD_PER_KWH: f64 = 0.15;
/// Years a purchase is spread over, running around the clock.
pub const AMORTIZATION_YEARS: f64 = 3.0;
/// Vector ops an emulated exp / rsqrt costs per element (polynomial + range reduction).
const EMULATED_SPECIAL_OPS: f64 = 10.0;

/// What limited an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    Compute,
    Memory,
    Vector,
}

/// One op on the target.
#[derive(Clone, Debug, Serialize)]
pub struct OpCost {
    pub layer: String,
    pub name: String,
    /// "M×N×K ×count" for GEMMs, element count otherwise.
    pub shape: String,
    /// The chosen dataflow (systolic targets), "tiled" (GPU / CPU) or "-" (not a GEMM).
    pub dataflow: String,
    /// Latency with each dataflow tried, in µs, for the report (systolic GEMMs only).
    pub alternatives_us: Vec<(String, f64)>,
    pub folds: u64,
    pub macs: f64,
    pub compute_s: f64,
    pub memory_s: f64,
    pub time_s: f64,
    pub bound: Bound,
    pub dram_bytes: f64,
    pub sram_bytes: f64,
    /// Useful MACs over what the array could have done in this op's time.
    pub utilization: f64,
    /// Dynamic energy (MAC + SRAM + DRAM), joules; static power is added per phase.
    pub energy_j: f64,
}

/// Per-layer roll-up of both phases.
#[derive(Clone, Debug, Serialize)]
pub struct LayerRow {
    pub layer: String,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub prefill_dram_mb: f64,
    pub decode_dram_mb: f64,
    pub decode_bound: Bound,
    pub decode_energy_mj: f64,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Energy {
    pub mac_j: f64,
    pub sram_j: f64,
    pub dram_j: f64,
    pub static_j: f64,
}

impl Energy {
    pub fn total(&self) -> f64 {
        self.mac_j + self.sram_j + self.dram_j + self.static_j
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseCost {
    pub time_s: f64,
    pub macs: f64,
    pub dram_bytes: f64,
    pub utilization: f64,
    pub energy: Energy,
    pub ops: Vec<OpCost>,
}

/// FPGA resources the design needs against the device budget.
#[derive(Clone, Debug, Serialize)]
pub struct Resources {
    pub device: String,
    pub dsp: f64,
    pub dsp_budget: u64,
    pub lut: f64,
    pub lut_budget: u64,
    pub bram36: f64,
    pub bram36_budget: u64,
    pub uram: f64,
    pub uram_budget: u64,
    pub max_utilization: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    pub target: String,
    pub kind: String,
    pub source: String,
    pub model: String,
    pub precision: Precision,
    pub batch: u64,
    pub prompt_len: u64,
    pub gen: u64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Prefill plus `gen` decode steps: one request's wall time.
    pub latency_ms: f64,
    pub ttft_ms: f64,
    pub decode_step_ms: f64,
    /// Joules per generated token in decode (static power included).
    pub energy_per_token_j: f64,
    pub prefill_energy_per_token_j: f64,
    pub decode_power_w: f64,
    pub cost_per_million_tokens_usd: Option<f64>,
    pub prefill_utilization: f64,
    pub decode_utilization: f64,
    pub weight_bytes: f64,
    pub kv_cache_bytes: f64,
    pub fits: bool,
    /// Why it does not fit (empty when it fits).
    pub fit_issues: Vec<String>,
    /// What to change so that it fits.
    pub advice: Vec<String>,
    pub resources: Option<Resources>,
    pub layers: Vec<LayerRow>,
    pub prefill: PhaseCost,
    pub decode: PhaseCost,
    pub assumptions: Vec<String>,
}

struct Ctx<'a> {
    t: &'a Target,
    p: Precision,
    buf: BufferBytes,
    assumptions: Vec<String>,
}

impl Ctx<'_> {
    fn assume(&mut self, s: impl Into<String>) {
        let s = s.into();
        if !self.assumptions.contains(&s) {
            self.assumptions.push(s);
        }
    }

    fn bw(&self) -> f64 {
        self.t.dram.bandwidth_gbs * 1e9 * self.t.efficiency.memory
    }

    fn pj_mac(&self) -> f64 {
        self.t.power.pj_per_mac.get(self.p).unwrap_or(0.0)
    }

    /// Time given compute and memory: overlapped when double buffered, plus the first tile's load.
    fn overlap(&self, compute: f64, mem: f64, first: f64) -> f64 {
        if self.t.buffers.double_buffered {
            compute.max(mem) + first
        } else {
            compute + mem
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &mut self,
        op: &Op,
        g: Gemm,
        count: u64,
        b_is_weight: bool,
        b_kv: bool,
        act_fits: bool,
        weights_resident: bool,
    ) -> OpCost {
        let t = self.t;
        let (wb, ab) = (self.p.weight_bytes(), self.p.activation_bytes());
        let operands = Operands {
            a_bytes: ab,
            b_bytes: if b_is_weight { wb } else { ab },
            out_bytes: ab,
            a_on_chip: act_fits,
            // Weights are on chip when all of them are resident; K / V when just made in prefill.
            b_on_chip: if b_is_weight { weights_resident } else { !b_kv && act_fits },
            out_on_chip: act_fits,
        };
        // f64 products: element counts of large workloads overflow u64.
        let macs = g.m as f64 * g.n as f64 * g.k as f64 * count as f64;
        let rate = t.array.macs_per_cycle.get(self.p).unwrap_or(1.0) * t.clock_hz() * t.efficiency.compute;
        let shape = if count > 1 {
            format!("{}×{}×{} ×{count}", g.m, g.n, g.k)
        } else {
            format!("{}×{}×{}", g.m, g.n, g.k)
        };
        let (r, c) = (t.array.rows, t.array.cols);
        let mut best: Option<(f64, Dataflow, Traffic, f64, u64)> = None;
        let mut alternatives = Vec::new();
        if t.kind.is_systolic() {
            // Fold cycles are for one MAC per PE per cycle; other precisions scale the rate.
            let per_pe = t.array.macs_per_cycle.get(self.p).unwrap_or(1.0) / (r * c) as f64;
            for &df in &t.array.dataflows {
                let f = fold_cycles(g, r, c, df);
                let compute = f.cycles as f64 * count as f64 / per_pe / t.clock_hz() / t.efficiency.compute;
                let tr = traffic(g, r, c, df, self.buf, operands);
                let dram = tr.dram() * count as f64;
                let time = self.overlap(compute, dram / self.bw(), tr.first_tile / self.bw());
                alternatives.push((df.name().to_string(), time * 1e6));
                let better = match &best {
                    None => true,
                    Some((bt, _, btr, _, _)) => time < bt * (1.0 - 1e-9) || (time <= *bt && tr.dram() < btr.dram()),
                };
                if better {
                    best = Some((time, df, tr, compute, f.row_folds.saturating_mul(f.col_folds).saturating_mul(count)));
                }
            }
            self.assume(
                "systolic GEMM compute cycles: SCALE-Sim's fold count (OS: T+R+C-2 per fold; WS/IS: 2R+C+T-2), \
                 checked against SCALE-Sim 3.0.0 in tools/hw/scalesim_compare.py",
            );
        } else {
            // Tensor cores / SIMD: MACs padded to whole tiles, at the peak rate.
            let padded = (g.m.div_ceil(r) * r) as f64 * (g.n.div_ceil(c) * c) as f64 * g.k as f64 * count as f64;
            let compute = padded / rate;
            // Cache blocking (BLIS / CTA tiles sharing L2) reads each operand from DRAM once a pass.
            let (m, n, k) = (g.m as f64, g.n as f64, g.k as f64);
            let (a, b, out) = (m * k * operands.a_bytes, k * n * operands.b_bytes, m * n * operands.out_bytes);
            let fits = |x: f64| x <= self.buf.activation;
            let dram_read = if operands.a_on_chip && fits(a) { 0.0 } else { a }
                + if operands.b_on_chip && fits(b) { 0.0 } else { b };
            let dram_write = if operands.out_on_chip && fits(out) { 0.0 } else { out };
            let first = (r.min(g.m) * g.k) as f64 * operands.a_bytes + (g.k * c.min(g.n)) as f64 * operands.b_bytes;
            let tr = Traffic { dram_read, dram_write, sram: a + b + out, first_tile: first.min(dram_read) };
            let dram = tr.dram() * count as f64;
            let time = self.overlap(compute, dram / self.bw(), tr.first_tile / self.bw());
            best = Some((time, Dataflow::Os, tr, compute, g.m.div_ceil(r) * g.n.div_ceil(c) * count));
            self.assume(format!(
                "{} GEMMs: MACs padded to {}×{} tiles at {:.0}% of the peak MAC rate",
                t.kind.name(),
                r,
                c,
                t.efficiency.compute * 100.0
            ));
        }
        let (time, df, tr, compute, folds) = best.expect("at least one dataflow (validated)");
        let n = count as f64;
        let dram = tr.dram() * n;
        let sram = tr.sram * n;
        let energy = (macs * self.pj_mac() + sram * t.power.pj_per_sram_byte + dram * t.power.pj_per_dram_byte) * 1e-12;
        let memory = dram / self.bw();
        let peak = t.array.macs_per_cycle.get(self.p).unwrap_or(1.0) * t.clock_hz();
        OpCost {
            layer: op.layer.clone(),
            name: op.name.clone(),
            shape,
            dataflow: if t.kind.is_systolic() { df.name().to_string() } else { "tiled".into() },
            alternatives_us: if alternatives.len() > 1 { alternatives } else { Vec::new() },
            folds,
            macs,
            compute_s: compute,
            memory_s: memory,
            time_s: time,
            bound: if compute >= memory { Bound::Compute } else { Bound::Memory },
            dram_bytes: dram,
            sram_bytes: sram,
            utilization: if time > 0.0 { macs / (peak * time) } else { 0.0 },
            energy_j: energy,
        }
    }

    fn vector(&mut self, op: &Op, elems: u64, ops_per: f64, special: Special, n_special: u64, fits: bool) -> OpCost {
        let t = self.t;
        let has = |o: VectorOp| t.vector.ops.contains(&o);
        let special_cost = match special {
            Special::None => 0.0,
            Special::Exp if has(VectorOp::Exp) => 1.0,
            Special::Rsqrt if has(VectorOp::Rsqrt) => 1.0,
            _ if has(VectorOp::Lut) => {
                self.assume("exp / rsqrt without a hardware unit use a lookup table: 1 vector op per element");
                1.0
            }
            _ => {
                self.assume(format!(
                    "exp / rsqrt without a hardware unit or LUT are emulated: {EMULATED_SPECIAL_OPS} vector ops each"
                ));
                EMULATED_SPECIAL_OPS
            }
        };
        let vops = elems as f64 * ops_per + n_special as f64 * special_cost;
        let compute = vops / (t.vector.lanes as f64 * t.clock_hz() * t.efficiency.vector);
        let ab = self.p.activation_bytes();
        // Spilled activations are read and written once more.
        let dram = if fits { 0.0 } else { 2.0 * elems as f64 * ab };
        let memory = dram / self.bw();
        let time = self.overlap(compute, memory, 0.0);
        let sram = 2.0 * elems as f64 * ab;
        let energy = (vops * self.pj_mac() + sram * t.power.pj_per_sram_byte + dram * t.power.pj_per_dram_byte) * 1e-12;
        OpCost {
            layer: op.layer.clone(),
            name: op.name.clone(),
            shape: format!("{elems} elems"),
            dataflow: "-".into(),
            alternatives_us: Vec::new(),
            folds: 0,
            macs: 0.0,
            compute_s: compute,
            memory_s: memory,
            time_s: time,
            bound: if compute >= memory { Bound::Vector } else { Bound::Memory },
            dram_bytes: dram,
            sram_bytes: sram,
            utilization: 0.0,
            energy_j: energy,
        }
    }

    fn memory(&mut self, op: &Op, read: f64, write: f64) -> OpCost {
        let dram = read + write;
        let time = dram / self.bw();
        OpCost {
            layer: op.layer.clone(),
            name: op.name.clone(),
            shape: format!("{:.0} bytes", dram),
            dataflow: "-".into(),
            alternatives_us: Vec::new(),
            folds: 0,
            macs: 0.0,
            compute_s: 0.0,
            memory_s: time,
            time_s: time,
            bound: Bound::Memory,
            dram_bytes: dram,
            sram_bytes: 0.0,
            utilization: 0.0,
            energy_j: dram * self.t.power.pj_per_dram_byte * 1e-12,
        }
    }

    fn phase(&mut self, ops: &[Op], act_rows: u64, s: &ModelShape, weights_resident: bool) -> PhaseCost {
        let ab = self.p.activation_bytes();
        // The widest activation of a layer: the MLP hidden or the attention scores of one head.
        let widest = (act_rows * s.ffn_hidden.max(s.d_model * 3)) as f64 * ab;
        let act_fits = widest <= self.buf.activation;
        let mut costs = Vec::with_capacity(ops.len());
        for op in ops {
            let c = match &op.kind {
                OpKind::Gemm { gemm, count, b_is_weight, b_from_kv_cache } => {
                    self.gemm(op, *gemm, *count, *b_is_weight, *b_from_kv_cache, act_fits, weights_resident)
                }
                OpKind::Vector { elems, ops_per_elem, special, special_count } => {
                    self.vector(op, *elems, *ops_per_elem, *special, *special_count, act_fits)
                }
                OpKind::Memory { read_bytes, write_bytes } => self.memory(op, *read_bytes, *write_bytes),
            };
            let mut c = c;
            c.time_s += self.t.efficiency.op_overhead_us * 1e-6;
            costs.push(c);
        }
        if !act_fits {
            self.assume(format!(
                "activations of {act_rows} rows exceed the {:.0} KiB activation buffer: spilled to DRAM",
                self.buf.activation / 1024.0
            ));
        }
        let time: f64 = costs.iter().map(|c| c.time_s).sum();
        let macs: f64 = costs.iter().map(|c| c.macs).sum();
        let peak = self.t.peak_macs(self.p).unwrap_or(1.0);
        let mut energy = Energy::default();
        for c in &costs {
            // Whatever is not SRAM or DRAM is arithmetic (MACs, or vector ops costed per MAC).
            let sram = c.sram_bytes * self.t.power.pj_per_sram_byte * 1e-12;
            let dram = c.dram_bytes * self.t.power.pj_per_dram_byte * 1e-12;
            energy.mac_j += c.energy_j - sram - dram;
            energy.sram_j += sram;
            energy.dram_j += dram;
        }
        energy.static_j = self.t.power.static_w * time;
        PhaseCost {
            time_s: time,
            macs,
            dram_bytes: costs.iter().map(|c| c.dram_bytes).sum(),
            utilization: if time > 0.0 { macs / (peak * time) } else { 0.0 },
            energy,
            ops: costs,
        }
    }
}

/// Maps `s` onto `t` at precision `p` for workload `w`.
pub fn estimate(t: &Target, s: &ModelShape, p: Precision, w: Workload) -> Result<Estimate> {
    s.validate()?;
    w.validate(s)?;
    if !t.supports(p) {
        let have: Vec<String> = t.array.macs_per_cycle.supported().iter().map(|p| p.to_string()).collect();
        return Err(HwError::Unsupported {
            target: t.name.clone(),
            msg: format!("precision {p} is not supported (supported: {})", have.join(", ")),
        });
    }
    let kib = 1024.0;
    let (wb, ab) = (p.weight_bytes(), p.activation_bytes());
    let weight_bytes = s.params() as f64 * wb;
    let mut buf = BufferBytes {
        weight: t.buffers.weight_kib * kib,
        activation: t.buffers.activation_kib * kib,
        accumulator: t.buffers.accumulator_kib * kib,
    };
    if t.kind == Kind::DataflowFpga {
        // The premise of a dataflow design: its weight memory holds the whole model (the fit check says if it can).
        buf.weight = buf.weight.max(weight_bytes);
    }
    let mut cx = Ctx { t, p, buf, assumptions: Vec::new() };
    let kv_len_max = w.prompt_len + w.gen;
    let kv_cache_bytes = s.layers as f64 * w.batch as f64 * kv_len_max as f64 * 2.0 * s.kv_dim() as f64 * ab;
    // Dataflow FPGAs keep every weight on chip; others stream weights that do not fit.
    // GPU shared memory and CPU caches do not keep weights between kernels: they stream.
    let weights_resident = t.kind == Kind::DataflowFpga || (t.kind.is_systolic() && weight_bytes <= buf.weight);

    cx.assume(format!("weights {} ({} bytes each), activations {} bytes; accumulation in 32 bits", p, wb, ab));
    if weights_resident {
        cx.assume("all weights stay on chip: loaded once, before the first request (not timed)");
    } else {
        cx.assume(format!(
            "weights ({:.1} MiB) exceed the {:.0} KiB weight buffer: streamed from DRAM every pass",
            weight_bytes / (1 << 20) as f64,
            t.buffers.weight_kib
        ));
    }
    cx.assume(format!(
        "DRAM at {:.1} GB/s x {:.0}% achieved; {}",
        t.dram.bandwidth_gbs,
        t.efficiency.memory * 100.0,
        if t.buffers.double_buffered {
            "double buffered: memory and compute overlap (time = max), the first tile's load is exposed"
        } else {
            "single buffered: memory time adds to compute time"
        }
    ));
    if t.efficiency.op_overhead_us > 0.0 {
        cx.assume(format!("{} µs fixed overhead per op (kernel launch / dispatch)", t.efficiency.op_overhead_us));
    }
    if !t.efficiency.note.is_empty() {
        cx.assume(format!("efficiency: {}", t.efficiency.note));
    }
    cx.assume(format!(
        "decode step costed at KV length {} (half-way through {} generated tokens); causal attention computed as full tiles",
        w.decode_kv_len(),
        w.gen
    ));
    cx.assume("ops run one after another (no overlap between layers); host and PCIe time not modelled");

    let pre_ops = lower(s, w.batch, Phase::Prefill { tokens: w.prompt_len }, w.logits_all_positions, wb, ab);
    let dec_ops = lower(s, w.batch, Phase::Decode { kv_len: w.decode_kv_len() }, false, wb, ab);
    let prefill = cx.phase(&pre_ops, w.batch * w.prompt_len, s, weights_resident);
    let decode = cx.phase(&dec_ops, w.batch, s, weights_resident);

    let layers = layer_rows(&prefill, &decode);
    let prefill_tokens = (w.batch * w.prompt_len) as f64;
    let decode_tps = w.batch as f64 / decode.time_s;
    let dec_energy = decode.energy.total();
    let decode_power = dec_energy / decode.time_s;
    let cost = t.price.as_ref().map(|pr| {
        let hourly = pr.usd / (AMORTIZATION_YEARS * 8766.0) + decode_power / 1000.0 * USD_PER_KWH;
        hourly / (decode_tps * 3600.0) * 1e6
    });
    if t.price.is_some() {
        cx.assume(format!(
            "cost per million tokens: price over {AMORTIZATION_YEARS} years of continuous decode plus ${USD_PER_KWH}/kWh"
        ));
    }
    cx.assume(format!(
        "energy: {} pJ/MAC ({p}), {} pJ/SRAM byte, {} pJ/DRAM byte, {} W static{}",
        t.power.pj_per_mac.get(p).unwrap_or(0.0),
        t.power.pj_per_sram_byte,
        t.power.pj_per_dram_byte,
        t.power.static_w,
        if t.power.note.is_empty() { String::new() } else { format!(" ({})", t.power.note) }
    ));

    let (fit_issues, advice, resources) = fit(t, s, p, weight_bytes, kv_cache_bytes, &mut cx);
    Ok(Estimate {
        target: t.name.clone(),
        kind: t.kind.name().to_string(),
        source: t.source.clone(),
        model: s.name.clone(),
        precision: p,
        batch: w.batch,
        prompt_len: w.prompt_len,
        gen: w.gen,
        prefill_tokens_per_s: prefill_tokens / prefill.time_s,
        decode_tokens_per_s: decode_tps,
        latency_ms: (prefill.time_s + w.gen as f64 * decode.time_s) * 1e3,
        ttft_ms: prefill.time_s * 1e3,
        decode_step_ms: decode.time_s * 1e3,
        energy_per_token_j: dec_energy / w.batch as f64,
        prefill_energy_per_token_j: prefill.energy.total() / prefill_tokens,
        decode_power_w: decode_power,
        cost_per_million_tokens_usd: cost,
        prefill_utilization: prefill.utilization,
        decode_utilization: decode.utilization,
        weight_bytes,
        kv_cache_bytes,
        fits: fit_issues.is_empty(),
        fit_issues,
        advice,
        resources,
        layers,
        prefill,
        decode,
        assumptions: cx.assumptions,
    })
}

fn layer_rows(prefill: &PhaseCost, decode: &PhaseCost) -> Vec<LayerRow> {
    let mut rows: Vec<LayerRow> = Vec::new();
    for (is_decode, ph) in [(false, prefill), (true, decode)] {
        for c in &ph.ops {
            let i = match rows.iter().position(|r| r.layer == c.layer) {
                Some(i) => i,
                None => {
                    rows.push(LayerRow {
                        layer: c.layer.clone(),
                        prefill_ms: 0.0,
                        decode_ms: 0.0,
                        prefill_dram_mb: 0.0,
                        decode_dram_mb: 0.0,
                        decode_bound: Bound::Memory,
                        decode_energy_mj: 0.0,
                    });
                    rows.len() - 1
                }
            };
            let r = &mut rows[i];
            if is_decode {
                r.decode_ms += c.time_s * 1e3;
                r.decode_dram_mb += c.dram_bytes / 1e6;
                r.decode_energy_mj += c.energy_j * 1e3;
            } else {
                r.prefill_ms += c.time_s * 1e3;
                r.prefill_dram_mb += c.dram_bytes / 1e6;
            }
        }
    }
    for r in &mut rows {
        // The bound of the op that took longest in this layer's decode.
        if let Some(c) = decode.ops.iter().filter(|c| c.layer == r.layer).max_by(|a, b| a.time_s.total_cmp(&b.time_s)) {
            r.decode_bound = c.bound;
        }
    }
    rows
}

const BRAM36_BYTES: f64 = 4608.0;
const URAM_BYTES: f64 = 36864.0;

type Fit = (Vec<String>, Vec<String>, Option<Resources>);

fn fit(t: &Target, s: &ModelShape, p: Precision, weight_bytes: f64, kv_bytes: f64, cx: &mut Ctx) -> Fit {
    let (mut issues, mut advice) = (Vec::new(), Vec::new());
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let cap = t.dram.capacity_gib * (1u64 << 30) as f64;
    if weight_bytes + kv_bytes > cap {
        issues.push(format!(
            "weights {:.0} MiB + KV cache {:.0} MiB exceed {:.1} GiB of DRAM",
            mib(weight_bytes),
            mib(kv_bytes),
            t.dram.capacity_gib
        ));
        advice.push("use a lower precision (int4 halves int8's weights), a smaller batch or a shorter context".into());
    }
    let Some(f) = &t.fpga else { return (issues, advice, None) };
    let macs = t.array.macs_per_cycle.get(p).unwrap_or(0.0);
    let dsp = macs * f.dsp_per_mac.get(p).unwrap_or(0.0);
    let lut = macs * f.lut_per_mac.get(p).unwrap_or(0.0)
        + t.vector.lanes as f64 * f.lut_per_vector_lane
        + f.lut_overhead as f64;
    let mut weight_store = t.buffers.weight_kib * 1024.0;
    if t.kind == Kind::DataflowFpga {
        weight_store = weight_store.max(weight_bytes);
        cx.assume("dataflow FPGA: every weight is held on chip (hls4ml / FINN style), in URAM first, then BRAM");
    }
    let other = (t.buffers.activation_kib + t.buffers.accumulator_kib) * 1024.0;
    // Large buffers go to URAM while it lasts, the rest to BRAM36.
    let u = f.max_utilization;
    let uram_cap = (f.uram as f64 * u).floor() * URAM_BYTES;
    let in_uram = (weight_store + other).min(uram_cap);
    let uram = (in_uram / URAM_BYTES).ceil();
    let bram = ((weight_store + other - in_uram) / BRAM36_BYTES).ceil();
    let over = |need: f64, have: u64| need > have as f64 * u;
    if over(dsp, f.dsp) {
        issues.push(format!("array needs {dsp:.0} DSP, {:.0} usable ({} x {u})", f.dsp as f64 * u, f.dsp));
        let scale = (f.dsp as f64 * u / dsp).sqrt();
        let side = |x: u64| ((x as f64 * scale).floor() as u64).max(1);
        advice.push(format!(
            "shrink the array to about {}x{} or use a precision with fewer DSP per MAC",
            side(t.array.rows),
            side(t.array.cols)
        ));
    }
    if over(lut, f.lut) {
        issues.push(format!("design needs {lut:.0} LUT, {:.0} usable", f.lut as f64 * u));
        advice.push("fewer vector lanes or a smaller array".into());
    }
    let uram_short = over(uram, f.uram) || (uram > 0.0 && f.uram == 0);
    if over(bram, f.bram36) || uram_short {
        issues.push(format!(
            "buffers need {:.1} MiB on chip ({bram:.0} BRAM36 + {uram:.0} URAM), device has {} BRAM36 + {} URAM \
             (x {u} usable)",
            mib(weight_store + other),
            f.bram36,
            f.uram
        ));
        let on_chip = (f.bram36 as f64 * BRAM36_BYTES + f.uram as f64 * URAM_BYTES) * u;
        if t.kind == Kind::DataflowFpga {
            advice.push(format!(
                "{} needs {:.1} MiB of {p} weights on chip, {:.1} MiB usable: use a systolic overlay that streams \
                 weights from DRAM, int4, or a model of at most {:.1}M parameters",
                s.name,
                mib(weight_bytes),
                mib(on_chip),
                (on_chip - other).max(0.0) / p.weight_bytes() / 1e6
            ));
        } else {
            advice.push("shrink the weight or activation buffer".into());
        }
    }
    let res = Resources {
        device: f.device.clone(),
        dsp,
        dsp_budget: f.dsp,
        lut,
        lut_budget: f.lut,
        bram36: bram,
        bram36_budget: f.bram36,
        uram,
        uram_budget: f.uram,
        max_utilization: u,
    };
    cx.assume(format!(
        "FPGA fit: {} DSP / MAC, {} LUT / MAC at {p}; BRAM36 = 4.5 KiB, URAM = 36 KiB; {:.0}% of each resource usable",
        f.dsp_per_mac.get(p).unwrap_or(0.0),
        f.lut_per_mac.get(p).unwrap_or(0.0),
        u * 100.0
    ));
    (issues, advice, Some(res))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load_target;

    fn w(batch: u64, p: u64, g: u64) -> Workload {
        Workload { batch, prompt_len: p, gen: g, logits_all_positions: false }
    }

    fn gpt(name: &str) -> ModelShape {
        ModelShape::preset(name).unwrap()
    }

    #[test]
    fn dataflow_fpga_cannot_hold_gpt2_weights() {
        let t = load_target("u250-dataflow").unwrap();
        // gpt-s int8 (13.9 MB) fits the U250's 54 MB of BRAM + URAM; GPT-2 small (124 MB) does not.
        let small = estimate(&t, &gpt("gpt-s"), Precision::Int8, w(1, 64, 64)).unwrap();
        assert!(small.fits, "{:?}", small.fit_issues);
        let big = estimate(&t, &gpt("gpt2-124m"), Precision::Int8, w(1, 64, 64)).unwrap();
        assert!(!big.fits);
        assert!(big.fit_issues.iter().any(|i| i.contains("on chip")), "{:?}", big.fit_issues);
        assert!(big.advice.iter().any(|a| a.contains("streams weights")), "{:?}", big.advice);
        // The streaming overlay on the same card holds it.
        let ov = estimate(&load_target("u250-systolic").unwrap(), &gpt("gpt2-124m"), Precision::Int8, w(1, 64, 64));
        assert!(ov.unwrap().fits);
    }

    #[test]
    fn an_array_too_big_for_the_dsps_is_reported_with_a_fix() {
        let mut t = load_target("dpu-b4096-zcu102").unwrap();
        t.array.rows = 64;
        t.array.cols = 128;
        t.array.macs_per_cycle.int8 = Some(8192.0); // 8192 × 0.35 = 2867 DSP > 2520 × 0.8
        let e = estimate(&t, &gpt("gpt-s"), Precision::Int8, w(1, 32, 32)).unwrap();
        assert!(!e.fits);
        assert!(e.fit_issues[0].contains("DSP"), "{:?}", e.fit_issues);
        assert!(e.advice[0].contains("shrink the array"), "{:?}", e.advice);
        let r = e.resources.unwrap();
        assert!((r.dsp - 8192.0 * 0.35).abs() < 1e-9);
    }

    #[test]
    fn dataflow_choice_follows_the_shape() {
        let t = load_target("u250-systolic").unwrap();
        let e = estimate(&t, &gpt("gpt2-124m"), Precision::Int8, w(4, 512, 64)).unwrap();
        let pick = |ph: &PhaseCost, name: &str| {
            ph.ops.iter().find(|o| o.layer == "block 0" && o.name == name).unwrap().dataflow.clone()
        };
        // Decode has one row per sequence: streaming M through a weight-stationary array wastes
        // the 2R+C fill on 4 rows, so another dataflow wins; every one tried is shown.
        let d = e.decode.ops.iter().find(|o| o.layer == "block 0" && o.name == "mlp up").unwrap();
        assert_ne!(d.dataflow, "ws");
        assert_eq!(d.alternatives_us.len(), 3);
        // Prefill of 2048 rows: the longer of M and N is the one streamed. Attention output
        // (M 2048 > N 768) keeps the weights stationary; mlp up (N 3072 > M 2048) the inputs.
        assert_eq!(pick(&e.prefill, "attention output"), "ws");
        assert_eq!(pick(&e.prefill, "mlp up"), "is");
        // The TPU only has WS: the choice is forced and no alternatives are listed.
        let tpu = estimate(&load_target("tpu-v1").unwrap(), &gpt("gpt-s"), Precision::Int8, w(1, 16, 16)).unwrap();
        assert!(tpu
            .decode
            .ops
            .iter()
            .filter(|o| o.macs > 0.0)
            .all(|o| o.dataflow == "ws" && o.alternatives_us.is_empty()));
    }

    #[test]
    fn energy_bookkeeping_sums() {
        for name in crate::spec::builtin_names() {
            let t = load_target(name).unwrap();
            let e = estimate(&t, &gpt("gpt-s"), t.default_precision, w(2, 32, 16)).unwrap();
            for ph in [&e.prefill, &e.decode] {
                let dynamic: f64 = ph.ops.iter().map(|o| o.energy_j).sum();
                let en = &ph.energy;
                assert!(en.mac_j >= 0.0 && en.sram_j >= 0.0 && en.dram_j >= 0.0, "{name}: {en:?}");
                assert!((en.mac_j + en.sram_j + en.dram_j - dynamic).abs() <= 1e-9 * dynamic.max(1e-12), "{name}");
                assert!((en.static_j - t.power.static_w * ph.time_s).abs() < 1e-12);
                let t_sum: f64 = ph.ops.iter().map(|o| o.time_s).sum();
                assert!((t_sum - ph.time_s).abs() <= 1e-12 * t_sum);
            }
            // Per-layer decode energy adds up to the dynamic part; per token = total / batch.
            let layers: f64 = e.layers.iter().map(|l| l.decode_energy_mj).sum::<f64>() / 1e3;
            let en = &e.decode.energy;
            assert!((layers - (en.total() - en.static_j)).abs() <= 1e-9 * layers.max(1e-12), "{name}");
            assert!((e.energy_per_token_j - en.total() / 2.0).abs() <= 1e-12, "{name}");
            assert!(e.prefill_tokens_per_s > 0.0 && e.decode_tokens_per_s > 0.0, "{name}");
            assert!(!e.assumptions.is_empty());
        }
    }

    #[test]
    fn decode_on_tpu_is_bound_by_ddr3() {
        // gpt2-124m int8: 124 MB of weights over 34 GB/s is at least 3.6 ms a step.
        let t = load_target("tpu-v1").unwrap();
        let e = estimate(&t, &gpt("gpt2-124m"), Precision::Int8, w(1, 128, 128)).unwrap();
        let floor = e.weight_bytes / 34e9;
        assert!(e.decode_step_ms / 1e3 >= floor, "{} ms", e.decode_step_ms);
        assert!(e.decode_step_ms / 1e3 < 1.5 * floor, "{} ms", e.decode_step_ms);
        assert!(e.decode_utilization < 0.05);
    }

    #[test]
    fn gpu_pads_decode_rows_to_whole_tiles() {
        let t = load_target("h100-sxm").unwrap();
        let e = estimate(&t, &gpt("gpt2-124m"), Precision::Bf16, w(1, 64, 64)).unwrap();
        let up = e.decode.ops.iter().find(|o| o.layer == "block 0" && o.name == "mlp up").unwrap();
        // One row padded to a 64×128 tile: 64 × 3072 × 768 MACs at 70% of 270,336 MAC/cycle × 1.83 GHz.
        let want = 64.0 * 3072.0 * 768.0 / (270_336.0 * 1.83e9 * 0.7);
        assert!((up.compute_s - want).abs() < 1e-12 * want.max(1.0) + 1e-15, "{} vs {want}", up.compute_s);
        // ...and still memory-bound: 4.7 MB of bf16 weights over 2.68 TB/s takes longer.
        assert_eq!(up.bound, Bound::Memory);
        assert_eq!(up.dataflow, "tiled");
    }

    #[test]
    fn double_buffering_overlaps_memory_and_compute() {
        let mut t = load_target("u250-systolic").unwrap();
        let s = gpt("gpt-s");
        let dbl = estimate(&t, &s, Precision::Int8, w(4, 64, 16)).unwrap();
        t.buffers.double_buffered = false;
        let single = estimate(&t, &s, Precision::Int8, w(4, 64, 16)).unwrap();
        assert!(single.decode.time_s > dbl.decode.time_s);
        for (a, b) in dbl.decode.ops.iter().zip(&single.decode.ops).filter(|(a, _)| a.macs > 0.0) {
            assert!(a.time_s >= a.compute_s.max(a.memory_s) && a.time_s <= b.time_s, "{}", a.name);
            assert!((b.time_s - (b.compute_s + b.memory_s)).abs() <= 1e-12, "{}", b.name);
        }
        assert!(single.assumptions.iter().any(|a| a.contains("single buffered")));
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let t = load_target("tpu-v1").unwrap();
        let s = gpt("gpt-s");
        assert!(matches!(estimate(&t, &s, Precision::Bf16, w(1, 8, 8)), Err(HwError::Unsupported { .. })));
        assert!(estimate(&t, &s, Precision::Int8, w(0, 8, 8)).is_err());
        assert!(estimate(&t, &s, Precision::Int8, w(1, 200, 100)).unwrap_err().to_string().contains("context"));
        let bad = ModelShape { heads: 5, ..s };
        assert!(estimate(&t, &bad, Precision::Int8, w(1, 8, 8)).is_err());
    }

    #[test]
    fn dram_capacity_is_checked() {
        let mut t = load_target("edge-npu").unwrap();
        t.dram.capacity_gib = 0.05; // 51 MiB: GPT-2 small in int8 needs 119 MiB
        let e = estimate(&t, &gpt("gpt2-124m"), Precision::Int8, w(1, 8, 8)).unwrap();
        assert!(!e.fits && e.fit_issues[0].contains("DRAM"));
    }
}
