//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! A text message may be split across frames and reads at any byte, including inside a
//! multi-byte character. The validator keeps at most 3 bytes of an unfinished character and
//! reports an error as soon as the bytes seen so far cannot start any valid UTF-8 text, so a
//! bad message is rejected mid-stream (Autobahn 6.4.x "fail fast") rather than at its end.
//! The bulk of each chunk is checked with the standard library's vectorised validator.

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

/// The bytes seen so far can never be valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

impl Utf8Validator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates the next chunk of the text.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            let have = usize::from(self.pending_len);
            let need = char_width(self.pending[0]) - have;
            let take = need.min(data.len());
            let mut tmp = self.pending;
            tmp[have..have + take].copy_from_slice(&data[..take]);
            let total = have + take;
            match std::str::from_utf8(&tmp[..total]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() => {
                    self.pending = tmp;
                    self.pending_len = total as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
            data = &data[take..];
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &data[e.valid_up_to()..];
                self.pending[..rest.len()].copy_from_slice(rest);
                self.pending_len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Whether the text seen so far ends on a character boundary.
    pub fn is_complete(&self) -> bool {
        self.pending_len == 0
    }
}

/// Width of the character that `lead` starts. Only called on a lead byte that the standard
/// validator accepted as the start of an unfinished character, so it is 2, 3 or 4.
fn char_width(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_split(data: &[u8], splits: &[usize]) -> Result<bool, InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &s in splits {
            v.feed(&data[start..s])?;
            start = s;
        }
        v.feed(&data[start..])?;
        Ok(v.is_complete())
    }

    #[test]
    fn valid_text_in_every_two_way_split() {
        // A 3-byte character right before another multi-byte one: an unfinished character
        // must take exactly its own continuation bytes from the next chunk.
        let text = "κόσμε Hello-µ@ßöäüàá-UTF-8!! 𝄞 €€ß€𝄞".as_bytes();
        for i in 0..=text.len() {
            assert_eq!(feed_split(text, &[i]), Ok(true), "split at {i}");
            for j in i..=text.len() {
                assert_eq!(feed_split(text, &[i, j]), Ok(true), "split at {i},{j}");
            }
        }
    }

    #[test]
    fn byte_at_a_time() {
        let text = "𝄞€ß".as_bytes();
        let mut v = Utf8Validator::new();
        for b in text {
            v.feed(std::slice::from_ref(b)).unwrap();
        }
        assert!(v.is_complete());
    }

    #[test]
    fn unfinished_character_is_incomplete_not_invalid() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xF0, 0x9D]).unwrap();
        assert!(!v.is_complete());
    }

    #[test]
    fn fails_fast_on_impossible_prefix() {
        // κόσμε followed by the start of a code point above U+10FFFF (Autobahn 6.4.1).
        let mut v = Utf8Validator::new();
        v.feed("κόσμε".as_bytes()).unwrap();
        assert_eq!(v.feed(&[0xF4]), Ok(()));
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
    }

    #[test]
    fn rejects_invalid_sequences_wherever_split() {
        let cases: &[&[u8]] = &[
            &[0xC0, 0x80],             // overlong NUL
            &[0xED, 0xA0, 0x80],       // surrogate
            &[0xF5, 0x80, 0x80, 0x80], // above U+10FFFF
            &[0x80],                   // lone continuation
            &[0xE2, 0x82, 0x41],       // truncated then ASCII
            &[0xFF],
        ];
        for bad in cases {
            for i in 0..=bad.len() {
                assert_eq!(
                    feed_split(bad, &[i]),
                    Err(InvalidUtf8),
                    "{bad:x?} split {i}"
                );
            }
        }
    }
}
