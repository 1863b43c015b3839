//! Token shards: a 24-byte header then little-endian token ids, memory-mapped on read.
//!
//! Layout: magic `b"KILNTOK1"` (8 bytes), version `u32` LE (= 1), bytes per token `u32` LE
//! (2 or 4), token count `u64` LE, then `count` tokens. Tokens are `u16` when the vocabulary has
//! at most 65536 ids, else `u32`.

use crate::atomic::TempFile;
use crate::DataError;
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// First 8 bytes of every shard.
pub(crate) const SHARD_MAGIC: &[u8; 8] = b"KILNTOK1";
/// The only format version so far.
pub(crate) const SHARD_VERSION: u32 = 1;
/// Bytes before the first token.
pub(crate) const HEADER_LEN: usize = 24;

/// Bytes per token for a vocabulary: 2 while every id fits a `u16`.
pub(crate) fn bytes_per_token_for_vocab(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// A read-only, memory-mapped token shard.
#[derive(Debug)]
pub struct TokenShard {
    map: Mmap,
    len: usize,
    bytes_per_token: usize,
    /// Computed on first use: scanning a large shard at open would make open slow.
    max_token: OnceLock<u32>,
}

impl TokenShard {
    /// Maps `path` and checks magic, version, token width and that the size matches the count.
    pub fn open(path: &Path) -> Result<TokenShard, DataError> {
        let bad = |reason: String| DataError::BadShard { path: path.to_path_buf(), reason };
        let file = File::open(path).map_err(|e| DataError::io("opening token shard", path, e))?;
        // SAFETY: the map is read-only; as with any mmap, another process truncating or rewriting
        // the file while we read it is outside what we can guard against. We write shards by
        // rename, so our own writers never modify a mapped file in place.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io("memory-mapping token shard", path, e))?;
        if map.len() < HEADER_LEN {
            return Err(bad(format!(
                "file is {} bytes, shorter than the {HEADER_LEN}-byte header (truncated?)",
                map.len()
            )));
        }
        if &map[0..8] != SHARD_MAGIC {
            return Err(bad("not a kiln token shard (magic is not KILNTOK1)".into()));
        }
        let version = u32::from_le_bytes(le4(&map[8..12]));
        if version != SHARD_VERSION {
            return Err(bad(format!("format version {version}; this build reads version {SHARD_VERSION}")));
        }
        let bpt = u32::from_le_bytes(le4(&map[12..16]));
        if bpt != 2 && bpt != 4 {
            return Err(bad(format!("bytes per token is {bpt}; expected 2 or 4")));
        }
        let count = u64::from_le_bytes(le8(&map[16..24]));
        let body = (map.len() - HEADER_LEN) as u64;
        let expected = count
            .checked_mul(bpt as u64)
            .ok_or_else(|| bad(format!("header token count {count} is impossibly large")))?;
        if body < expected {
            return Err(bad(format!(
                "truncated: header says {count} tokens ({expected} bytes) but only {body} bytes follow"
            )));
        }
        if body > expected {
            return Err(bad(format!("header says {count} tokens ({expected} bytes) but {body} bytes follow")));
        }
        let len = usize::try_from(count)
            .map_err(|_| bad(format!("{count} tokens do not fit this machine's address space")))?;
        Ok(TokenShard { map, len, bytes_per_token: bpt as usize, max_token: OnceLock::new() })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// 2 or 4.
    pub fn bytes_per_token(&self) -> usize {
        self.bytes_per_token
    }

    /// Token `i`. Panics if `i >= len()`, like slice indexing.
    pub fn get(&self, i: usize) -> u32 {
        assert!(i < self.len, "token index {i} out of range for shard of {}", self.len);
        let at = HEADER_LEN + i * self.bytes_per_token;
        match self.bytes_per_token {
            2 => u16::from_le_bytes([self.map[at], self.map[at + 1]]) as u32,
            _ => u32::from_le_bytes(le4(&self.map[at..at + 4])),
        }
    }

    /// Copies `out.len()` tokens starting at `start`. Panics if the range passes the end.
    pub fn copy_range(&self, start: usize, out: &mut [u32]) {
        let end = start.checked_add(out.len()).filter(|&e| e <= self.len).unwrap_or_else(|| {
            panic!("token range {start}..{start}+{} out of range for shard of {}", out.len(), self.len)
        });
        let bytes = &self.map[HEADER_LEN + start * self.bytes_per_token..HEADER_LEN + end * self.bytes_per_token];
        match self.bytes_per_token {
            2 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = u16::from_le_bytes([b[0], b[1]]) as u32;
                }
            }
            _ => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = u32::from_le_bytes(le4(b));
                }
            }
        }
    }

    /// Largest token id (0 for an empty shard); scans once, then cached.
    pub fn max_token(&self) -> u32 {
        *self.max_token.get_or_init(|| {
            let mut buf = vec![0u32; 1 << 16];
            let mut max = 0;
            let mut i = 0;
            while i < self.len {
                let n = (self.len - i).min(buf.len());
                self.copy_range(i, &mut buf[..n]);
                max = buf[..n].iter().copied().fold(max, u32::max);
                i += n;
            }
            max
        })
    }
}

