//! The in-process engine: ranks are threads sharing one `Group`.
//!
//! A collective publishes each rank's input in a per-rank slot, meets at a barrier, lets rank
//! `r` reduce shard `r` (summing the ranks in order 0..n, so the result is deterministic), meets
//! again, and copies the shards back: the shared-memory form of reduce-scatter + all-gather.
//! Slots come in two sets used alternately, so the next collective can start writing while a
//! slow rank is still reading the previous one's results (the barrier of the collective in
//! between guarantees that every rank has finished reading a set before it is reused).
//!
//! Every wait is bounded by the timeout; a rank whose handle is dropped (it returned, errored
//! or panicked) is marked dead, and anyone waiting for it gets `PeerFailed` at once.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::{shard_range, Comm, CommError, ReduceOp};

/// What a rank is doing at a barrier; every rank must agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Sig {
    op: &'static str,
    len: usize,
    root: usize,
}

struct State {
    /// The number of barriers each rank has reached.
    arrived: Vec<u64>,
    /// Each rank's signature at its latest barrier, by barrier parity (a rank can be at most
    /// one barrier ahead of a rank still checking the previous one).
    sig: [Vec<Sig>; 2],
    alive: Vec<bool>,
    /// For a rank that gave up because of another (it timed out on it, or found it dead), that
    /// rank: followed to the root cause, so every survivor names the same culprit.
    cause: Vec<Option<usize>>,
    /// Point-to-point messages by (src, dst, tag), in send order.
    mail: HashMap<(usize, usize, u32), VecDeque<Vec<f32>>>,
    /// Groups being formed by `split`, by (split number, color).
    splits: HashMap<(u64, usize), Arc<Group>>,
}

impl State {
    /// The rank whose failure made rank `j` give up (`j` itself if it failed first).
    fn culprit(&self, mut j: usize, me: usize) -> usize {
        for _ in 0..self.cause.len() {
            match self.cause[j] {
                Some(c) if c != me && c != j => j = c,
                _ => break,
            }
        }
        j
    }

    /// Rank `me` gives up on a collective because of rank `j`: the error to return.
    /// `j` may itself have withdrawn from this collective because of another rank (it timed
    /// out first): the chain is followed even while `j` is alive, so every survivor names the
    /// stalled rank rather than whichever survivor happened to give up before it.
    /// A root cause that is still alive stalled: that is a timeout, whoever noticed it first.
    /// A dead one may have given up because of a rank of another group (a tensor-parallel
    /// peer, say): the world ledger follows that chain too.
    fn give_up(&mut self, me: usize, j: usize, op: &'static str, g: &Group) -> CommError {
        let c = self.culprit(j, me);
        self.cause[me] = Some(c);
        if self.alive[c] {
            g.ledger.record(g.world[me], g.world[c]);
            return CommError::Timeout { op, waiting_for: g.world[c], timeout: g.timeout };
        }
        let root = g.ledger.root_cause(g.world[c], g.world[me]);
        g.ledger.record(g.world[me], root);
        CommError::PeerFailed { op, rank: root }
    }
}

/// Why each world rank gave up, shared by every group split from one world.
struct Ledger {
    cause: Mutex<Vec<Option<usize>>>,
}

impl Ledger {
    fn new(n: usize) -> Arc<Ledger> {
        Arc::new(Ledger { cause: Mutex::new(vec![None; n]) })
    }

    fn record(&self, me: usize, cause: usize) {
        self.cause.lock().unwrap_or_else(|e| e.into_inner())[me] = Some(cause);
    }

    /// The rank at the end of the chain of causes from world rank `r` (not `me`).
    fn root_cause(&self, mut r: usize, me: usize) -> usize {
        let cause = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..cause.len() {
            match cause[r] {
                Some(c) if c != me && c != r => r = c,
                _ => break,
            }
        }
        r
    }
}

