//! Parallel corpora (one sentence a line, aligned by line number, optionally gzipped) turned
//! into decoder-only training text ("German: … English: …" lines) and into task files for
//! `kiln eval task` (the prompt up to the target's name, the target as the reference).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::Serialize;

use crate::atomic::write_atomic;
use crate::DataError;

/// Reads every line of a text file; `.gz` files are decompressed on the fly.
pub fn read_lines(path: &Path) -> Result<Vec<String>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io("open", path, e))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|x| x == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    BufReader::new(reader)
        .lines()
        .map(|l| l.map(|s| s.trim_end_matches('\r').to_string()).map_err(|e| DataError::io("read", path, e)))
        .collect()
}

/// How a pair is written: `{src_name}: {src} {tgt_name}: {tgt}`.
#[derive(Clone, Debug)]
pub struct PairFormat {
    pub src_name: String,
    pub tgt_name: String,
}

impl PairFormat {
    /// The prompt a model continues with the translation.
    pub fn prompt(&self, src: &str) -> String {
        format!("{}: {} {}:", self.src_name, src.trim(), self.tgt_name)
    }
    pub fn line(&self, src: &str, tgt: &str) -> String {
        format!("{} {}", self.prompt(src), tgt.trim())
    }
}

#[derive(Serialize)]
struct TaskLine<'a> {
    prompt: String,
    references: [&'a str; 1],
}

fn check_aligned(src: &[String], tgt: &[String]) -> Result<(), DataError> {
    if src.len() != tgt.len() {
        return Err(DataError::InvalidArgument(format!(
            "the source has {} lines and the target {}: the files are not aligned",
            src.len(),
            tgt.len()
        )));
    }
    if src.is_empty() {
        return Err(DataError::EmptyCorpus("no sentence pairs".into()));
    }
    Ok(())
}

/// Writes one formatted pair per line (training text).
pub fn write_pairs_text(src: &[String], tgt: &[String], fmt: &PairFormat, out: &Path) -> Result<usize, DataError> {
    check_aligned(src, tgt)?;
    let mut text = String::new();
    for (s, t) in src.iter().zip(tgt) {
        text.push_str(&fmt.line(s, t));
        text.push('\n');
    }
    write_atomic(out, text.as_bytes())?;
    Ok(src.len())
}

/// Writes a task JSONL file: `{"prompt": "German: … English:", "references": ["…"]}` per pair.
pub fn write_pairs_task(src: &[String], tgt: &[String], fmt: &PairFormat, out: &Path) -> Result<usize, DataError> {
    check_aligned(src, tgt)?;
    let mut text = String::new();
    for (s, t) in src.iter().zip(tgt) {
        let line = TaskLine { prompt: fmt.prompt(s), references: [t.trim()] };
        text.push_str(&serde_json::to_string(&line).expect("task line serialises"));
        text.push('\n');
    }
    write_atomic(out, text.as_bytes())?;
    Ok(src.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gz_lines_pairs_and_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("de.gz");
        let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all("Ein Hund.\r\nZwei Katzen.\n".as_bytes()).unwrap();
        enc.finish().unwrap();
        let de = read_lines(&gz).unwrap();
        assert_eq!(de, vec!["Ein Hund.", "Zwei Katzen."]);
        let en = vec!["A dog.".to_string(), "Two cats.".to_string()];
        let fmt = PairFormat { src_name: "German".into(), tgt_name: "English".into() };
        let txt = dir.path().join("train.txt");
        write_pairs_text(&de, &en, &fmt, &txt).unwrap();
        assert_eq!(
            std::fs::read_to_string(&txt).unwrap(),
            "German: Ein Hund. English: A dog.\nGerman: Zwei Katzen. English: Two cats.\n"
        );
        let task = dir.path().join("test.jsonl");
        write_pairs_task(&de, &en, &fmt, &task).unwrap();
        let first: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&task).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!(first["prompt"], "German: Ein Hund. English:");
        assert_eq!(first["references"][0], "A dog.");
        assert!(write_pairs_text(&de, &en[..1], &fmt, &txt).is_err());
    }
}
