//! A capped capture buffer for a test's output: keeps the head and the tail (where the error
//! usually is) and says how much of the middle it dropped.

use std::collections::VecDeque;

#[derive(Debug)]
pub struct CappedOutput {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_cap: usize,
    tail_cap: usize,
    dropped: u64,
}

impl CappedOutput {
    /// Keeps at most `cap` bytes: a quarter from the start, the rest from the end.
    pub fn new(cap: usize) -> Self {
        let head_cap = cap / 4;
        Self {
            head: Vec::new(),
            tail: VecDeque::new(),
            head_cap,
            tail_cap: cap - head_cap,
            dropped: 0,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        let room = self.head_cap - self.head.len();
        if room > 0 {
            let n = room.min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        if self.tail_cap == 0 {
            self.dropped += bytes.len() as u64;
            return;
        }
        self.tail.extend(bytes);
        let excess = self.tail.len().saturating_sub(self.tail_cap);
        if excess > 0 {
            self.tail.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// The kept output as text (invalid UTF-8 replaced), with a marker where bytes were cut.
    pub fn into_string(self) -> String {
        let mut s = String::from_utf8_lossy(&self.head).into_owned();
        if self.dropped > 0 {
            s.push_str(&format!("\n[… {} bytes of output cut …]\n", self.dropped));
        }
        let tail: Vec<u8> = self.tail.into();
        s.push_str(&String::from_utf8_lossy(&tail));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_small_output_whole() {
        let mut o = CappedOutput::new(64);
        o.push(b"hello ");
        o.push(b"world");
        assert_eq!(o.into_string(), "hello world");
    }

    #[test]
    fn keeps_head_and_tail_of_large_output() {
        let mut o = CappedOutput::new(8);
        for chunk in [b"AB".as_slice(), b"cdefghijkl", b"XYZ"] {
            o.push(chunk);
        }
        let s = o.into_string();
        assert!(s.starts_with("AB\n[… 7 bytes of output cut …]\n"), "{s}");
        assert!(s.ends_with("jklXYZ"), "{s}");
    }
}
