//! Writes a synthetic metrics JSONL and plots it: `cargo run -p kiln-eval --example loss_plot -- OUT_DIR`.

use std::fmt::Write as _;
use std::path::PathBuf;

use kiln_eval::{read_metrics, write_png, write_svg, LossCurves};

fn synthetic(path: &std::path::Path, scale: f64, steps: u32) -> std::io::Result<()> {
    let mut s = String::new();
    for step in 0..=steps {
        let t = step as f64;
        let noise = ((t * 12.9898).sin() * 43758.5453).fract() * 0.08;
        let loss = 2.1 * scale + 8.7 * (-t / 25.0).exp() + 1.2 * (-t / 400.0).exp() + noise;
        let _ = write!(s, r#"{{"step":{step},"loss":{loss:.4},"lr":0.0003,"tokens_per_s":12345.0"#);
        if step % 100 == 0 && step > 0 {
            let _ = write!(s, r#","val_loss":{:.4}"#, loss + 0.15 - noise);
        }
        s.push_str("}\n");
    }
    std::fs::write(path, s)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| ".".into()));
    std::fs::create_dir_all(&out)?;
    let mut series = Vec::new();
    for (name, scale) in [("gpt2-small", 1.0), ("gpt2-tiny", 1.25)] {
        let path = out.join(format!("{name}.jsonl"));
        synthetic(&path, scale, 2000)?;
        series.extend(read_metrics(&path, name)?);
    }
    let curves = LossCurves { title: "Training loss — synthetic runs".into(), series };
    write_png(&curves, &out.join("loss.png"))?;
    write_svg(&curves, &out.join("loss.svg"))?;
    // A short, train-only run: integer x ticks, few points, no clipping note.
    let short = out.join("short.jsonl");
    synthetic(&short, 1.0, 12)?;
    let curves = LossCurves { title: "short run".into(), series: read_metrics(&short, "short")? };
    write_png(&curves, &out.join("short.png"))?;
    println!("wrote {} and short.png", out.join("loss.png").display());
    Ok(())
}
