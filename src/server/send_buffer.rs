//! The send buffer of a viewer's socket (`--viewer-send-buffer`), fixed at the kernel's own
//! autotuning ceiling.
//!
//! Linux grows a socket's send buffer by itself (`net.ipv4.tcp_wmem`), but stops growing it
//! while the host's TCP memory is past `net.ipv4.tcp_mem`'s pressure mark, as it is with
//! thousands of streaming consoles. A relay frame (up to 256 KiB) then goes out in several
//! `send` calls, each waking the viewer's reader: at 5000 streaming viewers on loopback that
//! was 40 sends per MB where a fixed buffer takes 19-22, and 1.3x a plain TCP relay's CPU per
//! GB where a fixed buffer makes 0.83x (docs/benchmarks.md, "Viewer send buffers").
//!
//! So with `auto` a viewer's send buffer is set (`SO_SNDBUF`, which the kernel doubles for its
//! bookkeeping) to the autotuning ceiling, capped at [`MAX_REQUEST`]: what autotuning gives a
//! fast viewer, kept under pressure too. It is left to autotuning where `net.core.wmem_max`
//! cannot grant that much, since a smaller fixed buffer slows a fast viewer (measured: a fixed
//! 1 MiB cost 1.6x the CPU per GB of autotuning at one viewer). The cost: a viewer that stops
//! reading can hold that much in the kernel; `off` restores autotuning.

use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::http::Peer;

/// Where Linux keeps the two settings.
const TCP_WMEM: &str = "/proc/sys/net/ipv4/tcp_wmem";
const WMEM_MAX: &str = "/proc/sys/net/core/wmem_max";

/// The largest request, 2 MiB (4 MiB of buffer): hosts tuned for storage or 10 GbE raise
/// `tcp_wmem` to tens of MiB, far past what a console needs.
pub const MAX_REQUEST: usize = 2 << 20;

/// The `SO_SNDBUF` request for viewer sockets on this host, read from `/proc` and logged at
/// start; `None` leaves them to autotuning (the files unreadable, or `wmem_max` too small).
pub fn viewer_send_buffer() -> Option<usize> {
    let tcp_wmem = std::fs::read_to_string(TCP_WMEM);
    let wmem_max = std::fs::read_to_string(WMEM_MAX);
    let (tcp_wmem, wmem_max) = match (tcp_wmem, wmem_max) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(err), _) | (_, Err(err)) => {
            info!(%err, "viewer send buffers left to Linux's autotuning: cannot read {TCP_WMEM} and {WMEM_MAX}");
            return None;
        }
    };
    let value = send_buffer_for(&tcp_wmem, &wmem_max);
    match value {
        Some(bytes) => info!(
            bytes,
            "viewer send buffers fixed at the tcp_wmem ceiling (SO_SNDBUF; --viewer-send-buffer off leaves them to autotuning)"
        ),
        None => info!(
            tcp_wmem = tcp_wmem.trim(),
            wmem_max = wmem_max.trim(),
            "viewer send buffers left to Linux's autotuning: net.core.wmem_max is below half of tcp_wmem's maximum (see the README, \"Tuning\")"
        ),
    }
    value
}

/// The request for `tcp_wmem` ("min default max", bytes) and `wmem_max` (bytes): half the
/// autotuning maximum, at most [`MAX_REQUEST`], when `wmem_max` grants that much.
fn send_buffer_for(tcp_wmem: &str, wmem_max: &str) -> Option<usize> {
    let ceiling: usize = tcp_wmem.split_whitespace().nth(2)?.parse().ok()?;
    let allowed: usize = wmem_max.trim().parse().ok()?;
    let request = (ceiling / 2).min(MAX_REQUEST);
    (request > 0 && request <= allowed).then_some(request)
}

/// Sets `tcp`'s send buffer to `bytes` (see the module); `None`, or a failure, leaves it to
/// autotuning.
pub(super) fn tune(tcp: &TcpStream, bytes: Option<usize>, peer: &Peer) {
    if let Some(bytes) = bytes
        && let Err(err) = socket2::SockRef::from(tcp).set_send_buffer_size(bytes)
    {
        debug!(peer = %peer.addr, %err, "cannot set the viewer's send buffer; autotuning stays");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_autotuning_ceiling_when_the_host_allows_it() {
        // This machine: tcp_wmem max 4 MiB, wmem_max 4 MiB.
        assert_eq!(
            send_buffer_for("4096\t16384\t4194304\n", "4194304\n"),
            Some(2 << 20)
        );
        // Debian's default wmem_max (208 KiB) cannot grant it: autotuning stays.
        assert_eq!(send_buffer_for("4096 16384 4194304", "212992"), None);
        // A host tuned for storage: capped.
        assert_eq!(
            send_buffer_for("4096 87380 134217728", "134217728"),
            Some(MAX_REQUEST)
        );
        assert_eq!(send_buffer_for("4096 16384", "4194304"), None);
        assert_eq!(send_buffer_for("a b c", "4194304"), None);
        assert_eq!(send_buffer_for("4096 16384 4194304", ""), None);
    }

    #[tokio::test]
    async fn a_tuned_socket_has_the_requested_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, addr) = listener.accept().await.expect("accept");
        let peer = Peer { addr, tls: false };
        // 64 KiB is under every wmem_max Linux ships with (208 KiB).
        tune(&server, Some(64 * 1024), &peer);
        let got = socket2::SockRef::from(&server)
            .send_buffer_size()
            .expect("SO_SNDBUF");
        // Linux reports the doubled value it keeps.
        assert_eq!(got, 128 * 1024);
        // `None` leaves the socket as it was.
        let before = socket2::SockRef::from(&client)
            .send_buffer_size()
            .expect("SO_SNDBUF");
        tune(&client, None, &peer);
        let after = socket2::SockRef::from(&client)
            .send_buffer_size()
            .expect("SO_SNDBUF");
        assert_eq!(before, after);
    }
}
