//! Text files → `train.bin` / `val.bin` token shards, streamed; and `Dataset` to open them.
//!
//! Files are read in chunks of about `chunk_bytes`, never whole. A chunk ends only at a "safe"
//! line break: a `'\n'` with a non-whitespace character on both sides. There the GPT-2
//! pre-tokenizer regex always makes `"\n"` a token of its own, so no pre-token spans the cut
//! and the shards are exactly those of encoding each file (each split part) in one piece. This
//! holds for byte-level BPE tokenizers like GPT-2's and ours; a tokenizer with a normalizer or a
//! prefix-space rule (SentencePiece style) may tokenize chunk starts differently. A file with no
//! safe break in many MiB (say, every line ending in a space) falls back to cutting at any
//! `'\n'`, which can change a few tokens there.
//!
//! Chunks are encoded in parallel (rayon) and written in file order, so output is deterministic.

use crate::atomic::write_atomic;
use crate::shard::bytes_per_token_for_vocab;
use crate::{DataError, ShardWriter, TokenShard, Tokenizer};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Settings for `prepare`.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareOptions {
    /// Share of the corpus bytes, taken from the end, that goes to `val.bin`; in [0, 1).
    pub val_fraction: f64,
    /// Target chunk size for streaming and parallel encoding.
    pub chunk_bytes: usize,
    /// Append `<|endoftext|>` after each (non-empty) file, GPT-2 style document separation.
    pub append_eot_per_file: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions { val_fraction: 0.1, chunk_bytes: 1 << 20, append_eot_per_file: true }
    }
}

/// What `prepare` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareSummary {
    pub files: usize,
    pub bytes: u64,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub vocab_size: usize,
}

/// Contents of `meta.json` beside the shards.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    format: String,
    version: u32,
    vocab_size: usize,
    eot_id: Option<u32>,
    bytes_per_token: u32,
    train_tokens: u64,
    val_tokens: u64,
    val_fraction: f64,
    append_eot_per_file: bool,
    bytes: u64,
    train_bytes: u64,
    val_bytes: u64,
    /// First byte that went to val: file index and offset in that file (the file's length if
    /// val is empty).
    split: SplitPoint,
    files: Vec<SourceFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SplitPoint {
    file_index: usize,
    offset: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SourceFile {
    path: String,
    bytes: u64,
}

/// Tokenizes the files matched by `patterns` into `out_dir/train.bin`, `out_dir/val.bin`,
/// `out_dir/meta.json`, and a copy of the tokenizer as `out_dir/tokenizer.json`.
///
/// Files are taken pattern by pattern, each pattern's matches in sorted order, duplicates once.
/// The first `1 - val_fraction` of all bytes (cut at the next line start) go to train, the rest
/// to val. `progress(bytes_done, bytes_total)` is called as chunks finish. On error no output
/// file is replaced.
pub fn prepare(
    patterns: &[String],
    tokenizer: &Tokenizer,
    out_dir: &Path,
    opts: &PrepareOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PrepareSummary, DataError> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(DataError::InvalidArgument(format!("val_fraction must be in [0, 1), got {}", opts.val_fraction)));
    }
    if opts.chunk_bytes == 0 {
        return Err(DataError::InvalidArgument("chunk_bytes must be at least 1".into()));
    }
    let eot = match (opts.append_eot_per_file, tokenizer.eot_id()) {
        (true, None) => {
            return Err(DataError::InvalidArgument(
                "append_eot_per_file needs a tokenizer with <|endoftext|>; this one has none".into(),
            ))
        }
        (true, Some(id)) => Some(id),
        (false, _) => None,
    };

    let files = expand_patterns(patterns)?;
    let mut sizes = Vec::with_capacity(files.len());
    for f in &files {
        let m = std::fs::metadata(f).map_err(|e| DataError::io("reading", f, e))?;
        sizes.push(m.len());
    }
    let total: u64 = sizes.iter().sum();
    if total == 0 {
        return Err(DataError::EmptyCorpus(format!("the {} input file(s) are all empty", files.len())));
    }

    // Train ends at the first line start at or after this byte of the concatenated corpus.
    let target = ((total as f64) * (1.0 - opts.val_fraction)).floor() as u64;
    let split = find_split(&files, &sizes, target.min(total))?;
    let train_bytes: u64 = sizes[..split.file_index].iter().sum::<u64>() + split.offset;

    std::fs::create_dir_all(out_dir).map_err(|e| DataError::io("creating output directory", out_dir, e))?;
    let vocab_size = tokenizer.vocab_size();
    let mut writers = [
        ShardWriter::create(&out_dir.join("train.bin"), vocab_size)?,
        ShardWriter::create(&out_dir.join("val.bin"), vocab_size)?,
    ];

    let mut batch = Batch::new(rayon::current_num_threads().max(1) * 2);
    let mut done = 0u64;
    progress(0, total);
    for (i, (path, &size)) in files.iter().zip(&sizes).enumerate() {
        // Bytes of this file that belong to train.
        let train_end = if i < split.file_index {
            size
        } else if i == split.file_index {
            split.offset
        } else {
            0
        };
        for (dest, start, end) in [(TRAIN, 0, train_end), (VAL, train_end, size)] {
            if start == end {
                continue;
            }
            let mut reader = ChunkReader::open(path, start, end, opts.chunk_bytes)?;
            while let Some(text) = reader.next_chunk()? {
                batch.push_text(dest, text);
                if batch.is_full() {
                    done += batch.flush(tokenizer, &mut writers)?;
                    progress(done, total);
                }
            }
        }
        if let (Some(id), true) = (eot, size > 0) {
            // The separator goes with the file's last byte.
            batch.push_eot(if train_end < size { VAL } else { TRAIN }, id);
        }
    }
    done += batch.flush(tokenizer, &mut writers)?;
    progress(done, total);

    let [train, val] = writers;
    let (train_tokens, val_tokens) = (train.len(), val.len());
    if train_tokens + val_tokens == 0 {
        return Err(DataError::EmptyCorpus("the input files encode to 0 tokens".into()));
    }
    train.finish()?;
    val.finish()?;
    tokenizer.save(&out_dir.join("tokenizer.json"))?;
    let meta = Meta {
        format: "kiln-token-shards".into(),
        version: 1,
        vocab_size,
        eot_id: tokenizer.eot_id(),
        bytes_per_token: bytes_per_token_for_vocab(vocab_size),
        train_tokens,
        val_tokens,
        val_fraction: opts.val_fraction,
        append_eot_per_file: opts.append_eot_per_file,
        bytes: total,
        train_bytes,
        val_bytes: total - train_bytes,
        split,
        files: files
            .iter()
            .zip(&sizes)
            .map(|(p, &bytes)| SourceFile { path: p.display().to_string(), bytes })
            .collect(),
    };
    let json = serde_json::to_string_pretty(&meta)
        .map_err(|e| DataError::InvalidArgument(format!("serializing meta.json: {e}")))?;
    write_atomic(&out_dir.join("meta.json"), json.as_bytes())?;

    Ok(PrepareSummary { files: files.len(), bytes: total, train_tokens, val_tokens, vocab_size })
}

