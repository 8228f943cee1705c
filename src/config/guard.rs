//! A linear pre-scan of config text that enforces the limits of reliability case 40 before the
//! YAML parser sees it: a bounded size, a bounded nesting depth, and no anchors or aliases.
//!
//! Why a pre-scan: libyaml (under serde_yaml and its forks) spends time quadratic in the depth of
//! flow collections (`[[[[` or `{a: {a: ...`): 40,000 levels took 4 s and 100,000 levels 23 s at
//! 100% CPU, before serde ever ran. This scan visits each character once, keeps a stack no deeper
//! than [`MAX_DEPTH`], and refuses the text at the line and column of the first offending token,
//! so no parser is handed input it could choke on, whichever parser that is.
//!
//! It is not a YAML parser. It follows just enough of libyaml's lexical rules (where a token
//! starts, quoted and plain scalars and their continuation lines, comments, block scalars, flow
//! brackets, block indentation, `- `, `?` and `key:` indicators, tags, line breaks including NEL
//! and LS) to count nesting and see anchors. Where it cannot be exact it counts high (a bracket
//! that libyaml would refuse anyway, a tag cut short): it may refuse a file near the limit that
//! libyaml would take, never pass one that goes deeper. `tests/config_guard.rs` holds it to that
//! against libyaml's own event stream on generated text.

use std::fmt;

/// Deepest nesting (block and flow collections together) a config file may have. The deepest
/// path the schema itself has is about ten levels (`routes[].rules[].matches[].headers[].name`
/// inside the root mapping); 64 leaves ample room for hand-written flow style while keeping the
/// parser's work and the deserializer's recursion small (serde_yaml's own recursion limit is 128).
pub const MAX_DEPTH: usize = 64;

/// Largest config file read or parsed. A Kubernetes ConfigMap holds at most 1 MiB, and a model of
/// 10,000 workloads written out in block style is about 2 MiB; 16 MiB leaves room for that and
/// bounds the memory and the (linear) parse time an oversized or endless file (a FIFO,
/// `/dev/zero`) can cost.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;

/// Why text was refused, with the 1-based position of the token that broke the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Checks `text` against the depth and alias limits. Linear in `text.len()`; the caller bounds
/// the length with [`MAX_BYTES`].
pub fn check(text: &str) -> Result<(), Refusal> {
    Scanner::new(text).run()
}

/// A block collection that is open: the column its entries start at, and whether it is a
/// sequence (`- ` entries) or a mapping (`key:` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    column: usize,
    sequence: bool,
}

/// Where the scanner is inside a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Ordinary content.
    Normal,
    /// Inside `'...'`.
    SingleQuoted,
    /// Inside `"..."`.
    DoubleQuoted,
    /// Inside a `|` or `>` scalar: lines indented at least `indent` (given by an indentation
    /// indicator, or taken from the first content line) are content; `min` is the least
    /// indentation content may have.
    BlockScalar { min: usize, indent: Option<usize> },
}

