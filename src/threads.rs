//! Every thread the daemon starts goes through [`spawn`]: it gets a name
//! (for `top -H`, gdb and the journal), a small stack, and is counted while
//! it runs, so the status dump reads one number instead of four.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Decrements the count when the thread's closure ends, however it ends.
struct Counted;

impl Drop for Counted {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Starts `f` on a thread named `name` with a `stack`-byte stack. The owner
/// keeps the handle and joins it on shutdown.
pub fn spawn<F>(name: String, stack: usize, f: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    spawn_boxed(name, stack, Box::new(f))
}

/// One copy of the thread start-up code for every caller (it is large, and
/// the binary must stay small on the target boards).
fn spawn_boxed(
    name: String,
    stack: usize,
    f: Box<dyn FnOnce() + Send + 'static>,
) -> io::Result<JoinHandle<()>> {
    LIVE.fetch_add(1, Ordering::AcqRel);
    let spawned = std::thread::Builder::new()
        .name(name)
        .stack_size(stack)
        .spawn(move || {
            let _counted = Counted;
            f()
        });
    if spawned.is_err() {
        LIVE.fetch_sub(1, Ordering::AcqRel);
    }
    spawned
}

/// Joins `handle` if its thread ends within `wait`; otherwise leaves it
/// running detached (a thread stuck in a blocking call must not hang the
/// caller's shutdown) and returns false.
pub fn join_within<T>(handle: JoinHandle<T>, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::park_timeout(Duration::from_millis(2));
    }
    let _ = handle.join();
    true
}

/// Threads started through [`spawn`] that have not ended yet.
pub fn live() -> usize {
    LIVE.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_counts_while_it_runs_and_not_after_join() {
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let (name_tx, name_rx) = crossbeam_channel::bounded(1);
        let h = spawn("count-test".to_string(), 64 * 1024, move || {
            let _ = rx.recv();
            let _ = name_tx.send(std::thread::current().name().map(str::to_string));
        })
        .expect("spawn");
        // other tests' threads come and go; ours alone keeps it above zero
        assert!(live() >= 1);
        tx.send(()).expect("release");
        h.join().expect("join");
        assert_eq!(name_rx.recv().expect("name").as_deref(), Some("count-test"));
    }
}
