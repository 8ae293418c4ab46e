//! Writes the application knows are coming, so that a busy writer does not wait for writes
//! that cannot come.
//!
//! A busy SQLite writer waits [`WriteOptions::commit_delay`](crate::WriteOptions::commit_delay)
//! before committing, so that the writes of calls still in progress share its commit. When
//! every call in progress has already queued its write, nothing more can arrive in that
//! time and waiting only leaves the machine idle (each of those calls waits on the
//! commit). [`Upcoming`] is how the application (the gateway) says how many calls are in
//! progress: the writer stops waiting as soon as as many writes are queued.

use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// The count of calls in progress that will write, shared by the application and the
/// store's writer (see the module doc). A store given a counter nobody counts into waits
/// its whole commit delay, as without one.
#[derive(Debug, Clone, Default)]
pub struct Upcoming(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    /// Calls in progress, counted by the application.
    calls: AtomicUsize,
    /// Writes queued and not yet taken into a commit (from every source). A sender counts
    /// its write once it is in the queue, so the writer may take it first: the count can
    /// be below zero for a moment, which reads as "not every call has written yet".
    queued: AtomicIsize,
    /// Whether the writer is waiting for more writes.
    lingering: AtomicBool,
    /// The writer thread, to wake it.
    writer: OnceLock<Thread>,
}

/// One call in progress; dropping it ends the call.
#[derive(Debug)]
#[must_use = "the call counts only while this is held"]
pub struct UpcomingCall(Upcoming);

impl Drop for UpcomingCall {
    fn drop(&mut self) {
        self.0.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PartialEq for Upcoming {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Upcoming {}

impl Upcoming {
    /// Counts a call in progress until the returned guard is dropped. Hold it until the
    /// call's write has been answered.
    pub fn call(&self) -> UpcomingCall {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        UpcomingCall(self.clone())
    }

    /// The thread that [`Upcoming::linger`]s; the first one set stays.
    pub(crate) fn set_writer(&self, writer: Thread) {
        let _ = self.0.writer.set(writer);
    }

    /// A write was queued: wakes a lingering writer once every call's write is queued.
    pub(crate) fn queued(&self) {
        self.0.queued.fetch_add(1, Ordering::SeqCst);
        if self.0.lingering.load(Ordering::SeqCst)
            && self.all_queued()
            && let Some(writer) = self.0.writer.get()
        {
            writer.unpark();
        }
    }

    /// The writer took `n` queued writes into a commit.
    pub(crate) fn taken(&self, n: usize) {
        self.0
            .queued
            .fetch_sub(isize::try_from(n).unwrap_or(isize::MAX), Ordering::SeqCst);
    }

    /// Whether calls are counted and every one of them has a write queued.
    fn all_queued(&self) -> bool {
        let calls = self.0.calls.load(Ordering::SeqCst);
        calls > 0
            && self.0.queued.load(Ordering::SeqCst) >= isize::try_from(calls).unwrap_or(isize::MAX)
    }

    /// Waits `delay`, or less once every call in progress has queued its write. Called by
    /// the writer thread.
    pub(crate) fn linger(&self, delay: Duration) {
        let deadline = Instant::now() + delay;
        self.0.lingering.store(true, Ordering::SeqCst);
        // `queued` checks after `lingering` is set, so a write queued from here on either
        // is seen below or unparks this thread (an unpark before the park is kept).
        while !self.all_queued() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::park_timeout(deadline - now);
        }
        self.0.lingering.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer thread lingering for `delay` on `upcoming`; returns how long it waited.
    fn linger_on(upcoming: &Upcoming, delay: Duration) -> std::thread::JoinHandle<Duration> {
        let for_writer = upcoming.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            rx.recv().unwrap();
            let started = Instant::now();
            for_writer.linger(delay);
            started.elapsed()
        });
        upcoming.set_writer(writer.thread().clone());
        tx.send(()).unwrap();
        writer
    }

    #[test]
    fn the_writer_stops_waiting_once_every_call_has_queued_its_write() {
        let upcoming = Upcoming::default();
        let (first, second) = (upcoming.call(), upcoming.call());
        upcoming.queued();
        let writer = linger_on(&upcoming, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !writer.is_finished(),
            "one of two calls has not written yet"
        );
        upcoming.queued();
        let waited = writer.join().unwrap();
        assert!(waited < Duration::from_secs(30), "waited {waited:?}");
        drop((first, second));
    }

    #[test]
    fn with_nothing_counted_the_writer_waits_the_whole_delay() {
        let upcoming = Upcoming::default();
        upcoming.queued();
        let waited = linger_on(&upcoming, Duration::from_millis(50))
            .join()
            .unwrap();
        assert!(waited >= Duration::from_millis(50), "waited {waited:?}");
    }

    #[test]
    fn a_write_taken_before_its_sender_counted_it_does_not_end_the_wait() {
        let upcoming = Upcoming::default();
        let _call = upcoming.call();
        // The writer took the write out of the queue before its sender counted it.
        upcoming.taken(1);
        assert!(!upcoming.all_queued());
        upcoming.queued();
        assert!(!upcoming.all_queued(), "that write is taken, not waiting");
        upcoming.queued();
        assert!(upcoming.all_queued());
    }

    #[test]
    fn taken_writes_and_ended_calls_leave_the_counts() {
        let upcoming = Upcoming::default();
        let call = upcoming.call();
        upcoming.queued();
        assert!(upcoming.all_queued());
        upcoming.taken(1);
        assert!(!upcoming.all_queued(), "the call's write was taken");
        drop(call);
        upcoming.queued();
        assert!(!upcoming.all_queued(), "no call is in progress");
    }
}
