//! A byte stream cut into `\n`-terminated lines, each byte searched once, so a long line
//! arriving in many small reads costs linear time (worker output, channel messages).

use bytes::BytesMut;

#[derive(Debug)]
pub struct LineBuffer {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no newline.
    scanned: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        LineBuffer {
            buf: BytesMut::with_capacity(8 * 1024),
            scanned: 0,
        }
    }
}

impl LineBuffer {
    /// Where the next read appends.
    pub fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The next complete line, without its `\n`.
    pub fn next_line(&mut self) -> Option<BytesMut> {
        match self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
            Some(i) => {
                let mut line = self.buf.split_to(self.scanned + i + 1);
                line.truncate(line.len() - 1);
                self.scanned = 0;
                Some(line)
            }
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Bytes of the incomplete line held so far.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the incomplete line (to emit it anyway, or to discard it).
    pub fn take_pending(&mut self) -> BytesMut {
        self.scanned = 0;
        self.buf.split()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_reads() {
        let mut lines = LineBuffer::default();
        lines.buf_mut().extend_from_slice(b"ab");
        assert!(lines.next_line().is_none());
        lines.buf_mut().extend_from_slice(b"c\nde\n\nf");
        assert_eq!(&lines.next_line().unwrap()[..], b"abc");
        assert_eq!(&lines.next_line().unwrap()[..], b"de");
        assert_eq!(&lines.next_line().unwrap()[..], b"");
        assert!(lines.next_line().is_none());
        assert_eq!(lines.pending(), 1);
        assert_eq!(&lines.take_pending()[..], b"f");
    }
}
