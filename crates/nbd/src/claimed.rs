//! Reading a payload whose length the peer announced.
//!
//! A length field is only a claim: a peer that announces 16 MiB and sends
//! ten bytes must not cost 16 MiB. Buffers therefore grow with what
//! arrives (at most twice what arrived, plus one step), never with what
//! was announced.

use tokio::io::{AsyncRead, AsyncReadExt};

/// The first step, and the least by which a buffer grows.
const STEP: usize = 64 * 1024;

/// Reads exactly `len` bytes. Fails with `UnexpectedEof` if the stream
/// ends first.
pub(crate) async fn read_claimed<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len.min(STEP));
    while buf.len() < len {
        let start = buf.len();
        let end = len.min(start + start.max(STEP));
        // Exact, so the buffer never outgrows the claim.
        buf.reserve_exact(end - start);
        buf.resize(end, 0);
        r.read_exact(&mut buf[start..]).await?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_exactly_and_fails_short() {
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let mut r = &data[..];
        assert_eq!(
            read_claimed(&mut r, 200_000).await.unwrap(),
            data[..200_000]
        );
        assert_eq!(r.len(), 100_000);
        let e = read_claimed(&mut r, 1 << 30).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(read_claimed(&mut r, 0).await.unwrap().is_empty());
    }
}
