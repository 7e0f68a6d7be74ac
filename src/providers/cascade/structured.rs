//! The model's structured output, read while it streams, with a fallback that never loses text.
//!
//! The prompt asks for one JSON object: `{"emotion": "...", "text": "...", "gesture": "...",
//! "actions": [...]}` (emotion first, so it can be shown before the words). [`StructuredReader`]
//! takes the raw deltas and yields [`Piece`]s as soon as they can be known: the characters of
//! `text` as they arrive (JSON escapes decoded), the emotion when its string closes.
//!
//! Fallbacks, in order: output that does not start with `{` (after an optional ```` ```json ````
//! fence) is plain text and spoken as is; a JSON object without a `text` string (or one that
//! never closes) is, at the end, parsed leniently: the string values of `reply`, `response`,
//! `message`, `content` or `answer` are used, else the raw output with its JSON punctuation
//! removed. Whatever the model wrote, its words reach the user.

use serde_json::Value;

/// Something learned from the model's output.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// More words to speak.
    Text(String),
    /// The reply's emotion.
    Emotion(String),
    /// A gesture for the avatar.
    Gesture(String),
    /// Actions the model asked for (not executed by the cascade; reported).
    Actions(Value),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Undecided,
    Plain,
    Json,
}

/// Streaming reader (sans-IO).
#[derive(Debug)]
pub struct StructuredReader {
    mode: Mode,
    raw: String,
    /// Byte offset in `raw` of the next undecoded character of the `text` value.
    text_cursor: Option<usize>,
    text_closed: bool,
    text_emitted: bool,
    emotion_sent: bool,
    /// Whether the output was JSON that we had to read with a fallback.
    pub malformed: bool,
}

impl Default for StructuredReader {
    fn default() -> Self {
        Self {
            mode: Mode::Undecided,
            raw: String::new(),
            text_cursor: None,
            text_closed: false,
            text_emitted: false,
            emotion_sent: false,
            malformed: false,
        }
    }
}

impl StructuredReader {
    /// Add a delta of the model's output.
    pub fn push(&mut self, delta: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        if self.mode == Mode::Plain {
            if !delta.is_empty() {
                out.push(Piece::Text(delta.to_owned()));
            }
            return out;
        }
        self.raw.push_str(delta);
        if self.mode == Mode::Undecided {
            let head = strip_fence(&self.raw);
            let trimmed = head.trim_start();
            if trimmed.is_empty() || (self.raw.trim_start().starts_with('`') && !self.raw.contains('\n')) {
                return out; // wait for the first significant character
            }
            if trimmed.starts_with('{') {
                self.mode = Mode::Json;
            } else {
                self.mode = Mode::Plain;
                let all = std::mem::take(&mut self.raw);
                out.push(Piece::Text(all));
                return out;
            }
        }
        if !self.emotion_sent
            && let Some(e) = find_string_field(&self.raw, "emotion")
        {
            self.emotion_sent = true;
            out.push(Piece::Emotion(e));
        }
        if self.text_cursor.is_none()
            && let Some(at) = find_value_start(&self.raw, "text")
        {
            self.text_cursor = Some(at);
        }
        if let Some(t) = self.decode_text()
            && !t.is_empty()
        {
            self.text_emitted = true;
            out.push(Piece::Text(t));
        }
        out
    }

    /// The output is complete.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        if self.mode == Mode::Undecided {
            let rest = strip_fence(&self.raw).trim().to_owned();
            if !rest.is_empty() {
                out.push(Piece::Text(rest));
            }
            return out;
        }
        if self.mode == Mode::Plain {
            return out;
        }
        let body = strip_fence(&self.raw).trim().trim_end_matches("```").trim();
        let parsed: Option<Value> = serde_json::from_str(body).ok();
        if parsed.is_none() {
            self.malformed = true;
        }
        if let Some(v) = &parsed {
            if !self.emotion_sent
                && let Some(e) = v.get("emotion").and_then(Value::as_str)
            {
                out.push(Piece::Emotion(e.to_owned()));
            }
            if let Some(g) = v.get("gesture").and_then(Value::as_str)
                && !g.is_empty()
            {
                out.push(Piece::Gesture(g.to_owned()));
            }
            if let Some(a) = v.get("actions")
                && !a.is_null()
            {
                out.push(Piece::Actions(a.clone()));
            }
        }
        if !self.text_emitted {
            self.malformed = true;
            let text = parsed
                .as_ref()
                .and_then(|v| {
                    ["text", "reply", "response", "message", "content", "answer"]
                        .iter()
                        .find_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_owned))
                })
                .unwrap_or_else(|| strip_json_punctuation(body));
            if !text.trim().is_empty() {
                out.push(Piece::Text(text.trim().to_owned()));
            }
        }
        out
    }

    /// Decode as much of the `text` string as has arrived.
    fn decode_text(&mut self) -> Option<String> {
        let start = self.text_cursor?;
        if self.text_closed {
            return None;
        }
        let bytes = &self.raw[start..];
        let mut out = String::new();
        let mut consumed = 0;
        let mut chars = bytes.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.text_closed = true;
                    consumed = i + 1;
                    break;
                }
                '\\' => {
                    let Some((_, e)) = chars.next() else { break };
                    match e {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => {}
                        'b' | 'f' => {}
                        'u' => {
                            let hex = bytes.get(i + 2..i + 6);
                            let Some(hex) = hex else { break };
                            if let Some(ch) = u32::from_str_radix(hex, 16).ok().and_then(char::from_u32) {
                                out.push(ch);
                            }
                            for _ in 0..4 {
                                chars.next();
                            }
                            consumed = i + 6;
                            continue;
                        }
                        other => out.push(other),
                    }
                    consumed = i + 1 + e.len_utf8();
                }
                c => {
                    out.push(c);
                    consumed = i + c.len_utf8();
                }
            }
        }
        self.text_cursor = Some(start + consumed);
        Some(out)
    }
}

