//! Rendering estimates: terminal table, Markdown, HTML (inline SVG chart), JSON.

use std::fmt::Write;

use crate::perf::{Estimate, OpCost};

/// What the model was checked against, printed with every report.
pub const VALIDATION: &str = "systolic GEMM cycle counts agree with SCALE-Sim 3.0.0 within 0.3% over 96 GEMMs \
     (3 dataflows x 4 arrays, tools/hw/scalesim_compare.py); cpu-dev predicts kiln's measured prefill / decode \
     within 7-29% (decode calibrated); energies and prices are estimates (docs/HARDWARE.md)";

/// A number with three significant figures and thousands separators.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let a = x.abs();
    let s = if a >= 100.0 {
        format!("{:.0}", x)
    } else if a >= 10.0 {
        format!("{:.1}", x)
    } else if a >= 1.0 {
        format!("{:.2}", x)
    } else if a == 0.0 {
        "0".into()
    } else {
        format!("{:.3}", x)
    };
    // Group the integer part in threes.
    let (int, frac) = s.split_once('.').map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// An integer with thousands separators.
pub fn int(x: u64) -> String {
    num(x as f64).split('.').next().unwrap_or("").to_string()
}

/// Joules in the unit a reader expects (mJ / µJ for small values).
pub fn joules(j: f64) -> String {
    if j >= 1.0 {
        format!("{} J", num(j))
    } else if j >= 1e-3 {
        format!("{} mJ", num(j * 1e3))
    } else {
        format!("{} µJ", num(j * 1e6))
    }
}

fn cost(e: &Estimate) -> String {
    e.cost_per_million_tokens_usd.map_or("n/a (no price)".into(), |c| format!("${}", num(c)))
}

fn fits(e: &Estimate) -> &'static str {
    if e.fits {
        "yes"
    } else {
        "NO"
    }
}

/// The GEMMs and vector ops of one block and the head (every block is the same shape).
fn sample_ops(ops: &[OpCost]) -> impl Iterator<Item = &OpCost> {
    ops.iter().filter(|o| o.layer == "block 0" || o.layer == "head")
}

