//! Accelerator descriptions: one TOML file per target, built-ins compiled in, users add their own.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{HwError, Result};
use crate::systolic::Dataflow;

/// Number formats a weight or activation can be stored and multiplied in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Int4,
    Int8,
    Bf16,
    Fp16,
    F32,
}

impl Precision {
    pub const ALL: [Precision; 5] =
        [Precision::Int4, Precision::Int8, Precision::Bf16, Precision::Fp16, Precision::F32];

    /// Bytes a weight of this precision takes in memory (int4 packs two to a byte).
    pub fn weight_bytes(self) -> f64 {
        match self {
            Precision::Int4 => 0.5,
            Precision::Int8 => 1.0,
            Precision::Bf16 | Precision::Fp16 => 2.0,
            Precision::F32 => 4.0,
        }
    }

    /// Bytes an activation takes: int4 weights run with int8 activations (w4a8), as deployed.
    pub fn activation_bytes(self) -> f64 {
        match self {
            Precision::Int4 | Precision::Int8 => 1.0,
            Precision::Bf16 | Precision::Fp16 => 2.0,
            Precision::F32 => 4.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Int4 => "int4",
            Precision::Int8 => "int8",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::F32 => "f32",
        }
    }

    pub fn parse(s: &str) -> Option<Precision> {
        match s.to_ascii_lowercase().as_str() {
            "int4" | "w4a8" => Some(Precision::Int4),
            "int8" | "w8a8" => Some(Precision::Int8),
            "bf16" => Some(Precision::Bf16),
            "fp16" | "f16" => Some(Precision::Fp16),
            "f32" | "fp32" => Some(Precision::F32),
            _ => None,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What kind of machine a description is: it decides how GEMMs are mapped and what must fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A systolic array built in FPGA fabric (Vitis AI DPU style): weights streamed from DRAM.
    SystolicFpga,
    /// One hardware stage per layer (FINN / hls4ml style): every weight must stay on chip.
    DataflowFpga,
    /// A fixed systolic array in silicon (TPU style).
    AsicNpu,
    /// Tensor cores: modelled as tiles over many parallel units, not as one array.
    Gpu,
    /// SIMD cores: modelled as tiles, peaks measured by kiln's own probes.
    Cpu,
}

impl Kind {
    pub fn is_fpga(self) -> bool {
        matches!(self, Kind::SystolicFpga | Kind::DataflowFpga)
    }

    /// Arrays count SCALE-Sim-style folds; GPUs and CPUs count padded tiles over a peak rate.
    pub fn is_systolic(self) -> bool {
        matches!(self, Kind::SystolicFpga | Kind::DataflowFpga | Kind::AsicNpu)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::SystolicFpga => "systolic-fpga",
            Kind::DataflowFpga => "dataflow-fpga",
            Kind::AsicNpu => "asic-npu",
            Kind::Gpu => "gpu",
            Kind::Cpu => "cpu",
        }
    }
}

/// One value per precision; a precision left out is one the target does not support.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerPrecision {
    pub int4: Option<f64>,
    pub int8: Option<f64>,
    pub bf16: Option<f64>,
    pub fp16: Option<f64>,
    pub f32: Option<f64>,
}

impl PerPrecision {
    pub fn get(&self, p: Precision) -> Option<f64> {
        match p {
            Precision::Int4 => self.int4,
            Precision::Int8 => self.int8,
            Precision::Bf16 => self.bf16,
            Precision::Fp16 => self.fp16,
            Precision::F32 => self.f32,
        }
    }

    pub fn set(&mut self, p: Precision, v: f64) {
        let slot = match p {
            Precision::Int4 => &mut self.int4,
            Precision::Int8 => &mut self.int8,
            Precision::Bf16 => &mut self.bf16,
            Precision::Fp16 => &mut self.fp16,
            Precision::F32 => &mut self.f32,
        };
        *slot = Some(v);
    }

