//! `kiln map`: map a model onto accelerator descriptions and predict latency, throughput,
//! resources and energy. The model lives in kiln-hw; this file parses flags and prints.

use std::path::PathBuf;

use clap::Args;
use kiln_hw::{report, ModelShape, Precision, Target, Workload};

use crate::usage;

#[derive(Args)]
pub struct MapArgs {
    /// A model preset (gpt-tiny, gpt-s, gpt2-124m, llama-s).
    #[arg(long, conflicts_with = "ckpt")]
    preset: Option<String>,
    /// A checkpoint or run directory: its config.json gives the shape.
    #[arg(long)]
    ckpt: Option<PathBuf>,
    /// A built-in target name or a path to a target .toml (see --list-targets).
    #[arg(long)]
    target: Option<String>,
    /// Targets side by side: a comma-separated list, or `all`.
    #[arg(long, conflicts_with = "target")]
    compare: Option<String>,
    /// List the built-in targets and exit.
    #[arg(long)]
    list_targets: bool,
    /// int4 (w4a8), int8 (w8a8), bf16, fp16 or f32 (default: each target's own).
    #[arg(long)]
    precision: Option<String>,
    #[arg(long, default_value_t = 1)]
    batch: u64,
    #[arg(long, default_value_t = 128)]
    prompt_len: u64,
    #[arg(long, default_value_t = 128)]
    gen: u64,
    /// Prefill computes logits at every prompt position (as kiln's CPU forward does).
    #[arg(long)]
    logits_all_positions: bool,
    /// Use the CPU target's nominal peaks instead of probing this machine (about 2 s).
    #[arg(long)]
    no_probe: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write a report: .html (with a per-layer chart) or .md.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn load(name: &str, probe: bool) -> anyhow::Result<Target> {
    // A target that cannot be found or read is a bad flag: rejected before any work (exit 2).
    let mut t = kiln_hw::load_target(name).map_err(|e| usage(e.to_string()))?;
    if t.probe && probe {
        t.apply_probe(kiln_tensor::probe::f32_peak_gflops(), kiln_tensor::probe::read_bandwidth_gbs())?;
    }
    Ok(t)
}

pub fn run(a: &MapArgs) -> anyhow::Result<()> {
    if a.list_targets {
        for t in kiln_hw::spec::builtins()? {
            let peak: Vec<String> = t
                .array
                .macs_per_cycle
                .supported()
                .iter()
                .map(|p| format!("{p} {:.1} TOPS", 2.0 * t.peak_macs(*p).unwrap_or(0.0) / 1e12))
                .collect();
            println!("{:<18} {:<14} {}", t.name, t.kind.name(), t.description);
            println!("{:<18} {:<14} {}; DRAM {} GB/s", "", "", peak.join(", "), t.dram.bandwidth_gbs);
        }
        return Ok(());
    }
    let shape = match (&a.preset, &a.ckpt) {
        (Some(p), None) => ModelShape::preset(p).map_err(|e| usage(e.to_string()))?,
        (None, Some(given)) => {
            let dir = kiln_model::resolve_model_dir(given);
            let cfg = dir.join("config.json");
            if !cfg.is_file() {
                return Err(usage(format!("{}: no checkpoint here (config.json missing)", dir.display())));
            }
            // Name the model after the directory the user gave (a run directory, not its checkpoint/).
            let name = std::fs::canonicalize(given)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
                .unwrap_or_else(|| "checkpoint".into());
            ModelShape::from_hf_config(&cfg, &name).map_err(|e| usage(e.to_string()))?
        }
        _ => return Err(usage("give --preset NAME or --ckpt DIR (or --list-targets)")),
    };
    let names: Vec<String> = match (&a.target, &a.compare) {
        (Some(t), None) => vec![t.clone()],
        (None, Some(c)) if c == "all" => kiln_hw::spec::builtin_names().iter().map(|s| s.to_string()).collect(),
        (None, Some(c)) => c.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        _ => return Err(usage("give --target T or --compare T1,T2,...|all")),
    };
    if names.is_empty() {
        return Err(usage("--compare names no target"));
    }
    let precision = match &a.precision {
        Some(p) => Some(
            Precision::parse(p).ok_or_else(|| usage(format!("--precision {p}: use int4, int8, bf16, fp16 or f32")))?,
        ),
        None => None,
    };
    let w =
        Workload { batch: a.batch, prompt_len: a.prompt_len, gen: a.gen, logits_all_positions: a.logits_all_positions };
    let mut estimates = Vec::new();
    for n in &names {
        let t = load(n, !a.no_probe)?;
        let p = precision.unwrap_or(t.default_precision);
        if names.len() > 1 && !t.supports(p) {
            // In a comparison, a target without the asked precision runs its own (and says so).
            let mut e = kiln_hw::estimate(&t, &shape, t.default_precision, w).map_err(|e| usage(e.to_string()))?;
            e.assumptions
                .insert(0, format!("{p} was asked for but {} lacks it: ran at {}", t.name, t.default_precision));
            estimates.push(e);
            continue;
        }
        estimates.push(kiln_hw::estimate(&t, &shape, p, w).map_err(|e| usage(e.to_string()))?);
    }
    if let Some(path) = &a.report {
        let text = match path.extension().and_then(|e| e.to_str()) {
            Some("html") | Some("htm") => report::render_html(&estimates, &format!("kiln map: {}", shape.name)),
            Some("md") => report::render_markdown(&estimates),
            _ => return Err(usage(format!("--report {}: use a .html or .md file", path.display()))),
        };
        kiln_model::write_atomic(path, text.as_bytes())?;
        if !a.json {
            eprintln!("wrote {}", path.display());
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report::to_json(&estimates))?);
    } else if estimates.len() == 1 {
        print!("{}", report::render_table(&estimates[0]));
    } else {
        print!("{}", report::render_compare(&estimates));
    }
    Ok(())
}