/// A plain-text report of one estimate for the terminal.
pub fn render_table(e: &Estimate) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "kiln map: {} on {} ({}), {}", e.model, e.target, e.kind, e.precision);
    let _ = writeln!(s, "  batch {}, prompt {}, generate {}", e.batch, e.prompt_len, e.gen);
    let _ = writeln!(s, "  source: {}", e.source);
    let _ = writeln!(s);
    let rows = [
        ("prefill tokens/s", num(e.prefill_tokens_per_s)),
        ("decode tokens/s", num(e.decode_tokens_per_s)),
        ("time to first token", format!("{} ms", num(e.ttft_ms))),
        ("decode step", format!("{} ms", num(e.decode_step_ms))),
        ("request latency", format!("{} ms", num(e.latency_ms))),
        (
            "array utilisation",
            format!("prefill {:.1}%, decode {:.2}%", e.prefill_utilization * 100.0, e.decode_utilization * 100.0),
        ),
        (
            "energy per token",
            format!("{} decode, {} prefill", joules(e.energy_per_token_j), joules(e.prefill_energy_per_token_j)),
        ),
        ("decode power", format!("{} W", num(e.decode_power_w))),
        ("cost per 1M tokens", cost(e)),
        ("weights / KV cache", format!("{} MB / {} MB", num(e.weight_bytes / 1e6), num(e.kv_cache_bytes / 1e6))),
        ("fits", fits(e).to_string()),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "  {k:<22} {v}");
    }
    for i in &e.fit_issues {
        let _ = writeln!(s, "    does not fit: {i}");
    }
    for a in &e.advice {
        let _ = writeln!(s, "    change: {a}");
    }
    if let Some(r) = &e.resources {
        let _ = writeln!(
            s,
            "  FPGA {}: DSP {}/{}, LUT {}/{}, BRAM36 {}/{}, URAM {}/{} (usable {:.0}%)",
            r.device,
            num(r.dsp),
            r.dsp_budget,
            num(r.lut),
            r.lut_budget,
            num(r.bram36),
            r.bram36_budget,
            num(r.uram),
            r.uram_budget,
            r.max_utilization * 100.0
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  {:<10} {:>12} {:>12} {:>12} {:>12} {:>9}",
        "layer", "prefill ms", "decode ms", "prefill MB", "decode MB", "decode"
    );
    for l in &e.layers {
        let _ = writeln!(
            s,
            "  {:<10} {:>12} {:>12} {:>12} {:>12} {:>9}",
            l.layer,
            num(l.prefill_ms),
            num(l.decode_ms),
            num(l.prefill_dram_mb),
            num(l.decode_dram_mb),
            format!("{:?}", l.decode_bound).to_lowercase()
        );
    }
    for (title, ph) in [("prefill", &e.prefill), ("decode step", &e.decode)] {
        let _ = writeln!(s);
        let _ = writeln!(s, "  {title} mapping (block 0 and head; every block is the same):");
        let _ = writeln!(
            s,
            "  {:<26} {:>20} {:>6} {:>8} {:>10} {:>7} {:>8}",
            "op", "shape", "flow", "folds", "µs", "util", "bound"
        );
        for o in sample_ops(&ph.ops) {
            let _ = writeln!(
                s,
                "  {:<26} {:>20} {:>6} {:>8} {:>10} {:>7} {:>8}",
                o.name,
                o.shape,
                o.dataflow,
                if o.folds > 0 { int(o.folds) } else { "-".into() },
                num(o.time_s * 1e6),
                if o.macs > 0.0 { format!("{:.1}%", o.utilization * 100.0) } else { "-".into() },
                format!("{:?}", o.bound).to_lowercase()
            );
            if !o.alternatives_us.is_empty() {
                let alts: Vec<String> = o.alternatives_us.iter().map(|(d, t)| format!("{d} {} µs", num(*t))).collect();
                let _ = writeln!(s, "  {:<26} tried: {}", "", alts.join(", "));
            }
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "  assumptions:");
    for a in &e.assumptions {
        let _ = writeln!(s, "  - {a}");
    }
    let _ = writeln!(s, "  checked: {VALIDATION}");
    s
}

/// Targets side by side.
pub fn render_compare(es: &[Estimate]) -> String {
    let mut s = String::new();
    if let Some(e) = es.first() {
        let _ = writeln!(
            s,
            "kiln map --compare: {} (batch {}, prompt {}, generate {})",
            e.model, e.batch, e.prompt_len, e.gen
        );
    }
    let _ = writeln!(
        s,
        "{:<18} {:>5} {:>12} {:>12} {:>12} {:>12} {:>12} {:>14} {:>5}",
        "target", "prec", "latency ms", "prefill t/s", "decode t/s", "J/token", "W decode", "$/1M tokens", "fits"
    );
    for e in es {
        let _ = writeln!(
            s,
            "{:<18} {:>5} {:>12} {:>12} {:>12} {:>12} {:>12} {:>14} {:>5}",
            e.target,
            e.precision.name(),
            num(e.latency_ms),
            num(e.prefill_tokens_per_s),
            num(e.decode_tokens_per_s),
            format!("{:.2e}", e.energy_per_token_j),
            num(e.decode_power_w),
            e.cost_per_million_tokens_usd.map_or("n/a".into(), |c| format!("{:.4}", c)),
            fits(e)
        );
    }
    for e in es.iter().filter(|e| !e.fits) {
        let _ = writeln!(s, "{}: does not fit: {}", e.target, e.fit_issues.join("; "));
    }
    let _ = writeln!(s, "Checked: {VALIDATION}.");
    let _ = writeln!(s, "Each target's assumptions: kiln map --target NAME (or --report FILE.html).");
    s
}

fn md_escape(x: &str) -> String {
    x.replace('|', "\\|")
}

/// One Markdown document for one or more estimates.
pub fn render_markdown(es: &[Estimate]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# kiln map\n");
    if es.len() > 1 {
        let _ = writeln!(s, "| target | precision | latency ms | prefill tokens/s | decode tokens/s | energy / token | $ / 1M tokens | fits |");
        let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |");
        for e in es {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                e.target,
                e.precision,
                num(e.latency_ms),
                num(e.prefill_tokens_per_s),
                num(e.decode_tokens_per_s),
                joules(e.energy_per_token_j),
                e.cost_per_million_tokens_usd.map_or("n/a".into(), |c| format!("{:.4}", c)),
                fits(e)
            );
        }
        let _ = writeln!(s);
    }
    for e in es {
        let _ = writeln!(s, "## {} on {} ({})\n", e.model, e.target, e.precision);
        let _ = writeln!(s, "Source: {}\n", md_escape(&e.source));
        let _ = writeln!(s, "```\n{}```\n", render_table(e));
    }
    s
}

