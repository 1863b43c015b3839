//! Token ids to text while streaming: incremental detokenization that never emits half a
//! UTF-8 character, and stop sequences matched on text (even when split across tokens).

use kiln_data::Tokenizer;

/// Turns a growing list of token ids into text deltas. Decodes a short window (the tokens
/// since the last emitted delta plus the one before), so the cost per token is constant and
/// decoders that look at neighbouring tokens (SentencePiece's leading space) stay right.
#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Detokenizer {
        Detokenizer::default()
    }

    /// Adds `id` and returns the new text it completes (empty while a character is still
    /// incomplete, shown by the decoder as U+FFFD at the end).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let Ok(before) = tok.decode(&self.ids[self.prefix..self.read]) else { return String::new() };
        let Ok(after) = tok.decode(&self.ids[self.prefix..]) else { return String::new() };
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            if let Some(delta) = after.get(before.len()..) {
                self.prefix = self.read;
                self.read = self.ids.len();
                return delta.to_string();
            }
        }
        String::new()
    }

    /// Text still held back at the end (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self, tok: &Tokenizer) -> String {
        let before = tok.decode(&self.ids[self.prefix..self.read]).unwrap_or_default();
        let after = tok.decode(&self.ids[self.prefix..]).unwrap_or_default();
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        after.get(before.len()..).unwrap_or_default().to_string()
    }
}

/// Holds back text that could be the start of a stop sequence, and cuts the output where one
/// appears. The stop text itself is never emitted.
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Appends `delta`; returns the text safe to emit and whether a stop sequence was found
    /// (then generation ends and nothing after the stop text is kept).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.text.push_str(delta);
        let tail = &self.text[self.emitted..];
        // The earliest stop occurrence in the unemitted text wins.
        if let Some(at) = self.stops.iter().filter_map(|s| tail.find(s.as_str())).min() {
            let out = tail[..at].to_string();
            self.text.truncate(self.emitted + at);
            self.emitted = self.text.len();
            self.stopped = true;
            return (out, true);
        }
        // Keep back the longest suffix that is a proper prefix of some stop sequence.
        let hold = tail
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&tail[i..])))
            .unwrap_or(tail.len());
        let out = tail[..hold].to_string();
        self.emitted += hold;
        (out, false)
    }

    /// The held-back text, when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// Whether a stop sequence has ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Everything emitted so far (up to, not including, a stop sequence).
    pub fn text(&self) -> &str {
        &self.text[..self.emitted]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (o, stop) = m.push(p);
            out += &o;
            if stop {
                assert_eq!(m.text(), out);
                return (out, true);
            }
        }
        out += &m.flush();
        (out, false)
    }

    #[test]
    fn stop_sequences_split_across_pieces() {
        assert_eq!(run(&["END"], &["ab", "cE", "N", "Dxyz"]), ("abc".into(), true));
        assert_eq!(run(&["END"], &["ab", "cE", "N", "x"]), ("abcENx".into(), false));
        assert_eq!(run(&["\n\n", "STOP"], &["a\n", "b", "\n", "\nq"]), ("a\nb".into(), true));
        assert_eq!(run(&["é!"], &["caf", "é", "é!"]), ("café".into(), true));
        assert_eq!(run(&[], &["x", "y"]), ("xy".into(), false));
        assert_eq!(run(&["", "zz"], &["z"]), ("z".into(), false));
        // The earliest of two overlapping stops wins.
        assert_eq!(run(&["cd", "bcde"], &["abcdef"]), ("a".into(), true));
    }
}
