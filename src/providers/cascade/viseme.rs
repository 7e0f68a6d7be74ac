//! Visemes from phoneme timings.
//!
//! The viseme set is the 15 Oculus/Meta visemes of [`signaling::events::Viseme`] (`sil`, `PP`,
//! `FF`, `TH`, `DD`, `kk`, `CH`, `SS`, `nn`, `RR`, `aa`, `E`, `ih`, `oh`, `ou`). Phoneme names are
//! eSpeak NG's ASCII mnemonics (what its phoneme events carry with `espeakINITIALIZE_PHONEME_EVENTS`
//! and without the IPA option). The map, by phoneme:
//!
//! | visemes | eSpeak phonemes (English) |
//! |---|---|
//! | `sil` | `_`, `_:`, `_!`, `_^_` and other pauses, and anything unknown |
//! | `PP` | `p` `b` `m` |
//! | `FF` | `f` `v` |
//! | `TH` | `T` `D` (thin, this) |
//! | `DD` | `t` `d` `t#` `d#` `?` (glottal stop) |
//! | `kk` | `k` `g` `N` (sing) `x` `h` |
//! | `CH` | `tS` `dZ` `S` `Z` (church, judge, ship, measure) |
//! | `SS` | `s` `z` |
//! | `nn` | `n` `l` `n-` `l-` `L` |
//! | `RR` | `r` `r-` `R` `3:` `3` (the r-coloured vowels) |
//! | `aa` | `a` `aa` `a#` `A:` `A@` `aI` `aU` `V` (father, cut, my, now) |
//! | `E` | `E` `e` `eI` `e@` `@` `@-` `@2` `@5` (bed, say, about) |
//! | `ih` | `I` `i` `i:` `i@` `I2` `I#` `j` (tip, see, yes) |
//! | `oh` | `0` `O` `O:` `O@` `o@` `oU` `OI` (lot, thought, toe, boy) |
//! | `ou` | `U` `u:` `U@` `w` (book, you, we) |
//!
//! Phonemes not in the table fall back on their first character with the same classes. A
//! character may override any entry (`visemes = { "h" = "sil" }` in its config), e.g. for an
//! avatar whose `kk` shape looks wrong on `h`.
//!
//! [`VisemeTrack`] turns phoneme marks (start times) into timed visemes (start and duration),
//! merging consecutive equal shapes: a viseme lasts until the next one starts, the last until
//! the end of the audio.

use std::collections::HashMap;
use std::time::Duration;

use signaling::events::Viseme;

/// A phoneme -> viseme map with per-character overrides.
#[derive(Debug, Clone, Default)]
pub struct VisemeMap {
    overrides: HashMap<String, Viseme>,
}

impl VisemeMap {
    /// The documented map, with `overrides` (phoneme -> viseme) taking precedence.
    pub fn new(overrides: HashMap<String, Viseme>) -> Self {
        Self { overrides }
    }

    /// The viseme of one eSpeak phoneme.
    pub fn viseme(&self, phoneme: &str) -> Viseme {
        if let Some(v) = self.overrides.get(phoneme) {
            return *v;
        }
        base(phoneme)
    }
}

fn base(p: &str) -> Viseme {
    use Viseme::*;
    match p {
        "" => Sil,
        "p" | "b" | "m" => PP,
        "f" | "v" => FF,
        "T" | "D" => TH,
        "t" | "d" | "t#" | "d#" | "?" => DD,
        "k" | "g" | "N" | "x" | "h" => Kk,
        "tS" | "dZ" | "S" | "Z" => CH,
        "s" | "z" => SS,
        "n" | "l" | "n-" | "l-" | "L" => Nn,
        "r" | "r-" | "R" | "3:" | "3" => RR,
        "a" | "aa" | "a#" | "A:" | "A@" | "aI" | "aU" | "V" => Aa,
        "E" | "e" | "eI" | "e@" | "@" | "@-" | "@2" | "@5" => E,
        "I" | "i" | "i:" | "i@" | "I2" | "I#" | "j" => Ih,
        "0" | "O" | "O:" | "O@" | "o@" | "oU" | "OI" => Oh,
        "U" | "u:" | "U@" | "w" => Ou,
        _ if p.starts_with('_') => Sil,
        _ => match p.chars().next() {
            Some('p' | 'b' | 'm') => PP,
            Some('f' | 'v') => FF,
            Some('T' | 'D') => TH,
            Some('t' | 'd') => DD,
            Some('k' | 'g' | 'N' | 'x' | 'h') => Kk,
            Some('S' | 'Z') => CH,
            Some('s' | 'z') => SS,
            Some('n' | 'l' | 'L') => Nn,
            Some('r' | 'R' | '3') => RR,
            Some('a' | 'A' | 'V') => Aa,
            Some('e' | 'E' | '@') => E,
            Some('i' | 'I' | 'j' | 'y') => Ih,
            Some('o' | 'O' | '0') => Oh,
            Some('u' | 'U' | 'w') => Ou,
            _ => Sil,
        },
    }
}

