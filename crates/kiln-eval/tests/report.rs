//! The report page: sections appear for the inputs given, text is escaped, bad inputs are errors.

use kiln_eval::{render_report, ReportInputs};
use serde_json::json;

#[test]
fn report_has_a_section_per_input_and_escapes_text() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("metrics.jsonl");
    std::fs::write(&m, "{\"step\":1,\"loss\":5.0,\"lr\":0.001,\"tokens_per_s\":100}\n{\"step\":2,\"loss\":4.0,\"lr\":0.001,\"tokens_per_s\":120,\"val_loss\":4.5}\n").unwrap();
    let inputs = ReportInputs {
        title: "runs <a&b>".into(),
        config: Some(json!({"model_type": "gpt2", "n_layer": 2, "vocab_size": 97})),
        kiln: Some(
            json!({"step": 2, "train_config": {"lr": 0.0020000000949949026, "preset": "gpt-tiny"}, "quantization": null}),
        ),
        metrics: vec![("run".into(), m.as_path())],
        measurements: vec![
            ("val".into(), json!({"ppl": 19.04, "nll": 2.94, "bpb": 2.24, "tokens": 100, "ctx": 64, "stride": 32})),
            (
                "bench".into(),
                json!({"tokens_per_s": 1300.0, "step_ms": 1500.0, "gflops": 120.0, "peak_fraction": 0.6, "peak_rss_mb": 560.0}),
            ),
        ],
    };
    let html = render_report(&inputs).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    for needle in [
        "<h2>Model</h2>",
        "<h2>Loss curves</h2>",
        "<svg",
        "<h2>Perplexity</h2>",
        "19.0400",
        "<h2>Speed and memory</h2>",
        "1300",
        "<td>0.002</td>",
        "4.5000",
    ] {
        assert!(html.contains(needle), "missing {needle}");
    }
    assert!(html.contains("runs &lt;a&amp;b&gt;") && !html.contains("<a&b>"));
    assert!(!html.contains("<h2>Quantization</h2>"), "null quantization must not get a section");
    assert!(!html.contains("Task scores"));

    let bad = ReportInputs {
        title: "x".into(),
        config: None,
        kiln: None,
        metrics: vec![],
        measurements: vec![("odd".into(), json!({"foo": 1}))],
    };
    assert!(render_report(&bad).is_err());
}