struct Scanner<'a> {
    text: &'a str,
    pos: usize,
    /// 1-based line and 0-based column (in characters) of `pos`.
    line: usize,
    column: usize,
    blocks: Vec<Block>,
    flow: usize,
    mode: Mode,
    /// The next token would start a node: a quote, `&`, `*`, `|`, `>`, `[`, `{`, `-`, `?` here
    /// are indicators, not part of a plain scalar.
    node_start: bool,
    /// Column where the current block-context entry (a key or a `- ` item) started on this line.
    entry_column: usize,
    /// The previous character was part of a plain scalar's text: a `#` right after it is text
    /// too. Anywhere else `#` starts a comment (libyaml reads `#` at a token's start as one).
    in_word: bool,
    /// Inside a plain (unquoted) scalar in block context: a more-indented next line continues
    /// its text, where brackets, quotes and dashes are only characters.
    plain: bool,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str) -> Self {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        Scanner {
            text,
            pos: 0,
            line: 1,
            column: 0,
            blocks: Vec::new(),
            flow: 0,
            mode: Mode::Normal,
            node_start: true,
            entry_column: 0,
            in_word: false,
            plain: false,
        }
    }

    /// The character starting at byte `i` (ASCII, nearly all of a config, without decoding).
    fn char_at(&self, i: usize) -> Option<char> {
        let b = *self.text.as_bytes().get(i)?;
        if b.is_ascii() {
            Some(char::from(b))
        } else {
            self.text[i..].chars().next()
        }
    }

    fn peek(&self) -> Option<char> {
        self.char_at(self.pos)
    }

    /// The character after the next one.
    fn peek_second(&self) -> Option<char> {
        self.char_at(self.pos + self.peek()?.len_utf8())
    }

    /// Line breaks as YAML 1.1 (libyaml) knows them: LF, CR, CRLF, NEL, LS, PS. Treating one of
    /// these as ordinary text would let a comment "hide" the line after it from this scan.
    fn is_break(c: char) -> bool {
        matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}')
    }

    fn is_blank_or_end(c: Option<char>) -> bool {
        match c {
            None => true,
            Some(c) => c == ' ' || c == '\t' || Self::is_break(c),
        }
    }

    /// Consumes the ASCII bytes for which `keep` holds, at once: the fast path over the text of
    /// scalars and comments. `keep` must refuse line breaks (and sees no non-ASCII byte).
    fn skip_ascii(&mut self, keep: impl Fn(u8) -> bool) {
        let run = self.text.as_bytes()[self.pos..]
            .iter()
            .take_while(|&&b| b.is_ascii() && b != b'\n' && b != b'\r' && keep(b))
            .count();
        self.pos += run;
        self.column += run;
    }

    /// Consumes one character, keeping line and column.
    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        if Self::is_break(c) {
            if c == '\r' && self.peek() == Some('\n') {
                self.pos += 1;
            }
            self.line += 1;
            self.column = 0;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    fn refuse(&self, line: usize, column: usize, message: String) -> Refusal {
        Refusal {
            line,
            column: column + 1,
            message,
        }
    }

    /// After a closing quote nothing can continue the scalar, so a bracket or `&` that follows
    /// is read as an indicator: counting too much is safe, too little is not.
    fn end_quote(&mut self) {
        self.mode = Mode::Normal;
        self.in_word = false;
        self.node_start = true;
    }

    fn depth(&self) -> usize {
        self.blocks.len() + self.flow
    }

    fn too_deep(&self, column: usize) -> Refusal {
        self.refuse(
            self.line,
            column,
            format!(
                "nesting deeper than {MAX_DEPTH} levels (MAX_DEPTH); a config never needs this \
                 much and deep input is refused before parsing"
            ),
        )
    }

    /// Makes sure a block collection of the given kind is open at `column` (a `key:` or a `- `
    /// entry was found there).
    fn open_block(&mut self, column: usize, sequence: bool) -> Result<(), Refusal> {
        while self.blocks.last().is_some_and(|b| b.column > column) {
            self.blocks.pop();
        }
        match self.blocks.last() {
            Some(b) if b.column == column && b.sequence == sequence => return Ok(()),
            // A mapping key at the column of an "indentless" sequence (`key:\n- a` puts the
            // sequence at the key's column) ends that sequence.
            Some(b) if b.column == column && b.sequence && !sequence => {
                self.blocks.pop();
                if self
                    .blocks
                    .last()
                    .is_some_and(|b| b.column == column && !b.sequence)
                {
                    return Ok(());
                }
            }
            _ => {}
        }
        self.blocks.push(Block { column, sequence });
        if self.depth() > MAX_DEPTH {
            return Err(self.too_deep(column));
        }
        Ok(())
    }

    fn run(mut self) -> Result<(), Refusal> {
        while self.pos < self.text.len() {
            match self.mode {
                Mode::BlockScalar { .. } => self.block_scalar_line()?,
                _ => self.line_content()?,
            }
        }
        Ok(())
    }

    /// One line (from its start) of a block scalar, or the line that ends it.
    fn block_scalar_line(&mut self) -> Result<(), Refusal> {
        let Mode::BlockScalar { min, indent } = self.mode else {
            return Ok(());
        };
        let rest = &self.text[self.pos..];
        let spaces = rest.bytes().take_while(|&b| b == b' ').count();
        let after = rest[spaces..].chars().next();
        let blank = after.is_none_or(Self::is_break);
        let is_content = match indent {
            _ if blank => true,
            Some(i) => spaces >= i,
            None => spaces >= min,
        };
        if !is_content {
            self.mode = Mode::Normal;
            return self.line_content();
        }
        if !blank && indent.is_none() {
            self.mode = Mode::BlockScalar {
                min,
                indent: Some(spaces),
            };
        }
        // Skip the whole line: its text is the scalar's, whatever it looks like.
        self.skip_ascii(|_| true);
        while let Some(c) = self.bump() {
            if Self::is_break(c) {
                break;
            }
        }
        Ok(())
    }

    /// Scans from the current position to the end of the line (or of the text), or, inside a
    /// quoted scalar, until the scalar ends.
    fn line_content(&mut self) -> Result<(), Refusal> {
        let at_line_start = self.column == 0;
        if at_line_start && matches!(self.mode, Mode::Normal) {
            self.in_word = false;
            // libyaml skips a byte-order mark at the start of any line, not only the first.
            if self.text[self.pos..].starts_with('\u{feff}') {
                self.bump();
            }
            let rest = &self.text[self.pos..];
            let spaces = rest.bytes().take_while(|&b| b == b' ').count();
            for _ in 0..spaces {
                self.bump();
            }
            let first = self.peek();
            if Self::is_blank_or_end(first) || first == Some('#') {
                // A blank or comment-only line says nothing about structure.
                return self.rest_of_line();
            }
            if self.column == 0
                && (rest.starts_with("---") || rest.starts_with("..."))
                && Self::is_blank_or_end(rest[3..].chars().next())
            {
                // A document marker: everything before it is closed.
                self.plain = false;
                self.blocks.clear();
                self.flow = 0;
                for _ in 0..3 {
                    self.bump();
                }
                self.node_start = true;
                self.entry_column = self.column + 1;
                return self.rest_of_line();
            }
            if self.flow == 0 && self.plain {
                // libyaml continues a plain scalar on any line indented past the collection
                // the scalar belongs to.
                let min = self.blocks.last().map_or(0, |b| b.column + 1);
                if self.column >= min {
                    return self.rest_of_line();
                }
                self.plain = false;
            }
            if self.flow == 0 {
                // Leaving less-indented lines closes the deeper block collections.
                let column = self.column;
                while self.blocks.last().is_some_and(|b| b.column > column) {
                    self.blocks.pop();
                }
                self.node_start = true;
                self.entry_column = column;
            }
        }
        self.rest_of_line()
    }

    fn rest_of_line(&mut self) -> Result<(), Refusal> {
        while let Some(c) = self.peek() {
            match self.mode {
                // A quoted scalar may span lines: the indentation of its lines means nothing.
                Mode::SingleQuoted => {
                    self.skip_ascii(|b| b != b'\'');
                    let Some(c) = self.peek() else { break };
                    self.bump();
                    if c == '\'' {
                        if self.peek() == Some('\'') {
                            self.bump();
                        } else {
                            self.end_quote();
                        }
                    }
                    continue;
                }
                Mode::DoubleQuoted => {
                    self.skip_ascii(|b| b != b'"' && b != b'\\');
                    let Some(c) = self.peek() else { break };
                    self.bump();
                    if c == '\\' {
                        // Escaped character (an escaped line break included).
                        self.bump();
                    } else if c == '"' {
                        self.end_quote();
                    }
                    continue;
                }
                Mode::BlockScalar { .. } => return Ok(()),
                Mode::Normal => {}
            }
            if Self::is_break(c) {
                self.bump();
                return Ok(());
            }
            if c == ' ' || c == '\t' {
                self.bump();
                self.in_word = false;
                continue;
            }
            if c == '#' && !self.in_word {
                // A comment runs to the end of the line, and ends a plain scalar.
                self.plain = false;
                self.skip_ascii(|_| true);
                while let Some(c) = self.peek() {
                    if Self::is_break(c) {
                        break;
                    }
                    self.bump();
                }
                continue;
            }
            let (line, column) = (self.line, self.column);
            let next = self.peek_second();
            let mut word = false;
            if !matches!(c, ' ' | '\t') {
                // Whatever comes next, unless it is more text (below), ends a plain scalar.
                self.plain = false;
            }
            match c {
                '[' | '{' if self.node_start || self.flow > 0 => {
                    self.bump();
                    self.flow += 1;
                    if self.depth() > MAX_DEPTH {
                        return Err(self.too_deep(column));
                    }
                    self.node_start = true;
                }
                ']' | '}' if self.flow > 0 => {
                    self.bump();
                    self.flow -= 1;
                    // libyaml's scanner starts a token after it, whatever the parser then
                    // makes of that token.
                    self.node_start = true;
                }
                ',' if self.flow > 0 => {
                    self.bump();
                    self.node_start = true;
                }
                '&' | '*' if self.node_start => {
                    let what = if c == '&' { "an anchor" } else { "an alias" };
                    return Err(self.refuse(
                        line,
                        column,
                        format!(
                            "{what} ({c}name): anchors and aliases are not accepted in config \
                             files, because an alias can expand a small file into an enormous one; \
                             write the value out"
                        ),
                    ));
                }
                '\'' if self.node_start => {
                    self.bump();
                    self.mode = Mode::SingleQuoted;
                    self.node_start = false;
                }
                '"' if self.node_start => {
                    self.bump();
                    self.mode = Mode::DoubleQuoted;
                    self.node_start = false;
                }
                '!' if self.node_start => {
                    // A tag, a property of the node that follows: `!<verbatim>`, or a handle and
                    // suffix of URI characters (libyaml's set; anything else ends the tag).
                    self.bump();
                    if self.peek() == Some('<') {
                        while let Some(c) = self.peek() {
                            if Self::is_blank_or_end(Some(c)) {
                                break;
                            }
                            self.bump();
                            if c == '>' {
                                break;
                            }
                        }
                    } else {
                        self.skip_ascii(|b| {
                            b.is_ascii_alphanumeric() || b"-_;/?:@&=+$.%!~*'()".contains(&b)
                        });
                    }
                }
                // In flow context `- ` and `?` are tokens too (the parser refuses the first).
                '-' | '?'
                    if self.node_start
                        && self.flow > 0
                        && (c == '?' || Self::is_blank_or_end(next)) =>
                {
                    self.bump();
                    self.node_start = true;
                }
                '-' | '?' if self.node_start && self.flow == 0 && Self::is_blank_or_end(next) => {
                    // `- item` or `? key`: a block collection entry at this column, and the
                    // entry's content starts a node one level down.
                    self.open_block(column, c == '-')?;
                    self.bump();
                    let spaces = self.text[self.pos..]
                        .bytes()
                        .take_while(|&b| b == b' ')
                        .count();
                    self.entry_column = self.column + spaces;
                    self.node_start = true;
                }
                ':' if Self::is_blank_or_end(next)
                    || (self.flow > 0
                        && (self.node_start
                            || matches!(next, Some(',' | '?' | ']' | '}' | '[' | '{')))) =>
                {
                    // The value indicator: in block context, what came before on this line
                    // was a key of a mapping that starts at the entry's column.
                    if self.flow == 0 {
                        self.open_block(self.entry_column, false)?;
                    }
                    self.bump();
                    self.node_start = true;
                }
                '|' | '>' if self.node_start && self.flow == 0 => {
                    self.bump();
                    self.start_block_scalar();
                    return Ok(());
                }
                _ => {
                    self.bump();
                    self.node_start = false;
                    self.plain = self.flow == 0;
                    word = true;
                    // The rest of a plain word: nothing in it can be an indicator.
                    self.skip_ascii(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'/' | b'_' | b'-')
                    });
                }
            }
            self.in_word = word;
        }
        Ok(())
    }

    /// After `|` or `>`: reads the header (indentation digit and chomping indicator, in either
    /// order, then an optional comment) and enters block-scalar mode for the lines that follow.
    fn start_block_scalar(&mut self) {
        // The scalar's content must be indented more than the collection it is a value of
        // (libyaml: the current indent plus one, and at least one).
        let parent = self.blocks.last().map(|b| b.column as isize).unwrap_or(-1);
        let mut explicit = None;
        for _ in 0..2 {
            match self.peek() {
                Some(d @ '1'..='9') => {
                    explicit = d.to_digit(10).map(|d| d as usize);
                    self.bump();
                }
                Some('+' | '-') => {
                    self.bump();
                }
                _ => break,
            }
        }
        // The rest of the header line is white space and a comment.
        while let Some(c) = self.bump() {
            if Self::is_break(c) {
                break;
            }
        }
        let min = (parent + 1).max(1) as usize;
        let indent = explicit.map(|n| (parent.max(0) as usize) + n);
        // An explicit indent may not be below what auto-detection would require.
        let indent = indent.map(|i| i.max(min));
        self.mode = Mode::BlockScalar { min, indent };
        self.node_start = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_error(text: &str) -> Refusal {
        let e = check(text).expect_err("refused");
        assert!(e.message.contains("nesting deeper than 64"), "{e}");
        e
    }

    #[test]
    fn ordinary_configs_pass() {
        for text in [
            crate::config::EMBEDDED_DEFAULT,
            include_str!("../../examples/vm-host.yaml"),
            include_str!("../../examples/waypoint.yaml"),
            include_str!("../../examples/in-pod-node.yaml"),
            include_str!("../../examples/static-certs.yaml"),
            "a: 'it''s'\nb: \"x\\\"y\"\nc: it's * & fine\nd: [\"*x\", '&y', \"[\", '{']\n",
            "k: |\n  [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n  &x *y\nn: 1\n",
            "k: >-\n    {{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{\nn: 1\n",
            "# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\na: b # &x\n",
            "a: b#c\nurl: http://x/#frag\nre: \"^(a|b)*$\"\n",
        ] {
            assert_eq!(check(text), Ok(()), "{text}");
        }
    }

    #[test]
    fn flow_nesting_is_refused_at_the_opening_bracket() {
        let ok = format!("node: {}{}\n", "[".repeat(63), "]".repeat(63));
        assert_eq!(check(&ok), Ok(()), "63 flow levels in a 1-level map");
        let deep = format!("node: {}{}\n", "[".repeat(64), "]".repeat(64));
        let e = depth_error(&deep);
        assert_eq!((e.line, e.column), (1, 7 + 63));
        let maps = format!("node: {}x{}\n", "{a: ".repeat(100_000), "}".repeat(100_000));
        let e = depth_error(&maps);
        assert_eq!((e.line, e.column), (1, 7 + 63 * 4));
        // Brackets over several lines count the same.
        let lines = format!("node:\n{}", "  [\n".repeat(100));
        assert_eq!(depth_error(&lines).line, 65);
    }

    #[test]
    fn block_nesting_is_refused_at_the_entry_that_goes_too_deep() {
        // `- - - x`: one sequence level per dash.
        let ok = format!("{}x\n", "- ".repeat(64));
        assert_eq!(check(&ok), Ok(()));
        let e = depth_error(&format!("{}x\n", "- ".repeat(100_000)));
        assert_eq!((e.line, e.column), (1, 64 * 2 + 1));
        // Indented mappings.
        let nested = |n: usize| {
            (0..n)
                .map(|i| format!("{}a{i}:\n", " ".repeat(i)))
                .collect::<String>()
        };
        assert_eq!(check(&nested(64)), Ok(()));
        let e = depth_error(&nested(65));
        assert_eq!((e.line, e.column), (65, 65));
        // Indentless sequences (`key:\n- x` at the key's column) are levels too.
        let indentless = |n: usize| {
            (0..n)
                .map(|i| format!("{}k:\n{}- ", " ".repeat(2 * i), " ".repeat(2 * i)))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(check(&indentless(32)), Ok(()));
        depth_error(&indentless(33));
        // Block and flow add up.
        let mixed = format!("{}{}x{}\n", "- ".repeat(40), "[".repeat(30), "]".repeat(30));
        depth_error(&mixed);
    }

    #[test]
    fn anchors_and_aliases_are_refused_where_they_stand() {
        let e = check("a: &x [1, 2]\nb: *x\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 4));
        assert!(e.message.contains("anchor"), "{e}");
        let e = check("a: [1, *x]\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 8));
        assert!(e.message.contains("alias"), "{e}");
        let e = check("- &a\n  - *a\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 3));
        let e = check("k: !!str &a v\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 10));
    }

    #[test]
    fn what_hides_from_a_naive_scan_is_still_seen() {
        // A NEL or LINE SEPARATOR is a line break to libyaml: it ends a comment.
        let nel = format!("a: 1 # c\u{2028}b: {}\n", "[".repeat(100));
        assert_eq!(depth_error(&nel).line, 2);
        // A line less indented than the block scalar's content ends the scalar.
        let after = format!("- k: |\n    text\n  j: {}\n", "[".repeat(100));
        assert_eq!(depth_error(&after).line, 3);
        // Content must be indented past the mapping the scalar belongs to.
        let sibling = format!("- k: |\n  j: {}\n", "[".repeat(100));
        assert_eq!(depth_error(&sibling).line, 2);
        // A quote ends where YAML says, so text after it is scanned.
        let q = format!("a: 'x''y' {}\n", "[".repeat(100));
        depth_error(&q);
        let t = format!("a: !t{}\n", "[".repeat(100));
        depth_error(&t);
        let q = format!("a: ['x''y', {}\n", "[".repeat(100));
        depth_error(&q);
    }

    #[test]
    fn the_scan_is_linear() {
        // 4 MiB of each pathological shape is scanned (and refused or passed) quickly; a
        // quadratic scan would take minutes here.
        let started = std::time::Instant::now();
        let n = 4 << 20;
        let _ = check(&"[".repeat(n));
        let _ = check(&"- ".repeat(n / 2));
        let _ = check(&"a: 'x''".repeat(n / 8));
        let _ = check(&format!("k: |\n{}", "  [[[[[[[[\n".repeat(n / 12)));
        assert_eq!(check(&"- a: [b, {c: d}] # e\n".repeat(n / 24)), Ok(()));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
