//! `kiln report`: one self-contained HTML page (inline SVG, no scripts, no network) with the
//! loss curves, the model and its training setup, and whatever measurements the user hands in:
//! perplexity, task scores, training speed and memory. Sections for quantization, pruning and
//! hardware mapping appear when the checkpoint's kiln.json records them.

use std::path::Path;

use serde_json::Value;

use crate::{read_metrics, render_svg, EvalError, LossCurves};

/// What goes on the page.
pub struct ReportInputs<'a> {
    pub title: String,
    /// The checkpoint's config.json and kiln.json, when there is a checkpoint.
    pub config: Option<Value>,
    pub kiln: Option<Value>,
    /// Metrics JSONL files with a label each.
    pub metrics: Vec<(String, &'a Path)>,
    /// JSON outputs of `kiln eval ppl|task --json` and `kiln bench train --json`, recognised by their keys.
    pub measurements: Vec<(String, Value)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(|x| x.as_f64())
}

/// A setting's value as a person writes it: strings unquoted, f32-sized floats shortest.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => esc(s),
        Value::Number(n) if n.is_f64() => format!("{}", n.as_f64().unwrap_or(f64::NAN) as f32),
        other => esc(&other.to_string()),
    }
}

fn row(cells: &[String]) -> String {
    format!("<tr>{}</tr>", cells.iter().map(|c| format!("<td>{c}</td>")).collect::<String>())
}

fn table(head: &[&str], rows: &[String]) -> String {
    let h: String = head.iter().map(|c| format!("<th>{}</th>", esc(c))).collect();
    format!("<table><thead><tr>{h}</tr></thead><tbody>{}</tbody></table>", rows.join(""))
}