/// Per-rank publication buffers for one element type, in two alternating sets.
struct Slots<T> {
    input: [Vec<RwLock<Vec<T>>>; 2],
    output: [Vec<RwLock<Vec<T>>>; 2],
}

impl<T> Slots<T> {
    fn new(n: usize) -> Slots<T> {
        let set = || (0..n).map(|_| RwLock::new(Vec::new())).collect::<Vec<_>>();
        Slots { input: [set(), set()], output: [set(), set()] }
    }
}

struct Group {
    size: usize,
    /// World rank of each member, so errors from a sub-group name the rank the user knows.
    world: Vec<usize>,
    ledger: Arc<Ledger>,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
    f32s: Slots<f32>,
    f64s: Slots<f64>,
}

impl Group {
    fn new(world: Vec<usize>, timeout: Duration, ledger: Arc<Ledger>) -> Arc<Group> {
        let n = world.len();
        Arc::new(Group {
            size: n,
            world,
            ledger,
            timeout,
            state: Mutex::new(State {
                arrived: vec![0; n],
                sig: [vec![Sig::default(); n], vec![Sig::default(); n]],
                alive: vec![true; n],
                cause: vec![None; n],
                mail: HashMap::new(),
                splits: HashMap::new(),
            }),
            cv: Condvar::new(),
            f32s: Slots::new(n),
            f64s: Slots::new(n),
        })
    }

    // A rank that panicked while holding a lock has already been marked dead; the data behind
    // the lock is only ever read by a collective that will fail, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Element types the engine moves and reduces.
trait Elem: Copy + Send + Sync + PartialOrd + std::ops::Add<Output = Self> + std::ops::Div<Output = Self> {
    fn from_usize(n: usize) -> Self;
    fn is_nan(self) -> bool;
    fn slots(g: &Group) -> &Slots<Self>;
    /// Which slot set this rank uses next for this type (toggles per collective).
    fn next_set(c: &ThreadComm) -> usize;
}

impl Elem for f32 {
    fn from_usize(n: usize) -> f32 {
        n as f32
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    fn slots(g: &Group) -> &Slots<f32> {
        &g.f32s
    }
    fn next_set(c: &ThreadComm) -> usize {
        let s = c.set32.get();
        c.set32.set(s ^ 1);
        s
    }
}

impl Elem for f64 {
    fn from_usize(n: usize) -> f64 {
        n as f64
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    fn slots(g: &Group) -> &Slots<f64> {
        &g.f64s
    }
    fn next_set(c: &ThreadComm) -> usize {
        let s = c.set64.get();
        c.set64.set(s ^ 1);
        s
    }
}

/// One rank of an in-process group. Create a group with [`ThreadComm::group`] and move each
/// handle into its own thread, or let [`ThreadComm::launch`] do both.
pub struct ThreadComm {
    group: Arc<Group>,
    rank: usize,
    /// Barriers this rank has passed.
    gen: Cell<u64>,
    set32: Cell<usize>,
    set64: Cell<usize>,
    splits: Cell<u64>,
    broken: Cell<bool>,
}

impl ThreadComm {
    /// `n` connected handles, rank `i` at index `i`; every blocking call gives up after `timeout`.
    pub fn group(n: usize, timeout: Duration) -> Vec<ThreadComm> {
        let g = Group::new((0..n).collect(), timeout, Ledger::new(n));
        (0..n).map(|rank| ThreadComm::member(g.clone(), rank)).collect()
    }

    fn member(group: Arc<Group>, rank: usize) -> ThreadComm {
        ThreadComm {
            group,
            rank,
            gen: Cell::new(0),
            set32: Cell::new(0),
            set64: Cell::new(0),
            splits: Cell::new(0),
            broken: Cell::new(false),
        }
    }