/// A timed viseme of one agent item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedViseme {
    /// The mouth shape.
    pub viseme: Viseme,
    /// From the start of the item's audio.
    pub start: Duration,
    /// How long it holds.
    pub duration: Duration,
}

/// Phoneme marks in, timed visemes out (sans-IO; one per agent item).
#[derive(Debug, Default)]
pub struct VisemeTrack {
    pending: Option<(Viseme, Duration)>,
}

impl VisemeTrack {
    /// A phoneme starting at `start` (from the item's start): returns the viseme it completes.
    pub fn push(&mut self, viseme: Viseme, start: Duration) -> Option<TimedViseme> {
        match self.pending {
            Some((v, _)) if v == viseme => None,
            Some((v, s)) => {
                self.pending = Some((viseme, start.max(s)));
                Some(TimedViseme { viseme: v, start: s, duration: start.saturating_sub(s) })
            }
            None => {
                self.pending = Some((viseme, start));
                None
            }
        }
    }

    /// The audio ends at `end`: the last viseme.
    pub fn finish(&mut self, end: Duration) -> Option<TimedViseme> {
        let (v, s) = self.pending.take()?;
        Some(TimedViseme { viseme: v, start: s, duration: end.saturating_sub(s) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_examples_map_as_the_table_says() {
        let m = VisemeMap::default();
        let cases = [
            ("p", "PP"),
            ("v", "FF"),
            ("D", "TH"),
            ("t", "DD"),
            ("N", "kk"),
            ("tS", "CH"),
            ("z", "SS"),
            ("l", "nn"),
            ("r", "RR"),
            ("aI", "aa"),
            ("@", "E"),
            ("i:", "ih"),
            ("oU", "oh"),
            ("u:", "ou"),
            ("_:", "sil"),
            ("l/2", "nn"),
        ];
        for (p, v) in cases {
            assert_eq!(m.viseme(p).as_str(), v, "phoneme {p}");
        }
    }

    #[test]
    fn overrides_win() {
        let m = VisemeMap::new(HashMap::from([("h".to_owned(), Viseme::Sil)]));
        assert_eq!(m.viseme("h"), Viseme::Sil);
        assert_eq!(m.viseme("k"), Viseme::Kk);
        assert_eq!("ou".parse::<Viseme>().ok(), Some(Viseme::Ou));
        assert_eq!("OU".parse::<Viseme>().ok(), None);
    }

    #[test]
    fn track_merges_repeats_and_ends_at_the_audio_end() {
        let ms = Duration::from_millis;
        let mut t = VisemeTrack::default();
        assert_eq!(t.push(Viseme::Sil, ms(0)), None);
        let a = t.push(Viseme::PP, ms(40)).unwrap();
        assert_eq!((a.viseme, a.start, a.duration), (Viseme::Sil, ms(0), ms(40)));
        assert_eq!(t.push(Viseme::PP, ms(70)), None, "same shape continues");
        let b = t.push(Viseme::Aa, ms(100)).unwrap();
        assert_eq!((b.viseme, b.start, b.duration), (Viseme::PP, ms(40), ms(60)));
        let c = t.finish(ms(250)).unwrap();
        assert_eq!((c.viseme, c.start, c.duration), (Viseme::Aa, ms(100), ms(150)));
        assert_eq!(t.finish(ms(300)), None);
    }
}
