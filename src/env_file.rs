//! The `--env-file PATH` file format.
//!
//! Why it exists: a deployment that cannot set environment variables one by
//! one (a systemd unit, a shared `.env` of several services, a `docker run`
//! without `--env-file`) can hand the writer a file of `KEY=VALUE` lines
//! instead. This module owns the format and reading the file; it never
//! touches the process environment. [`crate::config`] layers the result
//! under the real environment (environment first, then the file, then the
//! default; README, "Configuration") and validates the values as usual.
//!
//! The format, one entry per line:
//!
//! - blank lines and lines whose first non-blank character is `#` are ignored;
//! - otherwise the line is `KEY=VALUE`, optionally preceded by `export `;
//! - the key is trimmed of surrounding whitespace and must match
//!   `[A-Za-z_][A-Za-z0-9_]*`;
//! - the value is everything after the first `=`, as written (no trimming,
//!   so `A= b` gives `" b"`), except that a value wrapped entirely in
//!   matching single or double quotes loses those two quotes; there are no
//!   escapes, no interpolation and no continuation lines;
//! - `KEY=` sets the empty string, which wins over the default like an empty
//!   environment variable (README, "Configuration");
//! - a key given twice takes its last value, as a shell sourcing the file would.
//!
//! Lines end with `\n` or `\r\n`. Unknown keys are accepted: the file may be
//! shared with other services. A file larger than [`MAX_LEN`] (1 MiB) is
//! refused without reading the rest, so `--env-file /dev/zero` cannot eat
//! the memory.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest env file accepted, in bytes (1 MiB): far more than any list
/// of variables needs.
pub const MAX_LEN: u64 = 1 << 20;

/// One `KEY=VALUE` line of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based line number, for messages that point back at the file.
    pub line: usize,
    /// The key, trimmed.
    pub key: String,
    /// The value, quotes removed if it was wrapped in them.
    pub value: String,
}

/// Parses the text of an env file (format in the module documentation).
///
/// Returns the entries in file order (a repeated key appears each time).
/// Errors: `(line, message)` for the first line that is not a comment, not
/// blank and not `KEY=VALUE` with a valid key; `line` is 1-based. The
/// message quotes a line that has no `=`, but never a value after `=` (it
/// may be a password).
pub fn parse(text: &str) -> Result<Vec<Entry>, (usize, String)> {
    let mut entries = Vec::new();
    // A byte-order mark some editors write is not part of the first key.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        // `lines` strips "\r\n"; a lone "\r" at the very end stays.
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let rest = match trimmed.strip_prefix("export") {
            Some(r) if r.starts_with([' ', '\t']) => r,
            _ => trimmed,
        };
        let Some((key, value)) = rest.split_once('=') else {
            return Err((line, format!("expected KEY=VALUE, got {:?}", raw.trim())));
        };
        let key = key.trim();
        if !valid_key(key) {
            return Err((
                line,
                format!("invalid key {key:?}: expected [A-Za-z_][A-Za-z0-9_]*"),
            ));
        }
        entries.push(Entry {
            line,
            key: key.to_string(),
            value: unquote(value).to_string(),
        });
    }
    Ok(entries)
}

fn valid_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn unquote(value: &str) -> &str {
    for q in ['"', '\''] {
        if value.len() >= 2 && value.starts_with(q) && value.ends_with(q) {
            return &value[1..value.len() - 1];
        }
    }
    value
}

/// A file given with `--env-file`, read and parsed.
#[derive(Debug, Clone)]
pub struct EnvFile {
    path: PathBuf,
    entries: HashMap<String, Entry>,
}

/// Why an env file cannot be used. `Display` gives one line naming the
/// file as it was given: `--env-file PATH line N: <what is wrong>` or
/// `--env-file PATH: cannot read it: <OS error>` or
/// `--env-file PATH: larger than 1 MiB`. `main` turns it into exit code 2
/// (bad configuration; README, "Running it").
#[derive(Debug)]
pub enum EnvFileError {
    /// The file cannot be read (missing, a directory, no permission, …).
    Read {
        /// The path as given.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The file holds more than [`MAX_LEN`] bytes (or never ends, like
    /// `/dev/zero`).
    TooLarge {
        /// The path as given.
        path: PathBuf,
    },
    /// A line of the file is malformed.
    Line {
        /// The path as given.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong, from [`parse`].
        message: String,
    },
}

impl fmt::Display for EnvFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvFileError::Read { path, error } => {
                write!(f, "--env-file {}: cannot read it: {error}", path.display())
            }
            EnvFileError::TooLarge { path } => {
                write!(f, "--env-file {}: larger than 1 MiB", path.display())
            }
            EnvFileError::Line {
                path,
                line,
                message,
            } => write!(f, "--env-file {} line {line}: {message}", path.display()),
        }
    }
}