/// Streams tokens into a new shard; the file appears at its path only after `finish`.
///
/// Dropping a writer without calling `finish` removes the partial temp file.
pub struct ShardWriter {
    out: BufWriter<File>,
    tmp: TempFile,
    path: PathBuf,
    bytes_per_token: u32,
    count: u64,
}

impl ShardWriter {
    /// Starts a shard at `path` for tokens of a vocabulary of `vocab_size` ids.
    pub fn create(path: &Path, vocab_size: usize) -> Result<ShardWriter, DataError> {
        Self::with_bytes_per_token(path, bytes_per_token_for_vocab(vocab_size))
    }

    /// Starts a shard with an explicit token width (2 or 4).
    pub fn with_bytes_per_token(path: &Path, bytes_per_token: u32) -> Result<ShardWriter, DataError> {
        if bytes_per_token != 2 && bytes_per_token != 4 {
            return Err(DataError::InvalidArgument(format!("bytes per token must be 2 or 4, not {bytes_per_token}")));
        }
        let mut tmp = TempFile::create(path)?;
        let file = tmp.file().try_clone().map_err(|e| DataError::io("opening", tmp.tmp_path(), e))?;
        let mut w = ShardWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            tmp,
            path: path.to_path_buf(),
            bytes_per_token,
            count: 0,
        };
        // The count is patched in by `finish`, once known.
        w.write_header(0)?;
        Ok(w)
    }

    fn write_header(&mut self, count: u64) -> Result<(), DataError> {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(SHARD_MAGIC);
        h[8..12].copy_from_slice(&SHARD_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.bytes_per_token.to_le_bytes());
        h[16..24].copy_from_slice(&count.to_le_bytes());
        let path = self.tmp.tmp_path().to_path_buf();
        self.out.write_all(&h).map_err(|e| DataError::io("writing token shard", path, e))
    }

    /// Appends tokens; errors if one does not fit the token width.
    pub fn write(&mut self, tokens: &[u32]) -> Result<(), DataError> {
        let mut buf = Vec::with_capacity(tokens.len() * self.bytes_per_token as usize);
        if self.bytes_per_token == 2 {
            for &t in tokens {
                let t = u16::try_from(t).map_err(|_| {
                    DataError::InvalidArgument(format!(
                        "token id {t} does not fit a 2-byte shard ({})",
                        self.path.display()
                    ))
                })?;
                buf.extend_from_slice(&t.to_le_bytes());
            }
        } else {
            for &t in tokens {
                buf.extend_from_slice(&t.to_le_bytes());
            }
        }
        let path = self.tmp.tmp_path().to_path_buf();
        self.out.write_all(&buf).map_err(|e| DataError::io("writing token shard", path, e))?;
        self.count += tokens.len() as u64;
        Ok(())
    }

    /// Tokens written so far.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True when no token has been written.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Writes the final count into the header and renames the file into place.
    pub fn finish(mut self) -> Result<u64, DataError> {
        let path = self.tmp.tmp_path().to_path_buf();
        let io = |e: std::io::Error| DataError::io("writing token shard", path.clone(), e);
        self.out.flush().map_err(io)?;
        let file = self.out.get_mut();
        file.seek(SeekFrom::Start(16)).map_err(io)?;
        file.write_all(&self.count.to_le_bytes()).map_err(io)?;
        let count = self.count;
        self.tmp.commit()?;
        Ok(count)
    }
}

fn le4(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

fn le8(b: &[u8]) -> [u8; 8] {
    [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]
}