fn html_escape(x: &str) -> String {
    x.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Horizontal bars of per-layer prefill and decode latency, as inline SVG.
pub fn layer_chart_svg(e: &Estimate) -> String {
    let (bar, gap, label_w, width) = (12.0, 6.0, 90.0, 640.0);
    let max = e.layers.iter().map(|l| l.prefill_ms.max(l.decode_ms)).fold(0.0f64, f64::max).max(1e-12);
    let height = e.layers.len() as f64 * (2.0 * bar + gap) + 40.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let scale = (width - label_w - 90.0) / max;
    for (i, l) in e.layers.iter().enumerate() {
        let y = 20.0 + i as f64 * (2.0 * bar + gap);
        let _ = write!(s, "<text x=\"0\" y=\"{:.1}\">{}</text>", y + bar + 3.0, html_escape(&l.layer));
        for (j, (v, color)) in [(l.prefill_ms, "#4c78a8"), (l.decode_ms, "#f58518")].into_iter().enumerate() {
            let yy = y + j as f64 * bar;
            let w = (v * scale).max(0.5);
            let _ = write!(
                s,
                "<rect x=\"{label_w}\" y=\"{yy:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\">{} ms</text>",
                bar - 1.0,
                label_w + w + 4.0,
                yy + bar - 2.0,
                num(v)
            );
        }
    }
    let _ = write!(
        s,
        "<rect x=\"{label_w}\" y=\"2\" width=\"10\" height=\"10\" fill=\"#4c78a8\"/><text x=\"{:.0}\" y=\"11\">prefill</text>\
         <rect x=\"{:.0}\" y=\"2\" width=\"10\" height=\"10\" fill=\"#f58518\"/><text x=\"{:.0}\" y=\"11\">decode step</text></svg>",
        label_w + 14.0,
        label_w + 70.0,
        label_w + 84.0
    );
    s
}

/// A self-contained HTML page: comparison, per-target summary, chart, mapping and assumptions.
pub fn render_html(es: &[Estimate], title: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}\
         td.n{{text-align:right}}.no{{color:#b00;font-weight:bold}}li{{font-size:13px}}</style></head><body><h1>{t}</h1>",
        t = html_escape(title)
    );
    let _ = write!(
        s,
        "<table><tr><th>target</th><th>precision</th><th>latency ms</th><th>prefill tokens/s</th><th>decode tokens/s</th>\
         <th>energy / token</th><th>$ / 1M tokens</th><th>fits</th></tr>"
    );
    for e in es {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td{}>{}</td></tr>",
            html_escape(&e.target),
            e.precision,
            num(e.latency_ms),
            num(e.prefill_tokens_per_s),
            num(e.decode_tokens_per_s),
            joules(e.energy_per_token_j),
            e.cost_per_million_tokens_usd.map_or("n/a".into(), |c| format!("{:.4}", c)),
            if e.fits { "" } else { " class=no" },
            fits(e)
        );
    }
    let _ = write!(s, "</table><p>Checked: {}.</p>", html_escape(VALIDATION));
    for e in es {
        let _ = write!(
            s,
            "<h2>{} on {} ({}, {})</h2><p>batch {}, prompt {}, generate {}. Source: {}</p>",
            html_escape(&e.model),
            html_escape(&e.target),
            e.kind,
            e.precision,
            e.batch,
            e.prompt_len,
            e.gen,
            html_escape(&e.source)
        );
        if !e.fits {
            let _ = write!(s, "<p class=no>Does not fit: {}</p><ul>", html_escape(&e.fit_issues.join("; ")));
            for a in &e.advice {
                let _ = write!(s, "<li>{}</li>", html_escape(a));
            }
            let _ = write!(s, "</ul>");
        }
        let _ = write!(s, "<h3>Per-layer latency</h3>{}", layer_chart_svg(e));
        let _ = write!(s, "<h3>Mapping</h3><pre>{}</pre>", html_escape(&render_table(e)));
        let _ = write!(s, "<h3>Assumptions</h3><ul>");
        for a in &e.assumptions {
            let _ = write!(s, "<li>{}</li>", html_escape(a));
        }
        let _ = write!(s, "</ul>");
    }
    let _ = writeln!(s, "</body></html>");
    s
}

