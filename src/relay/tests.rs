use super::*;

#[test]
fn close_table_matches_the_design() {
    let table = [
        (
            CloseReason::ServerClosed,
            1000,
            "VNC server closed the connection",
        ),
        (CloseReason::SessionClosed, 1001, "session closed"),
        (CloseReason::Restarting, 1001, "vncgate restarting"),
        (CloseReason::Retargeted, 1012, "VNC target changed"),
        (CloseReason::TooManyViewers, 1013, "too many viewers"),
        (CloseReason::TokenRevoked, 1008, "token revoked"),
        (
            CloseReason::DisconnectedByOperator,
            1008,
            "disconnected by operator",
        ),
        (CloseReason::IdleTimeout, 1001, "idle timeout"),
        (CloseReason::ClientClosed(None), 1000, ""),
        (CloseReason::ClientClosed(Some(1001)), 1001, ""),
        (
            CloseReason::InvalidData("close reason is not UTF-8".into()),
            1007,
            "close reason is not UTF-8",
        ),
        (CloseReason::KeepaliveTimeout, 1001, "keepalive timeout"),
        (
            CloseReason::TargetUnreachable(
                "VNC server 127.0.0.1:5901 unreachable: connection refused".into(),
            ),
            1011,
            "VNC server 127.0.0.1:5901 unreachable: connection refused",
        ),
        (
            CloseReason::MessageTooBig("message too big".into()),
            1009,
            "message too big",
        ),
    ];
    for (reason, code, text) in table {
        assert_eq!((reason.code(), reason.reason()), (code, text), "{reason:?}");
    }
}