impl std::error::Error for EnvFileError {}

impl EnvFile {
    /// Reads and parses the file at `path`.
    ///
    /// Errors: [`EnvFileError::Read`] if it cannot be read,
    /// [`EnvFileError::TooLarge`] past [`MAX_LEN`] bytes (nothing more is
    /// read), [`EnvFileError::Line`] for the first bad line; a file that is
    /// not UTF-8 is a bad line at the first invalid byte.
    pub fn load(path: &Path) -> Result<EnvFile, EnvFileError> {
        let read_error = |error| EnvFileError::Read {
            path: path.to_path_buf(),
            error,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_LEN + 1).read_to_end(&mut bytes))
            .map_err(read_error)?;
        if bytes.len() as u64 > MAX_LEN {
            return Err(EnvFileError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let line_error = |line, message| EnvFileError::Line {
            path: path.to_path_buf(),
            line,
            message,
        };
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t,
            Err(e) => {
                let before = &bytes[..e.valid_up_to()];
                let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
                return Err(line_error(line, "not valid UTF-8".to_string()));
            }
        };
        let entries = parse(text).map_err(|(line, message)| line_error(line, message))?;
        Ok(EnvFile::from_entries(path, entries))
    }

    /// An env file from entries already parsed (the last entry of a key
    /// wins); `path` is only used in messages.
    pub fn from_entries(path: &Path, entries: Vec<Entry>) -> EnvFile {
        EnvFile {
            path: path.to_path_buf(),
            entries: entries.into_iter().map(|e| (e.key.clone(), e)).collect(),
        }
    }

