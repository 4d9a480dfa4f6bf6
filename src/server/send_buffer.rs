//! The send buffer of a viewer's socket, fixed at the kernel's own autotuning ceiling.
//!
//! Linux grows a socket's send buffer by itself (`net.ipv4.tcp_wmem`), but stops growing it
//! while the host's TCP memory is past `net.ipv4.tcp_mem`'s pressure mark, as it is with
//! thousands of streaming consoles. A relay frame (up to 256 KiB) then goes out in several
//! `send` calls, each waking the viewer's reader: at 5000 streaming viewers on loopback that
//! was 37-40 sends per MB where a fixed buffer takes 22, and 1.3x a plain TCP relay's CPU per
//! GB where a fixed buffer makes 0.86x (docs/benchmarks.md, "Viewer send buffers").
//!
//! So a viewer's send buffer is set to the autotuning ceiling (`SO_SNDBUF`, which the kernel
//! doubles for its bookkeeping): never less than autotuning could give it, only not shrunk
//! under pressure. It is left to autotuning where `net.core.wmem_max` cannot grant that much,
//! since a smaller fixed buffer would slow a fast viewer. A viewer holds what fills that buffer
//! only while it does not read, and RFB sends an update only when the viewer asked for one.

use std::sync::OnceLock;

use tokio::net::TcpStream;
use tracing::debug;

/// Where Linux keeps the two settings.
const TCP_WMEM: &str = "/proc/sys/net/ipv4/tcp_wmem";
const WMEM_MAX: &str = "/proc/sys/net/core/wmem_max";

/// The `SO_SNDBUF` value for viewer sockets, read once: `None` leaves autotuning on.
fn viewer_send_buffer() -> Option<usize> {
    static VALUE: OnceLock<Option<usize>> = OnceLock::new();
    *VALUE.get_or_init(|| {
        let tcp_wmem = std::fs::read_to_string(TCP_WMEM).ok();
        let wmem_max = std::fs::read_to_string(WMEM_MAX).ok();
        let value = send_buffer_for(tcp_wmem.as_deref(), wmem_max.as_deref());
        match value {
            Some(bytes) => debug!(
                bytes,
                "viewer send buffers fixed at the tcp_wmem ceiling (SO_SNDBUF, doubled by the kernel)"
            ),
            None => debug!(
                tcp_wmem = tcp_wmem.as_deref().map(str::trim),
                wmem_max = wmem_max.as_deref().map(str::trim),
                "viewer send buffers left to autotuning: net.core.wmem_max is below half of tcp_wmem's maximum"
            ),
        }
        value
    })
}

/// The value to request for `tcp_wmem` ("min default max", bytes) and `wmem_max` (bytes):
/// half the autotuning maximum, when `wmem_max` allows requesting that much.
fn send_buffer_for(tcp_wmem: Option<&str>, wmem_max: Option<&str>) -> Option<usize> {
    let ceiling: usize = tcp_wmem?.split_whitespace().nth(2)?.parse().ok()?;
    let allowed: usize = wmem_max?.trim().parse().ok()?;
    let request = ceiling / 2;
    (request > 0 && request <= allowed).then_some(request)
}

/// Fixes `tcp`'s send buffer as the module says; a failure leaves autotuning on.
pub(super) fn tune(tcp: &TcpStream) {
    if let Some(bytes) = viewer_send_buffer() {
        let _ = socket2::SockRef::from(tcp).set_send_buffer_size(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_autotuning_ceiling_when_the_host_allows_it() {
        // This machine: tcp_wmem max 4 MiB, wmem_max 4 MiB.
        assert_eq!(
            send_buffer_for(Some("4096\t16384\t4194304\n"), Some("4194304\n")),
            Some(2 << 20)
        );
        // Debian's default wmem_max (208 KiB) cannot grant it: autotuning stays.
        assert_eq!(
            send_buffer_for(Some("4096 16384 4194304"), Some("212992")),
            None
        );
        assert_eq!(send_buffer_for(None, Some("4194304")), None);
        assert_eq!(send_buffer_for(Some("4096 16384"), Some("4194304")), None);
        assert_eq!(send_buffer_for(Some("a b c"), Some("4194304")), None);
    }

    #[tokio::test]
    async fn a_tuned_socket_has_at_least_the_ceiling() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        tune(&server);
        let got = socket2::SockRef::from(&server)
            .send_buffer_size()
            .expect("SO_SNDBUF");
        match viewer_send_buffer() {
            // Linux reports the doubled value.
            Some(bytes) => assert_eq!(got, 2 * bytes),
            None => assert!(got > 0),
        }
        drop(client);
    }
}
