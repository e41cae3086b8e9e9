//! The raw TCP length-prefixed framing. Arbitrary bytes fed in arbitrary splits (releasing
//! the partial-frame buffer between reads, as the shell does) yield the same frames, and the
//! same TooLarge error, as one feed of the whole stream; payloads encoded (whole or in parts)
//! decode to themselves in any split, and a limit one byte too small refuses the first frame
//! over it and nothing before.
#![no_main]

use imgate::im::tcp_framing::{LengthPrefixed, TooLarge};
use libfuzzer_sys::fuzz_target;

/// Frames decoded from `stream` read in pieces of the sizes `splits` gives in turn, and the
/// error that stopped it, if any.
fn feed(
    max: usize,
    stream: &[u8],
    splits: &[u8],
    release: bool,
) -> (Vec<Vec<u8>>, Option<TooLarge>) {
    let mut d = LengthPrefixed::new(max);
    let mut frames = Vec::new();
    let mut at = 0;
    let mut sizes = splits.iter().cycle();
    while at < stream.len() {
        let size = sizes
            .next()
            .map_or(stream.len(), |&s| usize::from(s).max(1));
        let piece = &stream[at..(at + size).min(stream.len())];
        at += piece.len();
        let mut off = 0;
        while off < piece.len() {
            match d.decode(&piece[off..]) {
                Ok((used, frame)) => {
                    assert!(used > 0, "no progress on {} bytes", piece.len() - off);
                    off += used;
                    if let Some(f) = frame {
                        assert!(f.len() <= max);
                        frames.push(f.to_vec());
                    }
                }
                Err(e) => return (frames, Some(e)),
            }
        }
        if release {
            d.release();
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (head, rest) = data.split_at(3);
    let max = usize::from(head[0]) * 4;
    let release = head[1] & 1 == 0;
    let (splits, stream) = rest.split_at(usize::from(head[2] % 8).min(rest.len()));

    let whole = feed(max, stream, &[], false);
    assert_eq!(feed(max, stream, splits, release), whole);

    // The same bytes as payloads (cut where the split sizes say), framed: each payload comes
    // back whole whatever the reads, and only a frame over the limit is refused.
    let mut payloads = Vec::new();
    let mut encoded = Vec::new();
    let mut left = stream;
    for (i, &s) in splits.iter().cycle().enumerate() {
        if left.is_empty() || i > 64 {
            break;
        }
        let (p, r) = left.split_at(usize::from(s).min(left.len()));
        left = r;
        if i % 2 == 0 {
            LengthPrefixed::encode(p, &mut encoded);
        } else {
            let (a, b) = p.split_at(p.len() / 2);
            LengthPrefixed::encode_parts(&[a, &[], b], &mut encoded);
        }
        payloads.push(p.to_vec());
    }
    let longest = payloads.iter().map(Vec::len).max().unwrap_or(0);
    for chunks in [&[][..], splits, &[1]] {
        assert_eq!(
            feed(longest, &encoded, chunks, release),
            (payloads.clone(), None)
        );
    }
    if longest > 0 {
        let first_over = payloads.iter().position(|p| p.len() == longest).unwrap();
        assert_eq!(
            feed(longest - 1, &encoded, splits, release),
            (payloads[..first_over].to_vec(), Some(TooLarge(longest)))
        );
    }
});
