//! Drain: signals the process and each connection watch, and a count of
//! live connections so shutdown can wait for in-flight work.
//!
//! There are three levels: the process (SIGTERM, `/quitquitquit`), the
//! inbound listeners (a sidecar's termination drains only those, as
//! istio-agent's `drain_listeners?inboundonly`: the app may still call out
//! while it shuts down), and a connection (its filter chain changed or
//! removed by a configuration update, or its listener replaced). A
//! connection drains when any signal above it or its own fires: HTTP
//! finishes what is in flight and closes, TCP gets the drain deadline. A connection can also be told to close now
//! (a network RBAC re-check denied it): HTTP still finishes the request
//! in flight, TCP closes at once.
//!
//! Two milder steps come before a drain, as Envoy's admin drives them:
//! listeners may be *stopped* (no new connections, the open ones left
//! be: `drain_listeners` without `graceful`), and a *drain sequence* may
//! run (`drain_listeners?graceful`), during which each HTTP response asks
//! [`Drain::drain_close`] whether its connection should close after it:
//! at once under the `immediate` strategy, with a chance growing from 0 to
//! 1 over the drain time under `gradual`, as Envoy's drain manager.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The states of a drain signal, in order: each only moves forward.
const RUNNING: u8 = 0;
/// Listeners stop accepting; open connections are left be.
const STOPPED: u8 = 1;
const DRAINING: u8 = 2;
const CLOSING: u8 = 3;

/// How a drain sequence asks HTTP connections to close (Envoy's
/// `--drain-strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Each response closes its connection with a chance of the time
    /// elapsed over the drain time (Envoy's default).
    #[default]
    Gradual,
    /// Every response closes its connection (what istio-agent asks of Envoy).
    Immediate,
}

/// A drain sequence under way at one level.
struct Sequence {
    started: Instant,
    time: Duration,
    strategy: Strategy,
}

/// One level's signal and drain sequence.
///
/// Every connection has a level of its own, held for its whole life, so a
/// level is small: a state, one `Notify` for the waiters on this level, and
/// a flag saying whether levels were made below it. A level with none (a
/// connection's) wakes only its own waiters when it moves; one with levels
/// below (the process, the inbound listeners) also wakes every waiter of
/// its tree ([`Tree::moved`]), which then looks at its levels again. Those
/// move once or twice in a process's life; a connection's moves with each
/// configuration update that drains it, and must not wake the others.
struct Level {
    state: AtomicU8,
    moved: Notify,
    has_children: AtomicBool,
    sequence: OnceLock<Sequence>,
}

impl Level {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU8::new(RUNNING),
            moved: Notify::new(),
            has_children: AtomicBool::new(false),
            sequence: OnceLock::new(),
        })
    }

    fn at_least(&self, state: u8) -> bool {
        self.state.load(Ordering::SeqCst) >= state
    }
}

/// What the levels made from one root share.
struct Tree {
    /// Tracked connections ([`Drain::track`]), and who waits for none.
    live: AtomicUsize,
    idle: Notify,
    /// Woken when a level with levels below it moves.
    moved: Notify,
}

#[derive(Clone)]
pub struct Drain {
    level: Arc<Level>,
    /// The levels above this one (the process's first).
    parents: Vec<Arc<Level>>,
    tree: Arc<Tree>,
}

