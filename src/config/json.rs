//! A JSON reader with Go `encoding/json` semantics where they matter: objects
//! keep document order and duplicate keys, numbers keep their literal text.

/// A parsed JSON value; objects keep document order and duplicate keys.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Json {
    Null,
    Bool(bool),
    /// The literal as written, validated against the JSON number grammar.
    Number(String),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The word Go uses for this kind of value in type errors.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "bool",
            Json::Number(_) => "number",
            Json::Str(_) => "string",
            Json::Array(_) => "array",
            Json::Object(_) => "object",
        }
    }
}

/// Nesting bound; Go allows 10000, but recursion that deep could overflow a
/// small thread stack and no configuration nests beyond a handful of levels.
pub(super) const MAX_DEPTH: usize = 256;

pub(super) fn parse_json(bytes: &[u8]) -> Result<Json, String> {
    let mut p = JsonParser {
        b: bytes,
        i: 0,
        depth: 0,
    };
    let v = p.value()?;
    p.ws();
    match p.peek() {
        None => Ok(v),
        Some(c) => Err(invalid(c, "after top-level value")),
    }
}

fn eof() -> String {
    "unexpected end of JSON input".to_string()
}

fn invalid(c: u8, context: &str) -> String {
    format!("invalid character {} {context}", quote_char(c))
}

/// Go's `quoteChar`: the byte as a rune, quoted like `strconv.Quote` in single quotes.
fn quote_char(c: u8) -> String {
    match c {
        b'\'' => "'\\''".to_string(),
        b'"' => "'\"'".to_string(),
        _ => {
            let inner = match c {
                0x07 => "\\a".to_string(),
                0x08 => "\\b".to_string(),
                0x0c => "\\f".to_string(),
                b'\n' => "\\n".to_string(),
                b'\r' => "\\r".to_string(),
                b'\t' => "\\t".to_string(),
                0x0b => "\\v".to_string(),
                b'\\' => "\\\\".to_string(),
                0x00..=0x1f | 0x7f => format!("\\x{c:02x}"),
                0x80..=0xa0 | 0xad => format!("\\u{c:04x}"),
                _ => char::from(c).to_string(),
            };
            format!("'{inner}'")
        }
    }
}

struct JsonParser<'a> {
    b: &'a [u8],
    i: usize,
    depth: usize,
}

impl JsonParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Result<u8, String> {
        let c = self.peek().ok_or_else(eof)?;
        self.i += 1;
        Ok(c)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.peek().ok_or_else(eof)? {
            b'{' => self.nested(Self::object),
            b'[' => self.nested(Self::array),
            b'"' => self.string().map(Json::Str),
            b't' => self.literal("true", Json::Bool(true)),
            b'f' => self.literal("false", Json::Bool(false)),
            b'n' => self.literal("null", Json::Null),
            b'-' | b'0'..=b'9' => self.number(),
            c => Err(invalid(c, "looking for beginning of value")),
        }
    }

    fn nested(&mut self, f: fn(&mut Self) -> Result<Json, String>) -> Result<Json, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("exceeded max depth".to_string());
        }
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json, String> {
        self.i += 1;
        for &want in &word.as_bytes()[1..] {
            let c = self.next()?;
            if c != want {
                let ctx = format!("in literal {word} (expecting {})", quote_char(want));
                return Err(invalid(c, &ctx));
            }
        }
        Ok(v)
    }

    fn object(&mut self) -> Result<Json, String> {
        self.i += 1;
        let mut members = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Json::Object(members));
        }
        loop {
            self.ws();
            match self.peek().ok_or_else(eof)? {
                b'"' => {}
                c => return Err(invalid(c, "looking for beginning of object key string")),
            }
            let key = self.string()?;
            self.ws();
            match self.next()? {
                b':' => {}
                c => return Err(invalid(c, "after object key")),
            }
            let v = self.value()?;
            members.push((key, v));
            self.ws();
            match self.next()? {
                b',' => {}
                b'}' => return Ok(Json::Object(members)),
                c => return Err(invalid(c, "after object key:value pair")),
            }
        }
    }

    fn array(&mut self) -> Result<Json, String> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Json::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.ws();
            match self.next()? {
                b',' => {}
                b']' => return Ok(Json::Array(items)),
                c => return Err(invalid(c, "after array element")),
            }
        }
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
            match self.peek().ok_or_else(eof)? {
                b'0'..=b'9' => {}
                c => return Err(invalid(c, "in numeric literal")),
            }
        }
        // A leading 0 stands alone; "01" ends the number after the 0.
        if self.peek() == Some(b'0') {
            self.i += 1;
        } else {
            self.digits();
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            match self.peek().ok_or_else(eof)? {
                b'0'..=b'9' => self.digits(),
                c => return Err(invalid(c, "after decimal point in numeric literal")),
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            match self.peek().ok_or_else(eof)? {
                b'0'..=b'9' => self.digits(),
                c => return Err(invalid(c, "in exponent of numeric literal")),
            }
        }
        // Only ASCII bytes were consumed, so this cannot fail.
        let lit = String::from_utf8_lossy(&self.b[start..self.i]).into_owned();
        Ok(Json::Number(lit))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let mut n = 0;
        for _ in 0..4 {
            let c = self.next()?;
            let d = char::from(c)
                .to_digit(16)
                .ok_or_else(|| invalid(c, "in \\u hexadecimal character escape"))?;
            n = n * 16 + d;
        }
        Ok(n)
    }

    /// A string literal; invalid UTF-8 and lone surrogates become U+FFFD as in Go.
    fn string(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out: Vec<u8> = Vec::new();
        let push = |out: &mut Vec<u8>, ch: char| {
            let mut buf = [0u8; 4];
            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
        };
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => match self.next()? {
                    c @ (b'"' | b'\\' | b'/') => out.push(c),
                    b'b' => out.push(0x08),
                    b'f' => out.push(0x0c),
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'u' => {
                        let hi = self.hex4()?;
                        let ch = if (0xd800..0xdc00).contains(&hi) {
                            // Combine with a following low surrogate escape, if any;
                            // otherwise leave that escape for the next iteration.
                            match self.low_surrogate() {
                                Some(lo) => {
                                    char::from_u32(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00))
                                }
                                None => None,
                            }
                        } else {
                            char::from_u32(hi)
                        };
                        push(&mut out, ch.unwrap_or(char::REPLACEMENT_CHARACTER));
                    }
                    c => return Err(invalid(c, "in string escape code")),
                },
                c if c < 0x20 => return Err(invalid(c, "in string literal")),
                c => out.push(c),
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn low_surrogate(&mut self) -> Option<u32> {
        let rest = self.b.get(self.i..self.i + 6)?;
        if rest[0] != b'\\' || rest[1] != b'u' {
            return None;
        }
        let hex = std::str::from_utf8(&rest[2..]).ok()?;
        let lo = u32::from_str_radix(hex, 16).ok()?;
        if hex.bytes().all(|b| b.is_ascii_hexdigit()) && (0xdc00..0xe000).contains(&lo) {
            self.i += 6;
            Some(lo)
        } else {
            None
        }
    }
}
