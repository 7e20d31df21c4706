//! A small, strict JSON reader (RFC 8259) for the plugin configuration and the callout answers.
//!
//! Why not serde_json: the filter only ever *reads* JSON, off the request path (configure time,
//! callout answers), and serde_json with serde's derive and serde_path_to_error made up about a
//! quarter of the .wasm (issue #5 has a size target). This reader builds a tree that keeps
//! object members in document order, so the configuration step can report the first mistake
//! exactly where serde would have, field path included.
//!
//! Limits that keep hostile input harmless: nesting is capped at [`MAX_DEPTH`] (no stack
//! exhaustion), every index is checked (no panic), numbers stay as their source text (no float
//! formatting, no precision loss; callers read what they need).

use std::fmt;

/// Deepest nesting accepted, as serde_json's default recursion limit.
pub const MAX_DEPTH: usize = 128;

/// A parsed JSON value. Numbers keep their source text, already checked against the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Number(&'a str),
    String(String),
    Array(Vec<Value<'a>>),
    /// Members in document order, duplicates kept (the reader of the object decides).
    Object(Vec<(String, Value<'a>)>),
}

impl<'a> Value<'a> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number as a `u64` when its text is a plain non-negative integer that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(text) => parse_u64(text),
            _ => None,
        }
    }

    /// serde's wording for an unexpected value ("integer `1`", "map", ...), string contents
    /// left out on purpose: a string value may be a secret.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "null".to_string(),
            Value::Bool(b) => format!("boolean `{b}`"),
            Value::Number(text) if is_integer_text(text) => format!("integer `{text}`"),
            Value::Number(text) => format!("floating point `{text}`"),
            Value::String(_) => "string".to_string(),
            Value::Array(_) => "sequence".to_string(),
            Value::Object(_) => "map".to_string(),
        }
    }
}

fn is_integer_text(text: &str) -> bool {
    !text.contains(['.', 'e', 'E'])
}

fn parse_u64(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// A syntax error: what was wrong and where (1-based line and column, in bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub reason: &'static str,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at line {} column {}",
            self.reason, self.line, self.column
        )
    }
}

