use std::path::Path;

use kiln_eval::{read_metrics, render_svg, write_png, write_svg, EvalError, LossCurves, Series};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const METRICS: &str = r#"{"step":1,"loss":10.5,"lr":0.0001,"tokens_per_s":1000.0}
{"step":2,"loss":7.25,"lr":0.0002,"tokens_per_s":1100.0}

{"event":"checkpoint","path":"ckpt/2"}
{"step":3,"loss":5.0,"lr":0.0003,"tokens_per_s":1200.0,"val_loss":5.5}
{"step":4,"loss":4.0,"lr":0.0003,"tokens_per_s":1200.0,"val_loss":null}
{"step":6,"loss":3.5,"lr":0.0003,"tokens_per_s":1200.0,"val_loss":4.25}
"#;

fn sample_curves() -> LossCurves {
    let train = Series {
        label: "run-a train".into(),
        points: (0..500).map(|s| (s as f64, 2.0 + 9.0 * (-(s as f64) / 20.0).exp())).collect(),
    };
    let val = Series {
        label: "run-a val".into(),
        points: (1..=5).map(|k| (k as f64 * 100.0, 2.3 - 0.02 * k as f64)).collect(),
    };
    LossCurves { title: "loss <&> test".into(), series: vec![train, val] }
}

#[test]
fn reads_train_and_val_series() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.jsonl", METRICS);
    let series = read_metrics(&path, "gpt2").unwrap();
    assert_eq!(series.len(), 2);
    assert_eq!(series[0].label, "gpt2 train");
    assert_eq!(series[0].points, vec![(1.0, 10.5), (2.0, 7.25), (3.0, 5.0), (4.0, 4.0), (6.0, 3.5)]);
    assert_eq!(series[1].label, "gpt2 val");
    assert_eq!(series[1].points, vec![(3.0, 5.5), (6.0, 4.25)]);
}

#[test]
fn train_only_file_gives_one_series_and_resumed_steps_keep_last() {
    let dir = tempfile::tempdir().unwrap();
    let text = "{\"step\":2,\"loss\":3.0}\n{\"step\":1,\"loss\":4.0}\n{\"step\":2,\"loss\":2.5}\n";
    let path = write(dir.path(), "m.jsonl", text);
    let series = read_metrics(&path, "r").unwrap();
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].points, vec![(1.0, 4.0), (2.0, 2.5)]);
}

#[test]
fn bad_line_error_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.9}\n{\"step\":3,\"loss\":\n";
    let path = write(dir.path(), "bad.jsonl", text);
    let err = read_metrics(&path, "r").unwrap_err();
    assert!(matches!(err, EvalError::MetricsLine { line: 3, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("line 3"), "{msg}");
    assert!(msg.contains("bad.jsonl"), "{msg}");

    let path = write(dir.path(), "bad2.jsonl", "{\"step\":1,\"loss\":\"high\"}\n");
    let msg = read_metrics(&path, "r").unwrap_err().to_string();
    assert!(msg.contains("line 1") && msg.contains("loss"), "{msg}");

    let path = write(dir.path(), "bad3.jsonl", "[1, 2]\n");
    let msg = read_metrics(&path, "r").unwrap_err().to_string();
    assert!(msg.contains("line 1") && msg.contains("object"), "{msg}");
}

#[test]
fn missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.jsonl");
    let err = read_metrics(&path, "r").unwrap_err();
    assert!(matches!(err, EvalError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.jsonl"), "{err}");
}

#[test]
fn file_without_loss_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "noloss.jsonl", "{\"step\":1,\"lr\":0.1}\n{\"event\":\"start\"}\n");
    let err = read_metrics(&path, "r").unwrap_err();
    assert!(matches!(err, EvalError::NoLoss { .. }), "{err:?}");
    assert!(err.to_string().contains("no loss values"), "{err}");
    let empty = write(dir.path(), "empty.jsonl", "");
    assert!(matches!(read_metrics(&empty, "r"), Err(EvalError::NoLoss { .. })));
}

/// Checks that every element opened is closed, in order (a small well-formedness check).
fn assert_balanced(svg: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').expect("unterminated tag");
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "mismatched </{name}>");
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().unwrap().to_string();
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
}

#[test]
fn svg_is_standalone_and_well_formed() {
    let svg = render_svg(&sample_curves());
    assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains(r#"width="900""#) && svg.contains(r#"height="540""#));
    assert!(svg.contains("run-a train"));
    assert!(svg.contains("run-a val"));
    assert!(svg.contains(">step</text>") && svg.contains(">loss</text>"));
    assert!(svg.contains("loss &lt;&amp;&gt; test"), "title is escaped");
    assert!(!svg.contains("<&>"));
    assert!(svg.contains("<circle"), "val series has markers");
    assert_balanced(&svg);

    // Degenerate inputs still give a valid document.
    for curves in [
        LossCurves { title: String::new(), series: vec![] },
        LossCurves { title: "one".into(), series: vec![Series { label: "x".into(), points: vec![(5.0, 1.0)] }] },
        LossCurves {
            title: "nan".into(),
            series: vec![Series { label: "x".into(), points: vec![(0.0, f64::NAN), (1.0, 2.0), (2.0, 2.0)] }],
        },
    ] {
        let svg = render_svg(&curves);
        assert!(svg.starts_with("<svg"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert_balanced(&svg);
    }
}

#[test]
fn write_svg_writes_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.svg");
    write_svg(&sample_curves(), &path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, render_svg(&sample_curves()));
    // Only the final file is left behind (written via a temp file and a rename).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn png_has_magic_and_dimensions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.png");
    write_png(&sample_curves(), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (900, 540));
    assert!(bytes.len() > 10_000, "an image with content, not blank");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn write_into_missing_folder_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/loss.png");
    let err = write_png(&sample_curves(), &path).unwrap_err();
    assert!(matches!(err, EvalError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}