    /// Runs `f` on `n` threads, one rank each, and returns each rank's result in rank order
    /// (`Err` holds the panic payload of a rank that panicked).
    pub fn launch<R, F>(n: usize, timeout: Duration, f: F) -> Vec<std::thread::Result<R>>
    where
        R: Send,
        F: Fn(ThreadComm) -> R + Sync,
    {
        let comms = ThreadComm::group(n, timeout);
        std::thread::scope(|s| {
            let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join()).collect()
        })
    }

    pub fn timeout(&self) -> Duration {
        self.group.timeout
    }

    fn world(&self, r: usize) -> usize {
        self.group.world[r]
    }

    /// Runs one collective; any error leaves this handle broken and marks the rank dead, so the
    /// others stop waiting for it.
    fn guarded<R>(&self, op: &'static str, f: impl FnOnce() -> Result<R, CommError>) -> Result<R, CommError> {
        if self.broken.get() {
            return Err(CommError::Broken(format!("{op} after an earlier failure on rank {}", self.world(self.rank))));
        }
        let r = f();
        if r.is_err() {
            self.broken.set(true);
            self.leave();
        }
        r
    }

    fn leave(&self) {
        let mut st = self.group.lock();
        st.alive[self.rank] = false;
        drop(st);
        self.group.cv.notify_all();
    }

