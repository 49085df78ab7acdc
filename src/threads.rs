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

/// Threads that outlived their owner's close (blocked in a call nobody can
/// interrupt: a file system, a child command): each is joined once it has
/// ended, on the owner's next [`reap`](Parked::reap), or when the list is
/// dropped, waiting at most the list's bound for the ones still running.
#[derive(Debug)]
pub struct Parked {
    list: std::sync::Mutex<Vec<JoinHandle<()>>>,
    wait: Duration,
}

impl Parked {
    /// An empty list that waits at most `wait` when dropped.
    pub fn new(wait: Duration) -> Parked {
        Parked {
            list: std::sync::Mutex::new(Vec::new()),
            wait,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        // only handles are moved under the lock: still consistent if poisoned
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins `thread` now if it has ended, else keeps it for later.
    pub fn park(&self, thread: JoinHandle<()>) {
        if thread.is_finished() {
            joined(thread);
        } else {
            self.lock().push(thread);
        }
    }

    /// Joins the kept threads that have ended.
    pub fn reap(&self) {
        let ended: Vec<JoinHandle<()>> = {
            let mut list = self.lock();
            let (ended, running) = list.drain(..).partition(|t| t.is_finished());
            *list = running;
            ended
        };
        ended.into_iter().for_each(joined);
    }

    /// How many are kept (ended or not).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is kept.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        let list: Vec<JoinHandle<()>> = self.lock().drain(..).collect();
        let deadline = Instant::now() + self.wait;
        for t in list {
            join_within(t, deadline.saturating_duration_since(Instant::now()));
        }
    }
}

fn joined(thread: JoinHandle<()>) {
    let name = thread.thread().name().unwrap_or("?").to_string();
    if let Err(p) = thread.join() {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        log::error!("thread {name} panicked: {what}");
    }
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

    #[test]
    fn a_parked_thread_is_kept_while_it_runs_joined_once_ended_and_waited_for_at_drop() {
        let parked = Parked::new(Duration::from_secs(10));
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let running = spawn("parked-test".to_string(), 64 * 1024, move || {
            let _ = rx.recv();
        })
        .expect("spawn");
        parked.park(running);
        parked.reap();
        assert_eq!(parked.len(), 1, "still running: kept");
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            parked.reap();
            if parked.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "never ended");
            std::thread::yield_now();
        }
        // dropping the list waits (bounded) for a thread still ending
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let ending = spawn("parked-drop".to_string(), 64 * 1024, move || {
            let _ = rx.recv_timeout(Duration::from_millis(300));
            let _ = done_tx.send(());
        })
        .expect("spawn");
        parked.park(ending);
        // kept, so the drop below is what waits for it
        assert_eq!(parked.len(), 1);
        drop(parked);
        assert!(
            done_rx.try_recv().is_ok(),
            "the drop returned before the thread ended"
        );
        drop(tx);
    }
}
