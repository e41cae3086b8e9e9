//! Framing of the IM protocol on the raw TCP listener: each frame is a 4-byte big-endian length
//! followed by that many bytes of protobuf. Sans-IO, like the WebSocket decoder.

/// A frame longer than the limit; the connection cannot be resynchronised and is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge(pub usize);

#[derive(Debug)]
pub struct LengthPrefixed {
    max: usize,
    len_buf: [u8; 4],
    len_have: u8,
    /// Body length of the frame being received, once its prefix is complete.
    need: Option<usize>,
    /// Partial body; empty (no allocation) between frames.
    body: Vec<u8>,
    /// `body` was lent out by the last call and is cleared by the next.
    lent: bool,
}

impl LengthPrefixed {
    pub fn new(max: usize) -> Self {
        LengthPrefixed {
            max,
            len_buf: [0; 4],
            len_have: 0,
            need: None,
            body: Vec::new(),
            lent: false,
        }
    }

    /// Appends one frame carrying `payload`.
    pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
        Self::encode_parts(&[payload], out);
    }

    /// Appends one frame whose payload is `parts` in order.
    pub fn encode_parts(parts: &[&[u8]], out: &mut Vec<u8>) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        out.extend_from_slice(&(len as u32).to_be_bytes());
        for p in parts {
            out.extend_from_slice(p);
        }
    }

    /// Frees the partial-frame buffer when no frame is in progress.
    pub fn release(&mut self) {
        if self.need.is_none() || self.lent {
            self.lent = false;
            self.need = None;
            self.body = Vec::new();
        }
    }

    /// Consumes a prefix of `input`; returns the bytes consumed and the frame that ended, if
    /// one did. A frame entirely inside `input` is returned in place, without a copy.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<&'a [u8]>), TooLarge> {
        if self.lent {
            self.lent = false;
            self.body.clear();
        }
        let mut used = 0;
        let need = match self.need {
            Some(n) => n,
            None => {
                if self.len_have == 0 && input.len() >= 4 {
                    let n = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
                    if n > self.max {
                        return Err(TooLarge(n));
                    }
                    if input.len() >= 4 + n {
                        return Ok((4 + n, Some(&input[4..4 + n])));
                    }
                    used = 4;
                    n
                } else {
                    let have = usize::from(self.len_have);
                    let take = (4 - have).min(input.len());
                    self.len_buf[have..have + take].copy_from_slice(&input[..take]);
                    self.len_have += take as u8;
                    used = take;
                    if self.len_have < 4 {
                        return Ok((used, None));
                    }
                    self.len_have = 0;
                    let n = u32::from_be_bytes(self.len_buf) as usize;
                    if n > self.max {
                        return Err(TooLarge(n));
                    }
                    n
                }
            }
        };
        self.need = Some(need);
        let take = (need - self.body.len()).min(input.len() - used);
        self.body.extend_from_slice(&input[used..used + take]);
        used += take;
        if self.body.len() < need {
            return Ok((used, None));
        }
        self.need = None;
        self.lent = true;
        Ok((used, Some(&self.body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(
        d: &mut LengthPrefixed,
        bytes: &[u8],
        chunk: usize,
    ) -> Result<Vec<Vec<u8>>, TooLarge> {
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            let mut off = 0;
            while off < piece.len() {
                let (n, f) = d.decode(&piece[off..])?;
                off += n;
                if let Some(f) = f {
                    out.push(f.to_vec());
                }
            }
            d.release();
        }
        Ok(out)
    }

    #[test]
    fn frames_survive_any_split() {
        let mut stream = Vec::new();
        let payloads: Vec<Vec<u8>> = vec![b"one".to_vec(), Vec::new(), vec![7; 300]];
        for p in &payloads {
            LengthPrefixed::encode(p, &mut stream);
        }
        for chunk in [1, 2, 3, 5, 64, stream.len()] {
            let mut d = LengthPrefixed::new(1000);
            assert_eq!(
                frames(&mut d, &stream, chunk).unwrap(),
                payloads,
                "chunk {chunk}"
            );
            assert_eq!(d.body.capacity(), 0, "nothing held between frames");
        }
    }

    #[test]
    fn oversized_frames_are_refused_at_the_prefix() {
        let mut d = LengthPrefixed::new(10);
        assert_eq!(frames(&mut d, &[0, 0, 0, 11], 4), Err(TooLarge(11)));
        let mut d = LengthPrefixed::new(10);
        assert_eq!(frames(&mut d, &[0, 0, 0, 11], 1), Err(TooLarge(11)));
    }

    #[test]
    fn a_frame_of_exactly_the_limit_is_taken_whole_or_split() {
        let mut stream = Vec::new();
        LengthPrefixed::encode(&[1; 10], &mut stream);
        for chunk in [1, 4, stream.len()] {
            let mut d = LengthPrefixed::new(10);
            assert_eq!(frames(&mut d, &stream, chunk), Ok(vec![vec![1; 10]]));
        }
    }

    #[test]
    fn a_frame_whole_in_the_input_is_returned_in_place() {
        let input = [0, 0, 0, 3, b'o', b'n', b'e'];
        let mut d = LengthPrefixed::new(10);
        let (used, frame) = d.decode(&input).unwrap();
        assert_eq!(used, input.len());
        assert_eq!(frame.map(<[u8]>::as_ptr), Some(input[4..].as_ptr()));
        assert_eq!(d.body.capacity(), 0, "no copy was made");
    }

    #[test]
    fn the_buffer_of_a_finished_frame_is_freed_even_after_a_frame_read_in_place() {
        let mut stream = Vec::new();
        LengthPrefixed::encode(&[1; 10], &mut stream);
        LengthPrefixed::encode(&[2; 2], &mut stream);
        let mut d = LengthPrefixed::new(100);
        // The first frame is split, so its body is buffered; the second chunk ends it and
        // then holds the whole second frame, which is returned in place.
        assert_eq!(frames(&mut d, &stream[..6], 6), Ok(Vec::new()));
        assert_eq!(
            frames(&mut d, &stream[6..], stream.len()),
            Ok(vec![vec![1; 10], vec![2; 2]])
        );
        assert_eq!(d.body.capacity(), 0, "nothing held between frames");
    }
}
