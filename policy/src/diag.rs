//! Diagnostics: every problem `check` finds, with stable codes and source locations.

use std::fmt;
use std::ops::Range;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFiles;
use serde::Serialize;

use crate::source::SourceFile;

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The policy cannot be used.
    Error,
    /// The policy works, but probably not as meant (`--deny-warnings` makes it an error).
    Warning,
}

macro_rules! codes {
    ($($variant:ident = $code:literal, $sev:ident, $summary:literal;)*) => {
        /// A stable diagnostic code. Codes are never renumbered or reused.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Code { $(#[doc = $summary] $variant,)* }

        impl Code {
            /// Every code, in order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The code as printed: `E0001`, `W0001`, ...
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $code,)* }
            }

            /// Whether this code is an error or a warning.
            pub fn severity(self) -> Severity {
                match self { $(Code::$variant => Severity::$sev,)* }
            }

            /// One line on what the code means.
            pub fn summary(self) -> &'static str {
                match self { $(Code::$variant => $summary,)* }
            }
        }
    };
}

codes! {
    TomlSyntax = "E0001", Error, "the file is not valid TOML";
    UnknownKey = "E0002", Error, "a key that the policy format does not have";
    MissingKey = "E0003", Error, "a required key is missing";
    WrongType = "E0004", Error, "a value has the wrong type";
    InvalidName = "E0005", Error, "a name, tag or selector is not of the form ^[a-z0-9][a-z0-9-]{0,62}$ (selectors may start with tag:)";
    InvalidValue = "E0006", Error, "a value is not one of those allowed (protocol, expect, key hash, legacy id, empty list)";
    DuplicateName = "E0007", Error, "two definitions of one kind share a name";
    UnknownPortal = "E0008", Error, "a reference to a portal that is not defined";
    UnknownTag = "E0009", Error, "a tag:T selector that matches nothing";
    UnknownService = "E0010", Error, "a reference to a service that is not defined";
    UnknownRelay = "E0011", Error, "a reference to a relay that is not defined";
    ListenConflict = "E0012", Error, "two access rules give one portal the same listen address";
    BadAddress = "E0013", Error, "an address is not address:port (listen, target) or not a host (relay)";
    BadPort = "E0014", Error, "a port is 0 or above 65535";
    BadPortRange = "E0015", Error, "a relay port range is not FIRST-LAST with room for a pair";
    TestFailed = "E0016", Error, "an embedded [[test]] does not get the decision it expects";
    DuplicateLegacyId = "E0017", Error, "two portals share a legacy_id";
    DuplicateKeyPin = "E0018", Error, "two portals pin the same public key";
    RelayRangeOverlap = "E0019", Error, "two relays on one address have overlapping port ranges";
    NoPolicyFiles = "E0020", Error, "the directory holds no *.toml file";
    RevokedServicePortal = "W0001", Warning, "a service is served by a portal whose key is revoked";
    DuplicateRevocation = "W0002", Warning, "one key is revoked twice";
    NoRelay = "W0003", Warning, "no relay can carry an access rule";
    UnreachableService = "W0004", Warning, "a service that no access rule grants";
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A place in a source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// Index into the sources the check was given.
    pub file: usize,
    /// Byte range in that file.
    pub span: Range<usize>,
    /// What this place has to do with the problem.
    pub message: String,
}

/// One problem found by `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The stable code.
    pub code: Code,
    /// What is wrong, in one sentence.
    pub message: String,
    /// Where: the first label is the primary location; others are related places
    /// (the first definition of a duplicate, the other side of a conflict).
    pub labels: Vec<Label>,
    /// Extra lines: how to fix it.
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            labels: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn at(
        mut self,
        file: usize,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Self {
        self.labels.push(Label {
            file,
            span,
            message: message.into(),
        });
        self
    }

    pub(crate) fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    /// Error or warning.
    pub fn severity(&self) -> Severity {
        self.code.severity()
    }

    fn sort_key(&self) -> (usize, usize, Code) {
        self.labels.first().map_or((usize::MAX, 0, self.code), |l| {
            (l.file, l.span.start, self.code)
        })
    }
}

pub(crate) fn sort(diags: &mut [Diagnostic]) {
    diags.sort_by(|a, b| {
        a.sort_key()
            .cmp(&b.sort_key())
            .then_with(|| a.message.cmp(&b.message))
    });
}

/// A resolved location, for JSON and GitHub output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    /// File path as shown to the user.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Turns byte offsets into lines and columns.
pub fn locate(sources: &[SourceFile], file: usize, offset: usize) -> Location {
    let Some(src) = sources.get(file) else {
        return Location {
            file: String::new(),
            line: 1,
            column: 1,
        };
    };
    let offset = offset.min(src.content.len());
    let before = src
        .content
        .get(..offset)
        .unwrap_or(&src.content[..floor_char_boundary(&src.content, offset)]);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    Location {
        file: src.path.clone(),
        line,
        column,
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The diagnostic's primary location, if it has one.
pub fn primary_location(sources: &[SourceFile], d: &Diagnostic) -> Option<Location> {
    d.labels
        .first()
        .map(|l| locate(sources, l.file, l.span.start))
}

/// Builds the codespan view of the sources and diagnostics, for rendering in rustc's style.
pub fn to_codespan(
    sources: &[SourceFile],
    diags: &[Diagnostic],
) -> (SimpleFiles<String, String>, Vec<cs::Diagnostic<usize>>) {
    let mut files = SimpleFiles::new();
    for s in sources {
        files.add(s.path.clone(), s.content.clone());
    }
    let out = diags
        .iter()
        .map(|d| {
            let base = match d.severity() {
                Severity::Error => cs::Diagnostic::error(),
                Severity::Warning => cs::Diagnostic::warning(),
            };
            let labels = d
                .labels
                .iter()
                .enumerate()
                .filter(|(_, l)| l.file < sources.len())
                .map(|(i, l)| {
                    let span = clamp(&sources[l.file].content, l.span.clone());
                    let label = if i == 0 {
                        cs::Label::primary(l.file, span)
                    } else {
                        cs::Label::secondary(l.file, span)
                    };
                    label.with_message(l.message.clone())
                })
                .collect();
            base.with_code(d.code.as_str())
                .with_message(d.message.clone())
                .with_labels(labels)
                .with_notes(d.notes.clone())
        })
        .collect();
    (files, out)
}

fn clamp(content: &str, span: Range<usize>) -> Range<usize> {
    let end = floor_char_boundary(content, span.end.min(content.len()));
    let start = floor_char_boundary(content, span.start.min(end));
    start..end
}

/// The rendering settings: rustc's look (`-->`, `|`, `^`), in plain ASCII.
pub fn term_config() -> codespan_reporting::term::Config {
    codespan_reporting::term::Config {
        chars: codespan_reporting::term::Chars::ascii(),
        ..Default::default()
    }
}

/// Renders diagnostics as plain text in rustc's style (no colours).
pub fn render_plain(sources: &[SourceFile], diags: &[Diagnostic]) -> String {
    let (files, list) = to_codespan(sources, diags);
    let config = term_config();
    let mut out = String::new();
    for d in &list {
        if let Ok(s) = codespan_reporting::term::emit_into_string(&config, &files, d) {
            out.push_str(&s);
        }
    }
    out
}
