//! Sentence splitting of streamed text, so speech starts at the first sentence.
//!
//! Text arrives in arbitrary deltas; [`SentenceSplitter::push`] returns every sentence completed
//! so far. A sentence ends at `.`, `!`, `?`, `…` (or their CJK forms) followed by whitespace, or at
//! a newline. A run-on sentence is cut at a comma or space once it passes [`MAX_SENTENCE_CHARS`],
//! so a model that never punctuates still starts speaking. Very short pieces ("Hi.") are held
//! and joined with the next one: speaking them alone costs a TTS round trip for little audio.

/// A sentence longer than this is cut at the last comma or space.
pub const MAX_SENTENCE_CHARS: usize = 200;
/// Pieces shorter than this are joined with the next sentence.
const MIN_SENTENCE_CHARS: usize = 4;

/// Streaming splitter (sans-IO).
#[derive(Debug, Default)]
pub struct SentenceSplitter {
    buf: String,
}

fn is_terminal(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？')
}

impl SentenceSplitter {
    /// Add text; returns the sentences it completed.
    pub fn push(&mut self, delta: &str) -> Vec<String> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        while let Some(end) = self.boundary() {
            let sentence: String = self.buf[..end].trim().to_owned();
            self.buf.drain(..end);
            if !sentence.is_empty() {
                out.push(sentence);
            }
        }
        out
    }

    /// The text is complete: the rest, if any.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let rest = rest.trim();
        (!rest.is_empty()).then(|| rest.to_owned())
    }

    /// Byte index just past the first sentence in the buffer, if one is complete.
    fn boundary(&self) -> Option<usize> {
        let mut chars = self.buf.char_indices().peekable();
        let mut count = 0usize;
        let mut last_soft = None;
        while let Some((i, c)) = chars.next() {
            count += 1;
            let next = chars.peek().map(|&(_, n)| n);
            let cjk = matches!(c, '。' | '！' | '？');
            if c == '\n' || (is_terminal(c) && (cjk || next.is_some_and(char::is_whitespace))) {
                let end = i + c.len_utf8();
                if self.buf[..end].trim().chars().count() >= MIN_SENTENCE_CHARS {
                    return Some(end);
                }
            }
            if c == ',' || c == ' ' {
                last_soft = Some(i + c.len_utf8());
            }
            if count >= MAX_SENTENCE_CHARS {
                return Some(last_soft.unwrap_or(i + c.len_utf8()));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_come_out_as_soon_as_they_end() {
        let mut s = SentenceSplitter::default();
        assert!(s.push("Hello the").is_empty());
        assert!(s.push("re.").is_empty(), "the period needs the following space to count");
        assert_eq!(s.push(" How are"), vec!["Hello there."]);
        assert_eq!(s.push(" you? I am fine"), vec!["How are you?"]);
        assert_eq!(s.finish().as_deref(), Some("I am fine"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn decimals_and_tiny_pieces_are_not_split() {
        let mut s = SentenceSplitter::default();
        assert!(s.push("It costs 3.50 dollars").is_empty());
        assert_eq!(s.push(". Ok. Then we go. "), vec!["It costs 3.50 dollars.", "Ok. Then we go."]);
    }

    #[test]
    fn run_on_text_is_cut_at_a_comma() {
        let mut s = SentenceSplitter::default();
        let long = "word ".repeat(30) + "and, " + &"more ".repeat(20);
        let out = s.push(&long);
        assert!(!out.is_empty());
        assert!(out[0].chars().count() <= MAX_SENTENCE_CHARS);
    }
}