    /// Waits until every rank has reached this barrier and checks they agree on `sig`.
    fn barrier_sig(&self, sig: Sig) -> Result<(), CommError> {
        let g = &self.group;
        let gen = self.gen.get() + 1;
        self.gen.set(gen);
        let parity = (gen % 2) as usize;
        let deadline = Instant::now() + g.timeout;
        let mut st = g.lock();
        st.arrived[self.rank] = gen;
        st.sig[parity][self.rank] = sig;
        g.cv.notify_all();
        while let Some(j) = (0..g.size).find(|&j| st.arrived[j] < gen) {
            let now = Instant::now();
            if !st.alive[j] || now >= deadline {
                // Withdraw: a rank arriving late must not count this rank as present.
                st.arrived[self.rank] = gen - 1;
                return Err(st.give_up(self.rank, j, sig.op, g));
            }
            st = g.cv.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        if let Some(j) = (0..g.size).find(|&j| st.sig[parity][j] != sig) {
            let other = st.sig[parity][j];
            return Err(CommError::Mismatch {
                op: sig.op,
                msg: format!(
                    "rank {} called {}(len {}, root {}) while rank {} called {}(len {}, root {})",
                    self.world(self.rank),
                    sig.op,
                    sig.len,
                    sig.root,
                    self.world(j),
                    other.op,
                    other.len,
                    other.root
                ),
            });
        }
        Ok(())
    }

    fn publish<T: Elem>(&self, set: usize, data: &[T]) {
        let mut slot = write(&T::slots(&self.group).input[set][self.rank]);
        slot.clear();
        slot.extend_from_slice(data);
    }

    /// Reduces `range` over every rank's published input, in rank order, into `out`.
    fn reduce_range<T: Elem>(&self, set: usize, range: std::ops::Range<usize>, op: ReduceOp, out: &mut Vec<T>) {
        let inputs: Vec<_> = T::slots(&self.group).input[set].iter().map(read).collect();
        out.clear();
        out.extend_from_slice(&inputs[0][range.clone()]);
        for inp in &inputs[1..] {
            let src = &inp[range.clone()];
            match op {
                ReduceOp::Sum | ReduceOp::Mean => out.iter_mut().zip(src).for_each(|(o, &x)| *o = *o + x),
                // NaN propagates, as in a sum.
                ReduceOp::Max => out.iter_mut().zip(src).for_each(|(o, &x)| {
                    if x > *o || x.is_nan() {
                        *o = x
                    }
                }),
            }
        }
        if op == ReduceOp::Mean {
            let n = T::from_usize(self.group.size);
            out.iter_mut().for_each(|o| *o = *o / n);
        }
    }

    fn all_reduce_t<T: Elem>(&self, op_name: &'static str, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        self.guarded(op_name, || {
            let n = self.group.size;
            if n == 1 {
                return Ok(());
            }
            let sig = Sig { op: op_name, len: buf.len(), root: op as usize };
            let set = T::next_set(self);
            self.publish(set, buf);
            self.barrier_sig(sig)?;
            let slots = T::slots(&self.group);
            {
                let mut out = write(&slots.output[set][self.rank]);
                self.reduce_range(set, shard_range(buf.len(), n, self.rank), op, &mut out);
            }
            self.barrier_sig(sig)?;
            let len = buf.len();
            for k in 0..n {
                buf[shard_range(len, n, k)].copy_from_slice(&read(&slots.output[set][k]));
            }
            Ok(())
        })
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn engine(&self) -> &'static str {
        "threads"
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.all_reduce_t("all_reduce", buf, op)
    }

    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<(), CommError> {
        self.all_reduce_t("all_reduce_f64", buf, op)
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        const OP: &str = "reduce_scatter";
        self.guarded(OP, || {
            let n = self.group.size;
            let mine = shard_range(input.len(), n, self.rank);
            if output.len() != mine.len() {
                return Err(CommError::Invalid {
                    op: OP,
                    msg: format!("output holds {} values, rank {}'s shard is {}", output.len(), self.rank, mine.len()),
                });
            }
            if n == 1 {
                output.copy_from_slice(input);
                return Ok(());
            }
            let set = f32::next_set(self);
            self.publish(set, input);
            self.barrier_sig(Sig { op: OP, len: input.len(), root: op as usize })?;
            let mut out = Vec::with_capacity(mine.len());
            self.reduce_range(set, mine, op, &mut out);
            output.copy_from_slice(&out);
            Ok(())
        })
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        const OP: &str = "all_gather";
        self.guarded(OP, || {
            let n = self.group.size;
            let mine = shard_range(output.len(), n, self.rank);
            if input.len() != mine.len() {
                return Err(CommError::Invalid {
                    op: OP,
                    msg: format!("input holds {} values, rank {}'s shard is {}", input.len(), self.rank, mine.len()),
                });
            }
            if n == 1 {
                output.copy_from_slice(input);
                return Ok(());
            }
            let set = f32::next_set(self);
            self.publish(set, input);
            self.barrier_sig(Sig { op: OP, len: output.len(), root: 0 })?;
            let inputs = &self.group.f32s.input[set];
            let len = output.len();
            for (k, slot) in inputs.iter().enumerate() {
                output[shard_range(len, n, k)].copy_from_slice(&read(slot));
            }
            Ok(())
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        const OP: &str = "broadcast";
        self.guarded(OP, || {
            let n = self.group.size;
            if root >= n {
                return Err(CommError::Invalid { op: OP, msg: format!("root {root} is outside a group of {n}") });
            }
            if n == 1 {
                return Ok(());
            }
            let set = f32::next_set(self);
            if self.rank == root {
                self.publish(set, buf);
            }
            self.barrier_sig(Sig { op: OP, len: buf.len(), root })?;
            if self.rank != root {
                buf.copy_from_slice(&read(&self.group.f32s.input[set][root]));
            }
            Ok(())
        })
    }

    fn send(&self, buf: &[f32], dest: usize, tag: u32) -> Result<(), CommError> {
        const OP: &str = "send";
        self.guarded(OP, || {
            let g = &self.group;
            if dest >= g.size || dest == self.rank {
                return Err(CommError::Invalid {
                    op: OP,
                    msg: format!("rank {} cannot send to rank {dest}", self.rank),
                });
            }
            let msg = buf.to_vec();
            let mut st = g.lock();
            if !st.alive[dest] {
                return Err(st.give_up(self.rank, dest, OP, g));
            }
            st.mail.entry((self.rank, dest, tag)).or_default().push_back(msg);
            drop(st);
            g.cv.notify_all();
            Ok(())
        })
    }

    fn recv(&self, buf: &mut [f32], src: usize, tag: u32) -> Result<(), CommError> {
        const OP: &str = "recv";
        self.guarded(OP, || {
            let g = &self.group;
            if src >= g.size || src == self.rank {
                return Err(CommError::Invalid {
                    op: OP,
                    msg: format!("rank {} cannot receive from rank {src}", self.rank),
                });
            }
            let deadline = Instant::now() + g.timeout;
            let mut st = g.lock();
            loop {
                if let Some(msg) = st.mail.get_mut(&(src, self.rank, tag)).and_then(|q| q.pop_front()) {
                    if msg.len() != buf.len() {
                        return Err(CommError::Mismatch {
                            op: OP,
                            msg: format!("rank {src} sent {} values, {} expected", msg.len(), buf.len()),
                        });
                    }
                    buf.copy_from_slice(&msg);
                    return Ok(());
                }
                let now = Instant::now();
                if !st.alive[src] || now >= deadline {
                    return Err(st.give_up(self.rank, src, OP, g));
                }
                st = g.cv.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            }
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.guarded("barrier", || {
            if self.group.size == 1 {
                Ok(())
            } else {
                self.barrier_sig(Sig { op: "barrier", ..Sig::default() })
            }
        })
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Comm>, CommError> {
        self.split_threads(color, key).map(|c| Box::new(c) as Box<dyn Comm>)
    }
}

impl ThreadComm {
    /// [`Comm::split`] with the concrete type.
    pub fn split_threads(&self, color: usize, key: usize) -> Result<ThreadComm, CommError> {
        const OP: &str = "split";
        let n = self.group.size;
        // f64 carries integers exactly below 2^53, far beyond any color or key in use.
        let mut ck = vec![0.0f64; 2 * n];
        ck[2 * self.rank] = color as f64;
        ck[2 * self.rank + 1] = key as f64;
        self.all_reduce_t(OP, &mut ck, ReduceOp::Sum)?;
        self.guarded(OP, || {
            let mut members: Vec<usize> = (0..n).filter(|&j| ck[2 * j] as usize == color).collect();
            members.sort_by_key(|&j| (ck[2 * j + 1] as usize, j));
            let new_rank = members.iter().position(|&j| j == self.rank).expect("a rank is in its own color");
            let id = (self.splits.get(), color);
            self.splits.set(id.0 + 1);
            let world = members.iter().map(|&j| self.world(j)).collect();
            let group = self
                .group
                .lock()
                .splits
                .entry(id)
                .or_insert_with(|| Group::new(world, self.group.timeout, self.group.ledger.clone()))
                .clone();
            // Everyone has fetched its group after this barrier; the leader then drops the entry.
            self.barrier_sig(Sig { op: OP, len: 0, root: 0 })?;
            if new_rank == 0 {
                self.group.lock().splits.remove(&id);
            }
            Ok(ThreadComm::member(group, new_rank))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window the integration test `a_stalled_rank_times_out_the_others` once hit on a
    /// loaded machine: rank 0 has timed out on stalled rank 2 and withdrawn, but has not yet
    /// marked itself dead, when rank 1's deadline passes and it finds rank 0 missing.
    #[test]
    fn a_survivor_that_gave_up_first_is_not_named_as_the_culprit() {
        let g = Group::new(vec![0, 1, 2], Duration::from_secs(1), Ledger::new(3));
        let mut st = g.lock();
        let first = st.give_up(0, 2, "barrier", &g);
        assert!(matches!(first, CommError::Timeout { waiting_for: 2, .. }), "{first:?}");
        assert!(st.alive[0], "rank 0 is still alive in this window");
        let second = st.give_up(1, 0, "barrier", &g);
        assert!(matches!(second, CommError::Timeout { waiting_for: 2, .. }), "{second:?}");
    }
}