    pub fn supported(&self) -> Vec<Precision> {
        Precision::ALL.into_iter().filter(|p| self.get(*p).is_some()).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArraySpec {
    /// Systolic kinds: processing-element rows (the reduction side for weight-stationary).
    /// GPU / CPU kinds: the M side of the tile a GEMM is padded to.
    pub rows: u64,
    /// Systolic kinds: PE columns. GPU / CPU kinds: the N side of the padding tile.
    pub cols: u64,
    /// MACs the whole device completes per cycle at each precision it supports.
    pub macs_per_cycle: PerPrecision,
    /// Dataflows the array can be scheduled in (systolic kinds); all three when left out.
    #[serde(default = "all_dataflows")]
    pub dataflows: Vec<Dataflow>,
}

fn all_dataflows() -> Vec<Dataflow> {
    vec![Dataflow::Ws, Dataflow::Os, Dataflow::Is]
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffers {
    pub weight_kib: f64,
    pub activation_kib: f64,
    pub accumulator_kib: f64,
    /// Loads of the next tile overlap compute on the current one.
    #[serde(default = "yes")]
    pub double_buffered: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dram {
    pub bandwidth_gbs: f64,
    pub capacity_gib: f64,
    /// Memory technology, for the report (DDR4-2400 x64, HBM3, ...).
    #[serde(default)]
    pub kind: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VectorOp {
    Exp,
    Rsqrt,
    Lut,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorUnit {
    /// Elementwise operations per cycle.
    pub lanes: u64,
    /// Transcendentals it has in hardware; without them exp / rsqrt / GELU are emulated.
    pub ops: Vec<VectorOp>,
}

/// Achieved fraction of each peak: 1.0 for arrays whose cycles the model counts exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Efficiency {
    #[serde(default = "one")]
    pub compute: f64,
    #[serde(default = "one")]
    pub memory: f64,
    #[serde(default = "one")]
    pub vector: f64,
    /// Fixed cost of starting each op (a GPU kernel launch, a fork-join), microseconds.
    #[serde(default)]
    pub op_overhead_us: f64,
    /// Where the fractions come from.
    #[serde(default)]
    pub note: String,
}

fn one() -> f64 {
    1.0
}

impl Default for Efficiency {
    fn default() -> Self {
        Efficiency { compute: 1.0, memory: 1.0, vector: 1.0, op_overhead_us: 0.0, note: String::new() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FpgaBudget {
    /// The device the budgets are for.
    pub device: String,
    pub dsp: u64,
    pub lut: u64,
    pub bram36: u64,
    #[serde(default)]
    pub uram: u64,
    /// DSP slices one MAC costs at each precision (0.5 for int8: two packed in one DSP48E2).
    pub dsp_per_mac: PerPrecision,
    /// LUTs one MAC costs (adder trees, operand registers, int4 multipliers in fabric).
    pub lut_per_mac: PerPrecision,
    pub lut_per_vector_lane: f64,
    /// Control, DMA and interconnect of the overlay.
    pub lut_overhead: u64,
    /// Fraction of each resource a design can use and still route and close timing.
    #[serde(default = "routable")]
    pub max_utilization: f64,
}

fn routable() -> f64 {
    0.8
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Power {
    pub static_w: f64,
    pub pj_per_mac: PerPrecision,
    pub pj_per_sram_byte: f64,
    pub pj_per_dram_byte: f64,
    #[serde(default)]
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub usd: f64,
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub name: String,
    pub kind: Kind,
    pub description: String,
    /// The datasheets or papers the numbers come from.
    pub source: String,
    pub clock_mhz: f64,
    pub default_precision: Precision,
    /// Peaks are measured on this machine at run time (CPU): see [`Target::apply_probe`].
    #[serde(default)]
    pub probe: bool,
    pub array: ArraySpec,
    pub buffers: Buffers,
    pub dram: Dram,
    pub vector: VectorUnit,
    #[serde(default)]
    pub efficiency: Efficiency,
    pub fpga: Option<FpgaBudget>,
    pub power: Power,
    pub price: Option<Price>,
}

/// The built-in descriptions, compiled in.
pub const BUILTINS: &[(&str, &str)] = &[
    ("dpu-b4096-zcu102", include_str!("../targets/dpu-b4096-zcu102.toml")),
    ("u250-systolic", include_str!("../targets/u250-systolic.toml")),
    ("u250-dataflow", include_str!("../targets/u250-dataflow.toml")),
    ("tpu-v1", include_str!("../targets/tpu-v1.toml")),
    ("edge-npu", include_str!("../targets/edge-npu.toml")),
    ("h100-sxm", include_str!("../targets/h100-sxm.toml")),
    ("cpu-dev", include_str!("../targets/cpu-dev.toml")),
];

pub fn builtin_names() -> Vec<&'static str> {
    BUILTINS.iter().map(|b| b.0).collect()
}

/// Parses and validates a description; `name` is used in error messages.
pub fn parse_target(name: &str, text: &str) -> Result<Target> {
    let t: Target = toml::from_str(text).map_err(|e| HwError::Parse { name: name.to_string(), msg: e.to_string() })?;
    t.validate()?;
    Ok(t)
}

/// A built-in name, or a path to a TOML file.
pub fn load_target(name_or_path: &str) -> Result<Target> {
    if let Some((_, text)) = BUILTINS.iter().find(|b| b.0 == name_or_path) {
        return parse_target(name_or_path, text);
    }
    let path = Path::new(name_or_path);
    if path.extension().is_some_and(|e| e == "toml") || path.exists() {
        let text = std::fs::read_to_string(path).map_err(|e| HwError::Io { path: path.to_path_buf(), source: e })?;
        return parse_target(name_or_path, &text);
    }
    Err(HwError::UnknownTarget(name_or_path.to_string(), builtin_names().join(", ")))
}

/// Every built-in, parsed (a build-time bug if one fails: tested).
pub fn builtins() -> Result<Vec<Target>> {
    BUILTINS.iter().map(|(n, t)| parse_target(n, t)).collect()
}

impl Target {
    pub fn clock_hz(&self) -> f64 {
        self.clock_mhz * 1e6
    }

    pub fn supports(&self, p: Precision) -> bool {
        self.array.macs_per_cycle.get(p).is_some()
    }

    /// Peak MAC/s at a precision (before efficiency).
    pub fn peak_macs(&self, p: Precision) -> Option<f64> {
        self.array.macs_per_cycle.get(p).map(|m| m * self.clock_hz())
    }

    /// Replaces the CPU's nominal peaks with measured ones: f32 MACs per cycle from the FMA
    /// probe, the vector unit as wide as the FMA lanes, DRAM bandwidth from the read probe.
    pub fn apply_probe(&mut self, f32_peak_gflops: f64, read_bandwidth_gbs: f64) -> Result<()> {
        if !(f32_peak_gflops > 0.0 && read_bandwidth_gbs > 0.0) {
            return Err(self.invalid(format!(
                "probe gave non-positive peaks ({f32_peak_gflops} GFLOP/s, {read_bandwidth_gbs} GB/s)"
            )));
        }
        let macs = f32_peak_gflops * 1e9 / 2.0 / self.clock_hz();
        self.array.macs_per_cycle.set(Precision::F32, macs);
        self.vector.lanes = macs.round().max(1.0) as u64;
        self.dram.bandwidth_gbs = read_bandwidth_gbs;
        self.source = format!(
            "{} (measured now: {f32_peak_gflops:.0} GFLOP/s f32, {read_bandwidth_gbs:.1} GB/s read)",
            self.source
        );
        Ok(())
    }

    fn invalid(&self, msg: String) -> HwError {
        HwError::Invalid { name: self.name.clone(), msg }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(self.invalid(m));
        let pos = |x: f64| x.is_finite() && x > 0.0;
        let nonneg = |x: f64| x.is_finite() && x >= 0.0;
        if self.name.trim().is_empty() {
            return bad("name is empty".into());
        }
        if self.source.trim().is_empty() {
            return bad("source is empty: name the datasheet or paper the numbers come from".into());
        }
        if !pos(self.clock_mhz) {
            return bad(format!("clock_mhz must be positive, got {}", self.clock_mhz));
        }
        if self.array.rows > 1 << 16 || self.array.cols > 1 << 16 {
            return bad(format!(
                "array {}x{} is larger than kiln models (65536 a side)",
                self.array.rows, self.array.cols
            ));
        }
        if self.array.rows == 0 || self.array.cols == 0 {
            return bad(format!("array must be at least 1x1, got {}x{}", self.array.rows, self.array.cols));
        }
        let supported = self.array.macs_per_cycle.supported();
        if supported.is_empty() {
            return bad("array.macs_per_cycle names no precision".into());
        }
        for p in &supported {
            let m = self.array.macs_per_cycle.get(*p).unwrap_or(0.0);
            if !pos(m) {
                return bad(format!("array.macs_per_cycle.{p} must be positive, got {m}"));
            }
            match self.power.pj_per_mac.get(*p) {
                Some(e) if nonneg(e) => {}
                _ => return bad(format!("power.pj_per_mac.{p} is missing or negative (the array supports {p})")),
            }
        }
        if !self.supports(self.default_precision) {
            return bad(format!("default_precision {} is not in array.macs_per_cycle", self.default_precision));
        }
        if self.kind.is_systolic() && self.array.dataflows.is_empty() {
            return bad("array.dataflows is empty".into());
        }
        let b = &self.buffers;
        for (n, v) in [("weight_kib", b.weight_kib), ("activation_kib", b.activation_kib)] {
            if !pos(v) {
                return bad(format!("buffers.{n} must be positive, got {v}"));
            }
        }
        if !nonneg(b.accumulator_kib) {
            return bad(format!("buffers.accumulator_kib must be non-negative, got {}", b.accumulator_kib));
        }
        if !pos(self.dram.bandwidth_gbs) || !pos(self.dram.capacity_gib) {
            return bad("dram.bandwidth_gbs and dram.capacity_gib must be positive".into());
        }
        if self.vector.lanes == 0 {
            return bad("vector.lanes must be at least 1".into());
        }
        let e = &self.efficiency;
        for (n, v) in [("compute", e.compute), ("memory", e.memory), ("vector", e.vector)] {
            if !(v > 0.0 && v <= 1.0) {
                return bad(format!("efficiency.{n} must be in (0, 1], got {v}"));
            }
        }
        if !nonneg(e.op_overhead_us) {
            return bad(format!("efficiency.op_overhead_us must be non-negative, got {}", e.op_overhead_us));
        }
        match (&self.fpga, self.kind.is_fpga()) {
            (None, true) => return bad(format!("kind {} needs an [fpga] table of budgets", self.kind.name())),
            (Some(_), false) => return bad(format!("kind {} takes no [fpga] table", self.kind.name())),
            (Some(f), true) => {
                if f.dsp == 0 || f.lut == 0 || f.bram36 + f.uram == 0 {
                    return bad("fpga budgets (dsp, lut, bram36 + uram) must be positive".into());
                }
                if !(f.max_utilization > 0.0 && f.max_utilization <= 1.0) {
                    return bad(format!("fpga.max_utilization must be in (0, 1], got {}", f.max_utilization));
                }
                for p in &supported {
                    if f.dsp_per_mac.get(*p).is_none_or(|x| !nonneg(x))
                        || f.lut_per_mac.get(*p).is_none_or(|x| !nonneg(x))
                    {
                        return bad(format!("fpga.dsp_per_mac.{p} and fpga.lut_per_mac.{p} are needed"));
                    }
                }
            }
            (None, false) => {}
        }
        let p = &self.power;
        if !nonneg(p.static_w) || !nonneg(p.pj_per_sram_byte) || !nonneg(p.pj_per_dram_byte) {
            return bad("power figures must be non-negative".into());
        }
        if let Some(pr) = &self.price {
            if !pos(pr.usd) {
                return bad(format!("price.usd must be positive, got {}", pr.usd));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_parses_and_names_its_source() {
        let all = builtins().unwrap();
        assert_eq!(all.len(), BUILTINS.len());
        for (t, (n, _)) in all.iter().zip(BUILTINS) {
            assert_eq!(&t.name, n, "file name and name field agree");
            assert!(t.source.len() > 20, "{n}: source too short");
        }
    }

    #[test]
    fn tpu_v1_matches_the_paper() {
        // Jouppi et al., ISCA 2017: 256x256 int8 MACs at 700 MHz = 92 TOPS, 34 GB/s DDR3.
        let t = load_target("tpu-v1").unwrap();
        let tops = 2.0 * t.peak_macs(Precision::Int8).unwrap() / 1e12;
        assert!((tops - 91.75).abs() < 0.1, "{tops}");
        assert_eq!(t.dram.bandwidth_gbs, 34.0);
        assert_eq!(t.array.dataflows, vec![Dataflow::Ws]);
    }

    #[test]
    fn bad_descriptions_give_clear_errors() {
        let good = BUILTINS.iter().find(|b| b.0 == "edge-npu").unwrap().1;
        let typo = good.replace("clock_mhz", "clock_mhzz");
        let e = parse_target("x", &typo).unwrap_err().to_string();
        assert!(e.contains("clock_mhzz") || e.contains("unknown field"), "{e}");
        let zero = good.replace("rows = 64", "rows = 0");
        assert!(parse_target("x", &zero).unwrap_err().to_string().contains("at least 1x1"));
        assert!(parse_target("x", "not toml [").is_err());
        let e = load_target("no-such-chip").unwrap_err().to_string();
        assert!(e.contains("tpu-v1"), "lists the built-ins: {e}");
        assert!(matches!(load_target("/nonexistent/x.toml"), Err(HwError::Io { .. })));
    }

    #[test]
    fn user_files_load_by_path() {
        let dir = std::env::temp_dir().join(format!("kiln-hw-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("mine.toml");
        let text = BUILTINS.iter().find(|b| b.0 == "edge-npu").unwrap().1.replace("\"edge-npu\"", "\"mine\"");
        std::fs::write(&p, text).unwrap();
        let t = load_target(p.to_str().unwrap()).unwrap();
        assert_eq!(t.name, "mine");
        // An FPGA kind without its budgets is refused with the reason.
        std::fs::write(&p, std::fs::read_to_string(&p).unwrap().replace("asic-npu", "systolic-fpga")).unwrap();
        let e = load_target(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("[fpga]"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn probe_fills_cpu_peaks() {
        let mut t = load_target("cpu-dev").unwrap();
        t.apply_probe(200.0, 20.0).unwrap();
        let gflops = 2.0 * t.peak_macs(Precision::F32).unwrap() / 1e9;
        assert!((gflops - 200.0).abs() < 1e-6);
        assert_eq!(t.dram.bandwidth_gbs, 20.0);
        assert!(t.apply_probe(0.0, 1.0).is_err());
    }
}