/// JSON: one object for one estimate, `{"targets": [...]}` for several.
pub fn to_json(es: &[Estimate]) -> serde_json::Value {
    if es.len() == 1 {
        serde_json::to_value(&es[0]).unwrap_or(serde_json::Value::Null)
    } else {
        serde_json::json!({ "targets": es })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Estimate> {
        let s = crate::ModelShape::preset("gpt-tiny").unwrap();
        let w = crate::Workload { batch: 1, prompt_len: 16, gen: 8, logits_all_positions: false };
        ["tpu-v1", "u250-dataflow"]
            .iter()
            .map(|n| {
                let t = crate::load_target(n).unwrap();
                crate::estimate(&t, &s, t.default_precision, w).unwrap()
            })
            .collect()
    }

    #[test]
    fn json_has_the_promised_fields() {
        let es = sample();
        let one = to_json(&es[..1]);
        for k in ["prefill_tokens_per_s", "decode_tokens_per_s", "latency_ms", "energy_per_token_j", "fits", "layers"] {
            assert!(one.get(k).is_some(), "missing {k}");
        }
        assert_eq!(one["layers"].as_array().unwrap().len(), 2 + 2); // embed, 2 blocks, head
        assert!(one["assumptions"].as_array().unwrap().len() > 3);
        assert_eq!(to_json(&es)["targets"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn html_and_markdown_carry_chart_and_assumptions() {
        let es = sample();
        let html = render_html(&es, "t <x>");
        assert!(html.contains("<svg") && html.contains("Assumptions") && html.contains("t &lt;x&gt;"));
        assert!(html.contains(&html_escape(&es[0].assumptions[0])));
        assert_eq!(html.matches("<svg").count(), 2);
        let md = render_markdown(&es);
        assert!(md.contains("| tpu-v1 |") && md.contains("assumptions:"));
        let cmp = render_compare(&es);
        assert!(cmp.contains("u250-dataflow") && cmp.contains("tpu-v1"));
        assert!(
            render_table(&es[0]).contains("tried:") || es[0].decode.ops.iter().all(|o| o.alternatives_us.is_empty())
        );
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(num(1234567.0), "1,234,567");
        assert_eq!(num(-1234.4), "-1,234");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(0.01234), "0.012");
        assert_eq!(num(f64::INFINITY), "n/a");
        assert_eq!(joules(0.002), "2.00 mJ");
        assert_eq!(int(10), "10");
        assert_eq!(int(1_234_567), "1,234,567");
    }
}