/// The train and val shards of a prepared directory.
#[derive(Debug)]
pub struct Dataset {
    pub train: TokenShard,
    pub val: TokenShard,
    pub vocab_size: usize,
}

impl Dataset {
    /// Opens `dir/train.bin`, `dir/val.bin` and reads the vocabulary size from `dir/meta.json`.
    pub fn open(dir: &Path) -> Result<Dataset, DataError> {
        let bad = |reason: String| DataError::BadDataset { path: dir.to_path_buf(), reason };
        let train_path = dir.join("train.bin");
        if !train_path.is_file() {
            return Err(bad(format!("{} does not exist; prepare the dataset first", train_path.display())));
        }
        #[derive(Deserialize)]
        struct MetaHead {
            vocab_size: usize,
        }
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path)
            .map_err(|e| DataError::io("reading dataset metadata", &meta_path, e))?;
        let head: MetaHead = serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", meta_path.display())))?;
        Ok(Dataset {
            train: TokenShard::open(&train_path)?,
            val: TokenShard::open(&dir.join("val.bin"))?,
            vocab_size: head.vocab_size,
        })
    }
}

const TRAIN: usize = 0;
const VAL: usize = 1;

/// Glob patterns → files, in pattern order, each pattern's matches sorted, no duplicates.
fn expand_patterns(patterns: &[String]) -> Result<Vec<PathBuf>, DataError> {
    if patterns.is_empty() {
        return Err(DataError::NoInput("no input files or patterns given".into()));
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for pattern in patterns {
        let paths = glob::glob(pattern)
            .map_err(|e| DataError::InvalidArgument(format!("bad glob pattern '{pattern}': {e}")))?;
        let mut matched = Vec::new();
        for entry in paths {
            let path = entry.map_err(|e| {
                let p = e.path().to_path_buf();
                DataError::io("reading", p, e.into())
            })?;
            // A pattern like `data/*` may also match directories; only files are text.
            if path.is_file() {
                matched.push(path);
            }
        }
        if matched.is_empty() {
            return Err(DataError::NoInput(format!("pattern '{pattern}' matched no files")));
        }
        matched.sort();
        for p in matched {
            if !files.contains(&p) {
                files.push(p);
            }
        }
    }
    Ok(files)
}

/// Finds the first line start at or after global byte `target` (or the corpus end).
fn find_split(files: &[PathBuf], sizes: &[u64], target: u64) -> Result<SplitPoint, DataError> {
    let mut start = 0u64;
    for (i, (path, &size)) in files.iter().zip(sizes).enumerate() {
        if target < start + size {
            let local = target - start;
            return Ok(SplitPoint { file_index: i, offset: next_line_start(path, local, size)? });
        }
        start += size;
    }
    // target == total: everything is train; point at the end of the last file.
    let last = files.len() - 1;
    Ok(SplitPoint { file_index: last, offset: sizes[last] })
}

/// Smallest `p >= at` with `p == 0`, `p == size`, or byte `p - 1` a `'\n'`.
fn next_line_start(path: &Path, at: u64, size: u64) -> Result<u64, DataError> {
    if at == 0 {
        return Ok(0);
    }
    let mut f = File::open(path).map_err(|e| DataError::io("opening", path, e))?;
    f.seek(SeekFrom::Start(at - 1)).map_err(|e| DataError::io("seeking in", path, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = at - 1;
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io("reading", path, e))?;
        if n == 0 {
            return Ok(size);
        }
        if let Some(k) = buf[..n].iter().position(|&b| b == b'\n') {
            return Ok((pos + k as u64 + 1).min(size));
        }
        pos += n as u64;
    }
}

/// Reads byte range `[start, end)` of a file as UTF-8 chunks ending at safe line breaks.
struct ChunkReader {
    file: File,
    path: PathBuf,
    /// Read-ahead; `buf[pos..]` is not yet returned.
    buf: Vec<u8>,
    pos: usize,
    /// File offset of `buf[pos]`.
    offset: u64,
    /// Bytes of the range not yet read into `buf`.
    remaining: u64,
    chunk_bytes: usize,
    /// Past this much buffered text with no safe break, cut at any line break.
    hard_cap: usize,
}

impl ChunkReader {
    fn open(path: &Path, start: u64, end: u64, chunk_bytes: usize) -> Result<Self, DataError> {
        let mut file = File::open(path).map_err(|e| DataError::io("opening", path, e))?;
        file.seek(SeekFrom::Start(start)).map_err(|e| DataError::io("seeking in", path, e))?;
        Ok(ChunkReader {
            file,
            path: path.to_path_buf(),
            buf: Vec::new(),
            pos: 0,
            offset: start,
            remaining: end - start,
            chunk_bytes,
            hard_cap: chunk_bytes.saturating_mul(16).max(8 << 20),
        })
    }

    /// Reads until `buf[pos..]` holds `want` bytes or the range is exhausted.
    fn fill(&mut self, want: usize) -> Result<(), DataError> {
        if self.buf.len() - self.pos >= want || self.remaining == 0 {
            return Ok(());
        }
        // Drop returned bytes only when reading, so small chunks do not move the buffer each time.
        self.buf.drain(..self.pos);
        self.pos = 0;
        while self.buf.len() < want && self.remaining > 0 {
            // Read at least 64 KiB at a time: tiny chunk sizes should not mean tiny reads.
            let n = ((want - self.buf.len()).max(64 * 1024) as u64).min(self.remaining) as usize;
            let old = self.buf.len();
            self.buf.resize(old + n, 0);
            let got = self.file.read(&mut self.buf[old..]).map_err(|e| DataError::io("reading", &self.path, e))?;
            self.buf.truncate(old + got);
            if got == 0 {
                return Err(DataError::io(
                    "reading",
                    &self.path,
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file shrank while being read"),
                ));
            }
            self.remaining -= got as u64;
        }
        Ok(())
    }

    /// The next chunk, or None at the end of the range.
    fn next_chunk(&mut self) -> Result<Option<String>, DataError> {
        let mut want = self.chunk_bytes;
        let cut = loop {
            self.fill(want)?;
            let avail = &self.buf[self.pos..];
            if avail.is_empty() {
                return Ok(None);
            }
            if self.remaining == 0 && avail.len() <= self.chunk_bytes {
                // The range's end (file end or the split) is a boundary anyway.
                break avail.len();
            }
            if let Some(cut) = safe_cut(avail, self.chunk_bytes) {
                break cut;
            }
            if self.remaining == 0 {
                break avail.len();
            }
            if avail.len() >= self.hard_cap {
                break fallback_cut(avail);
            }
            // Grow geometrically so a long stretch without a safe break is scanned O(n log n).
            want = avail.len() * 2;
        };
        let bytes = self.buf[self.pos..self.pos + cut].to_vec();
        let offset = self.offset;
        self.pos += cut;
        self.offset += cut as u64;
        let text = String::from_utf8(bytes).map_err(|e| DataError::InvalidUtf8 {
            path: self.path.clone(),
            offset: offset + e.utf8_error().valid_up_to() as u64,
        })?;
        Ok(Some(text))
    }
}

/// Best safe cut: the last one at or before `limit`, else the first after it.
fn safe_cut(buf: &[u8], limit: usize) -> Option<usize> {
    let is_safe = |p: usize| is_safe_cut(buf, p);
    let hi = limit.min(buf.len().saturating_sub(1));
    (2..=hi).rev().find(|&p| is_safe(p)).or_else(|| (hi + 1..buf.len()).find(|&p| is_safe(p)))
}

/// A cut before `p` is safe when `buf[p-1]` is `'\n'` and the characters on either side of it
/// are known and not whitespace: then `"\n"` is a pre-token by itself in any context.
fn is_safe_cut(buf: &[u8], p: usize) -> bool {
    if p < 2 || p >= buf.len() || buf[p - 1] != b'\n' {
        return false;
    }
    let before = last_char(&buf[..p - 1]);
    let after = first_char(&buf[p..]);
    matches!((before, after), (Some(b), Some(a)) if !b.is_whitespace() && !a.is_whitespace())
}

fn first_char(b: &[u8]) -> Option<char> {
    let len = match *b.first()? {
        x if x < 0x80 => 1,
        x if x >= 0xF0 => 4,
        x if x >= 0xE0 => 3,
        _ => 2,
    };
    std::str::from_utf8(b.get(..len)?).ok()?.chars().next()
}

fn last_char(b: &[u8]) -> Option<char> {
    // A UTF-8 character starts at the last byte that is not a continuation byte (10xxxxxx).
    let start = (b.len().saturating_sub(4)..b.len()).rev().find(|&i| b[i] & 0xC0 != 0x80)?;
    std::str::from_utf8(&b[start..]).ok()?.chars().next()
}

/// Cut when no safe break exists: after the last `'\n'`, else before the last UTF-8 character
/// start (so a multi-byte character is never split).
fn fallback_cut(buf: &[u8]) -> usize {
    if let Some(k) = buf.iter().rposition(|&b| b == b'\n') {
        return k + 1;
    }
    (1..buf.len()).rev().find(|&i| buf[i] & 0xC0 != 0x80).unwrap_or(buf.len())
}

/// Work waiting to be encoded and written, in order.
struct Batch {
    items: Vec<Item>,
    texts: usize,
    capacity: usize,
}

enum Item {
    Text { dest: usize, text: String },
    Eot { dest: usize, id: u32 },
}

impl Batch {
    fn new(capacity: usize) -> Batch {
        Batch { items: Vec::new(), texts: 0, capacity }
    }

    fn push_text(&mut self, dest: usize, text: String) {
        self.items.push(Item::Text { dest, text });
        self.texts += 1;
    }

    fn push_eot(&mut self, dest: usize, id: u32) {
        self.items.push(Item::Eot { dest, id });
    }

    fn is_full(&self) -> bool {
        self.texts >= self.capacity
    }

    /// Encodes the texts in parallel, writes everything in order, returns the bytes encoded.
    fn flush(&mut self, tokenizer: &Tokenizer, writers: &mut [ShardWriter; 2]) -> Result<u64, DataError> {
        let items = std::mem::take(&mut self.items);
        self.texts = 0;
        // par_iter().collect() keeps input order, so the shards do not depend on scheduling.
        let encoded: Vec<Vec<u32>> = items
            .par_iter()
            .map(|item| match item {
                Item::Text { text, .. } => tokenizer.encode(text),
                Item::Eot { .. } => Ok(Vec::new()),
            })
            .collect::<Result<_, _>>()?;
        let mut bytes = 0u64;
        for (item, tokens) in items.iter().zip(encoded) {
            match item {
                Item::Text { dest, text } => {
                    writers[*dest].write(&tokens)?;
                    bytes += text.len() as u64;
                }
                Item::Eot { dest, id } => writers[*dest].write(&[*id])?,
            }
        }
        Ok(bytes)
    }
}
