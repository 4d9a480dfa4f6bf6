//! 1,000 open/connect/close cycles leave no task and no descriptor behind. A test binary of its
//! own, so the descriptor count of this process is the daemon's (plus this test's few sockets).

mod common;

use std::time::Duration;

use common::{FakeVnc, GREETING, Mode, TestGate, bounded, fd_count, fd_list, wait_until};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cycles_leave_nothing_behind() {
    bounded(Duration::from_secs(240), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut gate = TestGate::start(4).await;
        // No keep-alive API connections, so none is counted at either end.
        gate.http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http();
        let pid = std::process::id();
        let fds_before = fd_count(pid);
        let tasks_before = gate.daemon().task_count();
        for i in 0..1000 {
            let vm = format!("vm-{}", i % 7);
            let session = gate.open_ok(&vm, &fake.target).await;
            let (mut ws, _) = connect_async(session["ws_url"].as_str().expect("ws_url"))
                .await
                .expect("connect");
            let first = ws.next().await.expect("greeting").expect("ok");
            assert_eq!(first.into_data().as_ref(), GREETING);
            if i % 2 == 0 {
                ws.send(Message::binary(vec![i as u8; 16]))
                    .await
                    .expect("send");
                ws.next().await.expect("echo").expect("ok");
            }
            assert_eq!(gate.close(&vm).await, 204);
            // Drain the close frame, as a browser would.
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        }
        let daemon = gate.daemon();
        let tasks_back = wait_until(Duration::from_secs(5), || {
            daemon.task_count() <= tasks_before
        })
        .await;
        assert!(
            tasks_back,
            "tasks: {} before, {} after",
            tasks_before,
            daemon.task_count()
        );
        let fds_back = wait_until(Duration::from_secs(5), || fd_count(pid) <= fds_before).await;
        assert!(
            fds_back,
            "descriptors: {fds_before} before, {} after: {}",
            fd_count(pid),
            fd_list(pid)
        );
        assert!(daemon.registry().is_empty());
        assert_eq!(gate.status().await["port_pool"]["allocated_ports"], 0);
        eprintln!(
            "leaks: tasks {tasks_before} -> {}, descriptors {fds_before} -> {}",
            daemon.task_count(),
            fd_count(pid)
        );
    })
    .await;
}