    /// The entry of `key`, if the file sets it.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// The path as given, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(usize, String, String)> {
        parse(text)
            .unwrap()
            .into_iter()
            .map(|e| (e.line, e.key, e.value))
            .collect()
    }

    fn p(line: usize, k: &str, v: &str) -> (usize, String, String) {
        (line, k.to_string(), v.to_string())
    }

    #[test]
    fn comments_blanks_and_export() {
        let text =
            "# a comment\n\n   \n  # indented comment\nA=1\nexport B=2\n\texport\tC=3\r\n  D =4\n";
        assert_eq!(
            pairs(text),
            vec![
                p(5, "A", "1"),
                p(6, "B", "2"),
                p(7, "C", "3"),
                p(8, "D", "4")
            ]
        );
        // A key named `export` is a key, not the prefix.
        assert_eq!(pairs("export=x"), vec![p(1, "export", "x")]);
        assert_eq!(pairs(""), vec![]);
    }

    #[test]
    fn values_are_taken_as_written() {
        let text = "EMPTY=\nEQ=a=b==c\nSP= lead and trail \nHASH=x # not a comment\nURL=amqp://u:p@h:5672/%2f";
        assert_eq!(
            pairs(text),
            vec![
                p(1, "EMPTY", ""),
                p(2, "EQ", "a=b==c"),
                p(3, "SP", " lead and trail "),
                p(4, "HASH", "x # not a comment"),
                p(5, "URL", "amqp://u:p@h:5672/%2f"),
            ]
        );
    }

    #[test]
    fn matching_quotes_are_removed_and_nothing_else() {
        let text = concat!(
            "D=\"two words\"\n",
            "S='it''s'\n",
            "E=\"\"\n",
            "E2=''\n",
            "NOESC=\"a\\nb $HOME\"\n",
            "MIXED=\"a'\n",
            "ONE=\"\n",
            "INNER=a\"b\"\n",
            "TRAIL=\"x\" \n",
        );
        assert_eq!(
            pairs(text),
            vec![
                p(1, "D", "two words"),
                p(2, "S", "it''s"),
                p(3, "E", ""),
                p(4, "E2", ""),
                p(5, "NOESC", "a\\nb $HOME"),
                p(6, "MIXED", "\"a'"),
                p(7, "ONE", "\""),
                p(8, "INNER", "a\"b\""),
                p(9, "TRAIL", "\"x\" "),
            ]
        );
    }

    #[test]
    fn a_bad_line_gives_its_number() {
        assert_eq!(
            parse("# ok\nA=1\ngarbage\nB=2").unwrap_err(),
            (3, "expected KEY=VALUE, got \"garbage\"".to_string())
        );
        assert_eq!(
            parse("export FOO").unwrap_err(),
            (1, "expected KEY=VALUE, got \"export FOO\"".to_string())
        );
    }

    #[test]
    fn a_bad_key_is_an_error_without_the_value() {
        for (text, key) in [
            ("1A=secret", "1A"),
            ("=secret", ""),
            ("A-B=secret", "A-B"),
            ("A B=secret", "A B"),
            ("export =secret", ""),
            ("É=secret", "É"),
        ] {
            let (line, message) = parse(&format!("OK=1\n{text}")).unwrap_err();
            assert_eq!(line, 2, "{text}");
            assert_eq!(
                message,
                format!("invalid key {key:?}: expected [A-Za-z_][A-Za-z0-9_]*"),
                "{text}"
            );
        }
        assert_eq!(pairs("_a1=x"), vec![p(1, "_a1", "x")]);
    }

    #[test]
    fn the_last_value_of_a_key_wins() {
        let f = EnvFile::from_entries(Path::new("f.env"), parse("A=1\nB=2\nA=3").unwrap());
        assert_eq!(
            f.get("A").map(|e| (e.line, e.value.as_str())),
            Some((3, "3"))
        );
        assert_eq!(
            f.get("B").map(|e| (e.line, e.value.as_str())),
            Some((2, "2"))
        );
        assert!(f.get("C").is_none());
    }

    #[test]
    fn load_errors_name_the_file() {
        /// Removes the directory also when an assertion fails.
        struct Dir(PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let name = format!("chat-writer-env-file-{}", std::process::id());
        let guard = Dir(std::env::temp_dir().join(name));
        let dir = &guard.0;
        std::fs::create_dir_all(dir).unwrap();
        let missing = dir.join("missing.env");
        let e = EnvFile::load(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "--env-file {}: cannot read it: ",
                missing.display()
            )),
            "{e}"
        );
        let bad = dir.join("bad.env");
        std::fs::write(&bad, b"A=1\nB=\xff\n").unwrap();
        assert_eq!(
            EnvFile::load(&bad).unwrap_err().to_string(),
            format!("--env-file {} line 2: not valid UTF-8", bad.display())
        );
        std::fs::write(&bad, "A=1\n\ngarbage\n").unwrap();
        assert_eq!(
            EnvFile::load(&bad).unwrap_err().to_string(),
            format!(
                "--env-file {} line 3: expected KEY=VALUE, got \"garbage\"",
                bad.display()
            )
        );
        // Exactly 1 MiB is read; one byte more is refused, naming the file.
        let big = dir.join("big.env");
        let mut text = "A=1\n".repeat(MAX_LEN as usize / 4);
        std::fs::write(&big, &text).unwrap();
        assert_eq!(
            EnvFile::load(&big).unwrap().get("A").map(|e| e.line),
            Some(MAX_LEN as usize / 4)
        );
        text.push('\n');
        std::fs::write(&big, &text).unwrap();
        assert_eq!(
            EnvFile::load(&big).unwrap_err().to_string(),
            format!("--env-file {}: larger than 1 MiB", big.display())
        );
        // A file that never ends is refused after 1 MiB, not read forever.
        assert_eq!(
            EnvFile::load(Path::new("/dev/zero"))
                .unwrap_err()
                .to_string(),
            "--env-file /dev/zero: larger than 1 MiB"
        );
    }

    #[test]
    fn a_byte_order_mark_and_a_last_carriage_return_are_not_data() {
        let e = parse("\u{feff}HTTP_ADDR=127.0.0.1:1\r\nRUST_LOG=debug\r").unwrap();
        let got: Vec<(&str, &str)> = e
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(got, [("HTTP_ADDR", "127.0.0.1:1"), ("RUST_LOG", "debug")]);
    }
}