/// Parses one JSON document; white space around it is allowed, anything else is not.
pub fn parse(input: &[u8]) -> Result<Value<'_>, SyntaxError> {
    let mut reader = Reader { input, pos: 0 };
    let value = reader.value(0)?;
    reader.skip_white_space();
    if reader.pos < input.len() {
        return Err(reader.error_here("trailing characters"));
    }
    Ok(value)
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip_white_space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// An error at byte `at` (0-based), or at the last byte when `at` is the end of input.
    fn error_at(&self, at: usize, reason: &'static str) -> SyntaxError {
        let at = at.min(self.input.len());
        let head = self.input.get(..at).unwrap_or(self.input);
        let line = head.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = head
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |newline| newline + 1);
        let column = if at == self.input.len() {
            at - line_start
        } else {
            at - line_start + 1
        };
        SyntaxError {
            reason,
            line,
            column,
        }
    }

    fn error_here(&self, reason: &'static str) -> SyntaxError {
        self.error_at(self.pos, reason)
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, SyntaxError> {
        self.skip_white_space();
        match self.peek() {
            None => Err(self.error_here("EOF while parsing a value")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Value::String),
            Some(b't') => self.literal(b"true", Value::Bool(true)),
            Some(b'f') => self.literal(b"false", Value::Bool(false)),
            Some(b'n') => self.literal(b"null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error_here("expected value")),
        }
    }

    fn literal(&mut self, word: &[u8], value: Value<'a>) -> Result<Value<'a>, SyntaxError> {
        for &expected in word {
            match self.peek() {
                Some(b) if b == expected => self.pos += 1,
                None => return Err(self.error_here("EOF while parsing a value")),
                Some(_) => return Err(self.error_here("expected ident")),
            }
        }
        Ok(value)
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<Value<'a>, SyntaxError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            None => return Err(self.error_here("EOF while parsing a value")),
            Some(_) => return Err(self.error_here("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.error_here("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.error_here("invalid number"));
            }
        }
        let text = self
            .input
            .get(start..self.pos)
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .ok_or_else(|| self.error_at(start, "invalid number"))?;
        Ok(Value::Number(text))
    }

    fn hex4(&mut self) -> Result<u32, SyntaxError> {
        let mut code = 0u32;
        for _ in 0..4 {
            let digit = match self.peek() {
                None => return Err(self.error_here("EOF while parsing a string")),
                Some(b) => (b as char)
                    .to_digit(16)
                    .ok_or_else(|| self.error_here("invalid escape"))?,
            };
            code = code * 16 + digit;
            self.pos += 1;
        }
        Ok(code)
    }

    /// A string, the opening quote under the cursor; escapes resolved, UTF-8 checked.
    fn string(&mut self) -> Result<String, SyntaxError> {
        self.pos += 1;
        let mut bytes = Vec::new();
        loop {
            let Some(b) = self.peek() else {
                return Err(self.error_here("EOF while parsing a string"));
            };
            match b {
                b'"' => {
                    self.pos += 1;
                    break;
                }
                b'\\' => {
                    self.pos += 1;
                    let escaped = match self.peek() {
                        None => return Err(self.error_here("EOF while parsing a string")),
                        Some(e) => e,
                    };
                    self.pos += 1;
                    let c = match escaped {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return Err(self.error_at(self.pos - 1, "invalid escape")),
                    };
                    let mut buffer = [0u8; 4];
                    bytes.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
                }
                0x00..=0x1f => {
                    return Err(self.error_here(
                        "control character (\\u0000-\\u001F) found while parsing a string",
                    ))
                }
                _ => {
                    bytes.push(b);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(bytes).map_err(|_| self.error_here("invalid unicode code point"))
    }

    /// After `\u`: one code point, joining a surrogate pair.
    fn unicode_escape(&mut self) -> Result<char, SyntaxError> {
        let first = self.hex4()?;
        let code = match first {
            0xd800..=0xdbff => {
                if self.input.get(self.pos..self.pos + 2) != Some(b"\\u") {
                    return Err(self.error_here("lone leading surrogate in hex escape"));
                }
                self.pos += 2;
                let second = self.hex4()?;
                if !(0xdc00..=0xdfff).contains(&second) {
                    return Err(self.error_here("invalid unicode code point"));
                }
                0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
            }
            0xdc00..=0xdfff => return Err(self.error_here("invalid unicode code point")),
            other => other,
        };
        char::from_u32(code).ok_or_else(|| self.error_here("invalid unicode code point"))
    }

    fn array(&mut self, depth: usize) -> Result<Value<'a>, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error_here("recursion limit exceeded"));
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_white_space();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth)?);
            self.skip_white_space();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_white_space();
                    if self.peek() == Some(b']') {
                        return Err(self.error_here("trailing comma"));
                    }
                }
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                None => return Err(self.error_here("EOF while parsing a list")),
                Some(_) => return Err(self.error_here("expected `,` or `]`")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value<'a>, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error_here("recursion limit exceeded"));
        }
        self.pos += 1;
        let mut members = Vec::new();
        self.skip_white_space();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_white_space();
            match self.peek() {
                Some(b'"') => {}
                None => return Err(self.error_here("EOF while parsing an object")),
                Some(b'}') => return Err(self.error_here("trailing comma")),
                Some(_) => return Err(self.error_here("key must be a string")),
            }
            let key = self.string()?;
            self.skip_white_space();
            match self.peek() {
                Some(b':') => self.pos += 1,
                None => return Err(self.error_here("EOF while parsing an object")),
                Some(_) => return Err(self.error_here("expected `:`")),
            }
            let value = self.value(depth)?;
            members.push((key, value));
            self.skip_white_space();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                None => return Err(self.error_here("EOF while parsing an object")),
                Some(_) => return Err(self.error_here("expected `,` or `}`")),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn reads_every_kind_of_value() {
        let v = parse(
            br#" {"a": [1, -2.5e3, true, false, null], "b": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00", "a": {}} "#,
        )
        .unwrap();
        let Value::Object(members) = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            members.len(),
            3,
            "duplicates are kept for the reader to judge"
        );
        assert_eq!(
            members[0].1,
            Value::Array(vec![
                Value::Number("1"),
                Value::Number("-2.5e3"),
                Value::Bool(true),
                Value::Bool(false),
                Value::Null
            ])
        );
        assert_eq!(
            members[1].1.as_str(),
            Some("x\"\\/\u{8}\u{c}\n\r\t\u{e9}\u{1f600}")
        );
        assert_eq!(members[2], ("a".to_string(), Value::Object(vec![])));
    }

    #[test]
    fn numbers_keep_their_text() {
        assert_eq!(
            parse(b"18446744073709551615").unwrap().as_u64(),
            Some(u64::MAX)
        );
        assert_eq!(parse(b"18446744073709551616").unwrap().as_u64(), None);
        assert_eq!(parse(b"1.0").unwrap().as_u64(), None);
        assert_eq!(parse(b"-1").unwrap().as_u64(), None);
        assert_eq!(parse(b"1e3").unwrap().describe(), "floating point `1e3`");
        assert_eq!(parse(b"-3").unwrap().describe(), "integer `-3`");
    }

    /// Same wording and position as serde_json, so operators see familiar messages.
    #[test]
    fn syntax_errors_say_what_and_where() {
        let cases = [
            ("not json", "expected ident at line 1 column 2"),
            (r#"{"a":true}x"#, "trailing characters at line 1 column 11"),
            ("", "EOF while parsing a value at line 1 column 0"),
            ("{", "EOF while parsing an object at line 1 column 1"),
            ("[1", "EOF while parsing a list at line 1 column 2"),
            ("\"abc", "EOF while parsing a string at line 1 column 4"),
            ("{\n \"a\" 1}", "expected `:` at line 2 column 6"),
            ("[1 2]", "expected `,` or `]` at line 1 column 4"),
            (r#"{"a":1 "b"}"#, "expected `,` or `}` at line 1 column 8"),
            ("{1:2}", "key must be a string at line 1 column 2"),
            ("[1,]", "trailing comma at line 1 column 4"),
            (r#"{"a":1,}"#, "trailing comma at line 1 column 8"),
            ("-x", "invalid number at line 1 column 2"),
            ("1.", "invalid number at line 1 column 2"),
            ("1e+", "invalid number at line 1 column 3"),
            (r#""\q""#, "invalid escape at line 1 column 3"),
            (r#""\u12x4""#, "invalid escape at line 1 column 6"),
            (r#""\ud800""#, "lone leading surrogate in hex escape at line 1 column 8"),
            (r#""\udc00""#, "invalid unicode code point at line 1 column 8"),
            ("\"a\u{1}\"", "control character (\\u0000-\\u001F) found while parsing a string at line 1 column 3"),
            ("@", "expected value at line 1 column 1"),
            ("01", "trailing characters at line 1 column 2"),
        ];
        for (text, want) in cases {
            assert_eq!(err(text), want, "for {text:?}");
        }
        assert_eq!(
            parse(b"\"\xff\"").unwrap_err().reason,
            "invalid unicode code point"
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let deep_ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(deep_ok.as_bytes()).is_ok());
        let too_deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(
            parse(too_deep.as_bytes()).unwrap_err().reason,
            "recursion limit exceeded"
        );
        // Far deeper than any stack would take by recursion: refused before it recurses.
        let hostile = "[{\"a\":".repeat(100_000);
        assert!(parse(hostile.as_bytes()).is_err());
    }
}