/// Held by each connection; dropping it lets shutdown proceed.
pub struct ConnGuard {
    tree: Arc<Tree>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.tree.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tree.idle.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        Self {
            level: Level::new(),
            parents: Vec::new(),
            tree: Arc::new(Tree {
                live: AtomicUsize::new(0),
                idle: Notify::new(),
                moved: Notify::new(),
            }),
        }
    }

    /// A drain below this one: fires on its own or with any above it.
    pub fn child(&self) -> Drain {
        // Before the child can wait: a move of this level from now on
        // wakes the tree (one before this the child sees in the state).
        self.level.has_children.store(true, Ordering::SeqCst);
        let mut parents = self.parents.clone();
        parents.push(self.level.clone());
        Drain {
            level: Level::new(),
            parents,
            tree: self.tree.clone(),
        }
    }

    pub fn track(&self) -> ConnGuard {
        self.tree.live.fetch_add(1, Ordering::AcqRel);
        ConnGuard {
            tree: self.tree.clone(),
        }
    }

    pub fn live_connections(&self) -> usize {
        self.tree.live.load(Ordering::Acquire)
    }

    fn levels(&self) -> impl Iterator<Item = &Arc<Level>> {
        std::iter::once(&self.level).chain(&self.parents)
    }

    pub fn is_draining(&self) -> bool {
        self.levels().any(|l| l.at_least(DRAINING))
    }

    /// Whether listeners under this signal stopped accepting (stopped or
    /// draining, here or above).
    pub fn is_stopped(&self) -> bool {
        self.levels().any(|l| l.at_least(STOPPED))
    }

    /// Whether a drain sequence runs here or above, or a drain started.
    pub fn sequence_started(&self) -> bool {
        self.is_draining() || self.levels().any(|l| l.sequence.get().is_some())
    }

    /// Whether the connection was told to close now.
    pub fn is_closing(&self) -> bool {
        self.level.state.load(Ordering::SeqCst) == CLOSING
    }

    /// Whether the response being sent should close its connection (Envoy's
    /// `drainClose()`) for a drain sequence here or above: always under
    /// [`Strategy::Immediate`] or past the drain time, else with the chance
    /// of the time elapsed over the drain time. (A started drain tells its
    /// connections itself, see [`Drain::signaled`].) Asked for every
    /// response: without a sequence it costs an atomic load per level.
    pub fn drain_close(&self) -> bool {
        self.levels().any(|l| {
            l.sequence.get().is_some_and(|s| {
                let elapsed = s.started.elapsed();
                match s.strategy {
                    Strategy::Immediate => true,
                    Strategy::Gradual if elapsed >= s.time => true,
                    Strategy::Gradual => {
                        let time = s.time.as_millis().max(1) as u64;
                        (elapsed.as_millis() as u64) > rand::random::<u64>() % time
                    }
                }
            })
        })
    }

    /// Resolves once draining has started (here or above).
    ///
    /// (The waits are `reached`'s own futures, not wrapped in another:
    /// every connection keeps one while it lives.)
    pub fn signaled(&self) -> impl Future<Output = ()> + Send + '_ {
        self.reached(DRAINING)
    }

    /// Resolves once listeners under this signal are to stop accepting.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + '_ {
        self.reached(STOPPED)
    }

    async fn reached(&self, state: u8) {
        loop {
            // Listening before looking: a move between the two still wakes.
            let own = self.level.moved.notified();
            let tree = self.tree.moved.notified();
            tokio::pin!(own, tree);
            own.as_mut().enable();
            tree.as_mut().enable();
            if self.levels().any(|l| l.at_least(state)) {
                return;
            }
            tokio::select! {
                () = own => {}
                () = tree => {}
            }
        }
    }

    /// Resolves once the connection was told to close now; never otherwise.
    pub async fn closing(&self) {
        loop {
            let own = self.level.moved.notified();
            tokio::pin!(own);
            own.as_mut().enable();
            if self.is_closing() {
                return;
            }
            own.await;
        }
    }

    fn advance(&self, state: u8) {
        let level = &self.level;
        if level.state.fetch_max(state, Ordering::SeqCst) < state {
            level.moved.notify_waiters();
            if level.has_children.load(Ordering::SeqCst) {
                self.tree.moved.notify_waiters();
            }
        }
    }

    pub fn start(&self) {
        self.advance(DRAINING);
    }

    /// Stops the listeners under this signal; their open connections go on.
    pub fn stop_listeners(&self) {
        self.advance(STOPPED);
    }

    /// Starts a drain sequence of `time` here (once: a second does nothing).
    pub fn start_sequence(&self, time: Duration, strategy: Strategy) {
        let _ = self.level.sequence.set(Sequence {
            started: Instant::now(),
            time,
            strategy,
        });
    }

    /// Tells the connection to close now (it counts as draining too).
    pub fn close(&self) {
        self.advance(CLOSING);
    }

    /// Starts draining and waits until every tracked connection is done, or
    /// the deadline passes. Returns the connections still open.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.start();
        self.wait_idle(deadline).await
    }

    /// Waits until every tracked connection is done, or the deadline
    /// passes. Returns the connections still open.
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        let wait = async {
            loop {
                let notified = self.tree.idle.notified();
                if self.live_connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.live_connections()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_connections_up_to_deadline() {
        let d = Drain::new();
        let g = d.track();
        let d2 = d.clone();
        let h = tokio::spawn(async move { d2.drain(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(d.is_draining());
        drop(g);
        assert_eq!(h.await.unwrap(), 0);

        let _g = d.track();
        assert_eq!(d.drain(Duration::from_secs(5)).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn generation_drains_alone_or_with_the_process() {
        let process = Drain::new();
        let old = process.child();
        let new = process.child();
        old.start();
        tokio::time::timeout(Duration::from_secs(1), old.signaled())
            .await
            .unwrap();
        assert!(!new.is_draining());
        assert!(
            tokio::time::timeout(Duration::from_secs(1), new.signaled())
                .await
                .is_err()
        );
        process.start();
        tokio::time::timeout(Duration::from_secs(1), new.signaled())
            .await
            .unwrap();
        assert!(new.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn inbound_level_drains_its_connections_alone_or_with_the_process() {
        let process = Drain::new();
        let inbound = process.child();
        let inbound_conn = inbound.child();
        let outbound_conn = process.child();
        inbound.start();
        tokio::time::timeout(Duration::from_secs(1), inbound_conn.signaled())
            .await
            .unwrap();
        assert!(inbound_conn.is_draining() && !outbound_conn.is_draining());
        assert!(!process.is_draining());
        let other = Drain::new();
        let level = other.child();
        let conn = level.child();
        other.start();
        tokio::time::timeout(Duration::from_secs(1), conn.signaled())
            .await
            .unwrap();
        assert!(conn.is_draining() && level.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_told_to_close_is_draining_too() {
        let process = Drain::new();
        let conn = process.child();
        assert!(!conn.is_closing());
        assert!(
            tokio::time::timeout(Duration::from_secs(1), conn.closing())
                .await
                .is_err()
        );
        conn.close();
        tokio::time::timeout(Duration::from_secs(1), conn.closing())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), conn.signaled())
            .await
            .unwrap();
        assert!(conn.is_draining() && conn.is_closing());
        // Draining later does not take the close back.
        conn.start();
        assert!(conn.is_closing());
        assert!(!process.is_draining());
    }

    /// Waiters already waiting are woken by a move of their level or one
    /// above; a connection's move wakes its own waiters only, not the other
    /// connections of the tree.
    #[tokio::test(start_paused = true)]
    async fn a_move_wakes_the_waiters_it_concerns() {
        use std::sync::atomic::AtomicUsize;
        let process = Drain::new();
        let inbound = process.child();
        let a = inbound.child();
        let b = inbound.child();
        let polls = Arc::new(AtomicUsize::new(0));
        let b_waits = tokio::spawn({
            let polls = polls.clone();
            async move {
                let signaled = b.signaled();
                tokio::pin!(signaled);
                std::future::poll_fn(|cx| {
                    polls.fetch_add(1, Ordering::SeqCst);
                    signaled.as_mut().poll(cx)
                })
                .await;
            }
        });
        let a_closes = tokio::spawn({
            let a = a.clone();
            async move { a.closing().await }
        });
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        let before = polls.load(Ordering::SeqCst);
        assert_eq!(before, 1, "b waits");
        a.close();
        tokio::time::timeout(Duration::from_secs(1), a_closes)
            .await
            .unwrap()
            .unwrap();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(polls.load(Ordering::SeqCst), before, "b was not woken");
        assert!(!b_waits.is_finished());
        // A level with levels below wakes them.
        inbound.start();
        tokio::time::timeout(Duration::from_secs(1), b_waits)
            .await
            .unwrap()
            .unwrap();
        // A level made after its parent moved sees it at once.
        let late = inbound.child();
        tokio::time::timeout(Duration::from_secs(1), late.signaled())
            .await
            .unwrap();
        assert!(!process.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn stopped_listeners_leave_their_connections_be() {
        let process = Drain::new();
        let inbound = process.child();
        let conn = inbound.child();
        inbound.stop_listeners();
        tokio::time::timeout(Duration::from_secs(1), conn.stopped())
            .await
            .unwrap();
        assert!(conn.is_stopped() && !conn.is_draining() && !conn.drain_close());
        assert!(
            tokio::time::timeout(Duration::from_secs(1), conn.signaled())
                .await
                .is_err()
        );
        assert!(!process.is_stopped());
        process.start();
        assert!(conn.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn an_immediate_sequence_closes_on_the_next_response() {
        let process = Drain::new();
        let conn = process.child();
        assert!(!conn.drain_close() && !conn.sequence_started());
        process.start_sequence(Duration::from_secs(600), Strategy::Immediate);
        assert!(conn.sequence_started() && conn.drain_close());
        // A sequence neither stops listeners nor drains connections.
        assert!(!conn.is_stopped() && !conn.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn a_gradual_sequence_closes_more_often_as_it_goes() {
        let process = Drain::new();
        let conn = process.child();
        process.start_sequence(Duration::from_secs(100), Strategy::Gradual);
        let share = |n: u32| (0..n).filter(|_| conn.drain_close()).count() as f64 / f64::from(n);
        assert_eq!(share(1000), 0.0, "nothing at the start");
        tokio::time::advance(Duration::from_secs(25)).await;
        let early = share(4000);
        tokio::time::advance(Duration::from_secs(50)).await;
        let late = share(4000);
        assert!((0.2..0.3).contains(&early), "a quarter in: {early}");
        assert!((0.7..0.8).contains(&late), "three quarters in: {late}");
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(share(1000), 1.0, "always once the drain time is over");
        // A second sequence does not restart the first.
        process.start_sequence(Duration::from_secs(100), Strategy::Gradual);
        assert_eq!(share(100), 1.0);
    }
}
