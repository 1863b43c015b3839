//! Python `str` semantics that the reference metric tools rely on.
//!
//! sacrebleu and rouge-score are Python programs, so "whitespace" means what `str.split()` /
//! `str.strip()` treat as whitespace, and "lowercase" means `str.lower()`. These helpers
//! reproduce those behaviours so that tokenization matches character for character.

/// Whether `c` is whitespace for Python's `str.isspace()` / `str.split()`.
///
/// This is Rust's `char::is_whitespace` (the Unicode `White_Space` property) plus the four
/// ASCII information separators U+001C..U+001F, which Python also treats as whitespace.
pub(crate) fn is_py_space(c: char) -> bool {
    matches!(c, '\u{1c}'..='\u{1f}') || c.is_whitespace()
}

/// Python's `s.split()` with no arguments: runs of whitespace separate fields, and leading,
/// trailing and empty fields are dropped.
pub(crate) fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|t| !t.is_empty())
}

/// Python's `s.rstrip()`.
pub(crate) fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_py_space)
}

/// Python's `s.strip()`.
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// Python's `s.lower()`: full Unicode lowercase mapping, including the context-dependent final
/// sigma. (Rust's tables may be a newer Unicode version than the Python that runs the reference
/// tools; the two differ only for characters added in between.)
pub(crate) fn py_lower(s: &str) -> String {
    s.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_matches_python_isspace() {
        // [c for c in range(0x110000) if chr(c).isspace()] on CPython 3.11.
        let python: &[u32] = &[
            9, 10, 11, 12, 13, 28, 29, 30, 31, 32, 133, 160, 5760, 8192, 8193, 8194, 8195, 8196, 8197, 8198, 8199,
            8200, 8201, 8202, 8232, 8233, 8239, 8287, 12288,
        ];
        let ours: Vec<u32> =
            (0..=0x10FFFFu32).filter_map(char::from_u32).filter(|&c| is_py_space(c)).map(u32::from).collect();
        assert_eq!(ours, python);
    }

    #[test]
    fn split_and_strip() {
        assert_eq!(py_split("  a\u{1f}b\u{3000}c  ").collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(py_split("").count(), 0);
        assert_eq!(py_rstrip(" a b \t\u{a0}"), " a b");
        assert_eq!(py_strip("\u{2003} a b \n"), "a b");
        assert_eq!(py_lower("\u{39f}\u{394}\u{39f}\u{3a3} \u{130}"), "\u{3bf}\u{3b4}\u{3bf}\u{3c2} i\u{307}");
    }
}