/// Renders the page.
pub fn render_report(inp: &ReportInputs) -> Result<String, EvalError> {
    let mut body = String::new();
    // Model and training setup.
    if let Some(cfg) = &inp.config {
        let keys = ["model_type", "n_layer", "n_head", "n_embd", "n_positions", "vocab_size"];
        let rows: Vec<String> = keys.iter().filter_map(|k| cfg.get(*k).map(|v| row(&[esc(k), show(v)]))).collect();
        body.push_str(&format!("<section><h2>Model</h2>{}</section>", table(&["setting", "value"], &rows)));
    }
    if let Some(tc) = inp.kiln.as_ref().and_then(|k| k.get("train_config")) {
        let keys = [
            "preset",
            "steps",
            "batch",
            "seq",
            "grad_accum",
            "lr",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "seed",
        ];
        let rows: Vec<String> = keys.iter().filter_map(|k| tc.get(*k).map(|v| row(&[esc(k), show(v)]))).collect();
        let step = inp.kiln.as_ref().and_then(|k| k.get("step")).map(|s| s.to_string()).unwrap_or_default();
        body.push_str(&format!(
            "<section><h2>Training setup</h2><p>Checkpoint at step {}.</p>{}</section>",
            esc(&step),
            table(&["setting", "value"], &rows)
        ));
    }
    // Loss curves and a summary per run.
    if !inp.metrics.is_empty() {
        let mut series = Vec::new();
        let mut rows = Vec::new();
        for (label, path) in &inp.metrics {
            let s = read_metrics(path, label)?;
            let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io {
                action: "cannot read metrics file",
                path: path.to_path_buf(),
                source: e,
            })?;
            let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            let last = lines.last().cloned().unwrap_or(Value::Null);
            let best_val = lines.iter().filter_map(|l| num(l, "val_loss")).fold(f64::INFINITY, f64::min);
            let tps: Vec<f64> = lines.iter().filter_map(|l| num(l, "tokens_per_s")).collect();
            let mean_tps = tps.iter().sum::<f64>() / tps.len().max(1) as f64;
            rows.push(row(&[
                esc(label),
                format!("{}", num(&last, "step").unwrap_or(0.0)),
                format!("{:.4}", num(&last, "loss").unwrap_or(f64::NAN)),
                if best_val.is_finite() { format!("{best_val:.4}") } else { "–".into() },
                format!("{mean_tps:.0}"),
            ]));
            series.extend(s);
        }
        let svg = render_svg(&LossCurves { title: "Training loss".into(), series });
        body.push_str(&format!(
            "<section><h2>Loss curves</h2><div class=\"plot\">{svg}</div>{}</section>",
            table(&["run", "steps", "final train loss", "best val loss", "mean tokens/s"], &rows)
        ));
    }
    // Measurements, recognised by their keys.
    for (label, v) in &inp.measurements {
        if num(v, "ppl").is_some() {
            let rows = vec![row(&[
                esc(label),
                format!("{:.4}", num(v, "ppl").unwrap_or(f64::NAN)),
                format!("{:.4}", num(v, "nll").unwrap_or(f64::NAN)),
                format!("{:.4}", num(v, "bpb").unwrap_or(f64::NAN)),
                format!("{}", num(v, "tokens").unwrap_or(0.0)),
                format!("{} / {}", num(v, "ctx").unwrap_or(0.0), num(v, "stride").unwrap_or(0.0)),
            ])];
            body.push_str(&format!(
                "<section><h2>Perplexity</h2>{}<p class=\"note\">Strided sliding window: every token after the first is scored once, with up to ctx tokens of context.</p></section>",
                table(&["data", "perplexity", "nats/token", "bits/byte", "tokens", "window / stride"], &rows)
            ));
        } else if v.get("bleu").is_some() {
            let r = &v["rouge"];
            let rows = vec![row(&[
                esc(label),
                format!("{:.2}", v["bleu"]["score"].as_f64().unwrap_or(f64::NAN)),
                format!("{:.2}", v["chrf"]["score"].as_f64().unwrap_or(f64::NAN)),
                format!("{:.4}", r["rouge1"]["fmeasure"].as_f64().unwrap_or(f64::NAN)),
                format!("{:.4}", r["rouge2"]["fmeasure"].as_f64().unwrap_or(f64::NAN)),
                format!("{:.4}", r["rougeL"]["fmeasure"].as_f64().unwrap_or(f64::NAN)),
                format!("{:.1}%", 100.0 * num(v, "exact_match").unwrap_or(0.0)),
                format!("{}", num(v, "examples").unwrap_or(0.0)),
            ])];
            let sig = v["bleu"]["signature"].as_str().unwrap_or("");
            body.push_str(&format!(
                "<section><h2>Task scores</h2>{}<p class=\"note\">BLEU signature: <code>{}</code></p></section>",
                table(
                    &["task", "BLEU", "chrF", "ROUGE-1 F", "ROUGE-2 F", "ROUGE-L F", "exact match", "examples"],
                    &rows
                ),
                esc(sig)
            ));
        } else if num(v, "tokens_per_s").is_some() && num(v, "step_ms").is_some() {
            let rows = vec![row(&[
                esc(label),
                format!("{:.0}", num(v, "tokens_per_s").unwrap_or(f64::NAN)),
                format!("{:.1}", num(v, "step_ms").unwrap_or(f64::NAN)),
                format!("{:.1}", num(v, "gflops").unwrap_or(f64::NAN)),
                format!("{:.0}%", 100.0 * num(v, "peak_fraction").unwrap_or(f64::NAN)),
                format!("{:.0}", num(v, "peak_rss_mb").unwrap_or(f64::NAN)),
            ])];
            body.push_str(&format!(
                "<section><h2>Speed and memory</h2>{}</section>",
                table(&["benchmark", "tokens/s", "ms/step", "GFLOP/s", "of f32 peak", "peak RSS MB"], &rows)
            ));
        } else {
            return Err(EvalError::MetricInput(format!(
                "{label}: not a kiln eval ppl / eval task / bench train JSON (no ppl, bleu or tokens_per_s key)"
            )));
        }
    }
    for key in ["quantization", "pruning", "mapping"] {
        if let Some(v) = inp.kiln.as_ref().and_then(|k| k.get(key)).filter(|v| !v.is_null()) {
            body.push_str(&format!(
                "<section><h2>{}</h2><pre>{}</pre></section>",
                esc(&key[..1].to_uppercase()) + &key[1..],
                esc(&serde_json::to_string_pretty(v).unwrap_or_default())
            ));
        }
    }
    Ok(format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: "DejaVu Sans", Verdana, Arial, sans-serif; max-width: 980px; margin: 2em auto; color: #222; }}
h1 {{ font-size: 1.6em; border-bottom: 2px solid #1f77b4; padding-bottom: .3em; }}
h2 {{ font-size: 1.2em; margin-top: 1.6em; color: #1f4e79; }}
table {{ border-collapse: collapse; margin: .6em 0; }}
td, th {{ border: 1px solid #ccc; padding: .3em .7em; text-align: left; }}
th {{ background: #f0f4f8; }}
.plot svg {{ max-width: 100%; height: auto; }}
.note {{ color: #666; font-size: .9em; }}
footer {{ margin-top: 2em; color: #888; font-size: .85em; }}
</style></head>
<body><h1>{title}</h1>{body}
<footer>Generated by kiln {version}.</footer></body></html>
"#,
        title = esc(&inp.title),
        version = env!("CARGO_PKG_VERSION"),
    ))
}
