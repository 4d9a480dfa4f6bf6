//! [`first_of`]: the first of a viewer's futures to finish, each polled only after its own
//! waker fired.
//!
//! `tokio::select!` polls every branch on every wake-up of the task. A streaming viewer wakes
//! its task tens of times per MB for its VNC socket, and each wake-up also polled the cancel
//! token (two mutexes), the keepalive and idle timers and the viewer's read side. At 5000
//! sessions those lines are cold in the cache, and the polls were the largest part of the
//! daemon's own CPU (`is_cancelled` alone 3.6% of all samples). Here each branch gets a waker
//! of its own that marks it, and a wake-up polls only the marked branches.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// What the branches' wakers share: which branches were woken, and the task to wake.
struct Shared {
    woken: AtomicU32,
    task: AtomicWaker,
}

/// The waker of one branch: marks its bit, then wakes the task.
struct Branch {
    shared: Arc<Shared>,
    bit: u32,
}

impl Wake for Branch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.woken.fetch_or(self.bit, Ordering::AcqRel);
        self.shared.task.wake();
    }
}

/// Runs `futures` (at most 32) until the first finishes and returns its output; the others are
/// dropped with the returned future, as `select!` does. Every branch is polled once at the
/// start; after that a branch is polled only when its own waker fired. Where several fired at
/// once, the one earlier in the array is polled first (put cancellation first).
pub(super) async fn first_of<T, const N: usize>(
    mut futures: [Pin<&mut (dyn Future<Output = T> + Send + '_)>; N],
) -> T {
    const { assert!(N >= 1 && N <= 32, "first_of takes 1 to 32 futures") };
    let all = if N == 32 { u32::MAX } else { (1u32 << N) - 1 };
    let shared = Arc::new(Shared {
        woken: AtomicU32::new(all),
        task: AtomicWaker::new(),
    });
    let wakers: [Waker; N] = std::array::from_fn(|i| {
        Waker::from(Arc::new(Branch {
            shared: shared.clone(),
            bit: 1 << i,
        }))
    });
    std::future::poll_fn(|cx| {
        // Registered before the bits are taken: a branch woken from here on wakes this poll's
        // waker, so no wake-up falls between the two.
        shared.task.register(cx.waker());
        let mut bits = shared.woken.swap(0, Ordering::AcqRel);
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let mut branch_cx = Context::from_waker(&wakers[i]);
            if let Poll::Ready(out) = futures[i].as_mut().poll(&mut branch_cx) {
                return Poll::Ready(out);
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; pending until `ready` is set, then woken through its own waker.
    async fn counted(polls: &AtomicUsize, ready: &tokio::sync::Notify, value: u32) -> u32 {
        std::future::poll_fn(|_| {
            polls.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(())
        })
        .await;
        ready.notified().await;
        polls.fetch_add(1, Ordering::Relaxed);
        value
    }

    #[tokio::test]
    async fn returns_the_branch_that_finished_and_polls_only_woken_branches() {
        let polls: [AtomicUsize; 3] = Default::default();
        let ready: [tokio::sync::Notify; 3] = Default::default();
        let mut a = std::pin::pin!(counted(&polls[0], &ready[0], 10));
        let mut b = std::pin::pin!(counted(&polls[1], &ready[1], 20));
        let mut c = std::pin::pin!(async {
            // A branch woken many times that never finishes.
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            ready[1].notify_one();
            std::future::pending::<u32>().await
        });
        let out = first_of([a.as_mut(), b.as_mut(), c.as_mut()]).await;
        assert_eq!(out, 20);
        // `a` was polled once at the start and never woken again, though `c` woke the task
        // fifty times; `b` twice: at the start and when notified.
        assert_eq!(polls[0].load(Ordering::Relaxed), 1);
        assert_eq!(polls[1].load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_branch_ready_at_once_wins_and_earlier_branches_go_first() {
        let mut never = std::pin::pin!(std::future::pending::<&str>());
        let mut first = std::pin::pin!(async { "first" });
        let mut second = std::pin::pin!(async { "second" });
        let out = first_of([never.as_mut(), first.as_mut(), second.as_mut()]).await;
        assert_eq!(out, "first");
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_branch_fires_while_another_stays_pending() {
        let mut never = std::pin::pin!(std::future::pending::<u8>());
        let mut timer = std::pin::pin!(async {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            7u8
        });
        let out = first_of([never.as_mut(), timer.as_mut()]).await;
        assert_eq!(out, 7);
    }
}