fn strip_fence(s: &str) -> &str {
    let t = s.trim_start();
    match t.strip_prefix("```") {
        Some(rest) => rest.split_once('\n').map_or("", |(_, body)| body),
        None => t,
    }
}

/// Byte offset just past the opening quote of `"key": "`, when present.
fn find_value_start(raw: &str, key: &str) -> Option<usize> {
    let pat = format!("\"{key}\"");
    let mut from = 0;
    while let Some(k) = raw[from..].find(&pat) {
        let after = from + k + pat.len();
        let rest = &raw[after..];
        let r = rest.trim_start();
        if let Some(r2) = r.strip_prefix(':') {
            let r3 = r2.trim_start();
            if let Some(stripped) = r3.strip_prefix('"') {
                return Some(raw.len() - stripped.len());
            }
            if r3.is_empty() {
                return None; // value not here yet
            }
        }
        from = after;
    }
    None
}

/// A complete simple string value of `key` (no escapes needed for emotion names).
fn find_string_field(raw: &str, key: &str) -> Option<String> {
    let start = find_value_start(raw, key)?;
    let end = raw[start..].find('"')?;
    Some(raw[start..start + end].to_owned())
}

/// Keep the words of broken JSON: drop keys, braces and quotes.
fn strip_json_punctuation(body: &str) -> String {
    let mut s = body.to_owned();
    for key in ["\"emotion\"", "\"gesture\"", "\"actions\"", "\"text\""] {
        s = s.replace(&format!("{key}:"), " ").replace(key, " ");
    }
    let cleaned: String = s.chars().map(|c| if matches!(c, '{' | '}' | '"' | '[' | ']') { ' ' } else { c }).collect();
    let words: Vec<&str> = cleaned.split_whitespace().collect();
    words.join(" ").trim_matches(|c: char| c == ',' || c == ':' || c.is_whitespace()).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(deltas: &[&str]) -> (Vec<Piece>, bool) {
        let mut r = StructuredReader::default();
        let mut out = Vec::new();
        for d in deltas {
            out.extend(r.push(d));
        }
        out.extend(r.finish());
        (out, r.malformed)
    }

    fn text(p: &[Piece]) -> String {
        p.iter().filter_map(|x| if let Piece::Text(t) = x { Some(t.as_str()) } else { None }).collect()
    }

    #[test]
    fn json_streams_text_and_emotion_first() {
        let (p, bad) = run(&[
            "{\"emo",
            "tion\": \"happy\", \"te",
            "xt\": \"Hel",
            "lo \\\"you\\\"",
            "!\\n\\u00e9\", \"gesture\":\"wave\"}",
        ]);
        assert!(!bad);
        assert_eq!(p[0], Piece::Emotion("happy".into()));
        assert_eq!(text(&p), "Hello \"you\"!\né");
        assert!(p.contains(&Piece::Gesture("wave".into())));
    }

    #[test]
    fn text_pieces_arrive_before_the_object_closes() {
        let mut r = StructuredReader::default();
        assert!(r.push("{\"emotion\":\"sad\",\"text\":\"I am").iter().any(|p| *p == Piece::Text("I am".into())));
    }

    #[test]
    fn plain_text_is_spoken_as_is() {
        let (p, bad) = run(&["Sure", ", here you go."]);
        assert!(!bad);
        assert_eq!(text(&p), "Sure, here you go.");
    }

    #[test]
    fn fenced_json_is_read() {
        let (p, _) = run(&["```json\n{\"text\": \"Fine.\", \"emotion\": \"relaxed\"}\n```"]);
        assert_eq!(text(&p), "Fine.");
        assert!(p.contains(&Piece::Emotion("relaxed".into())));
    }

    #[test]
    fn malformed_json_never_loses_the_words() {
        let (p, bad) = run(&["{\"emotion\": \"happy\", \"reply\": \"The answer is forty two.\"}"]);
        assert!(bad);
        assert_eq!(text(&p), "The answer is forty two.");
        let (p, bad) = run(&["{emotion: happy, The answer is forty two"]);
        assert!(bad);
        assert!(text(&p).contains("The answer is forty two"), "{p:?}");
        let (p, bad) = run(&["{\"text\": \"cut off mid"]);
        assert!(bad, "an unterminated object is malformed");
        assert_eq!(text(&p), "cut off mid");
    }
}
