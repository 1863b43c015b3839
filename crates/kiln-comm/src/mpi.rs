//! The MPI engine (feature `mpi`): ranks are processes started by `mpirun`, on one machine or
//! many, talking through Open MPI (the `mpi` crate, rsmpi).
//!
//! # Numerics
//!
//! The same as [`ThreadComm`](crate::ThreadComm), bit for bit: `MPI_Allreduce` promises no
//! summation order, so it is not used. A reduce-scatter is an all-to-all of shards (rank `r`
//! receives every rank's copy of shard `r` and sums them in rank order 0..n), and an all-reduce
//! is that reduce-scatter followed by an all-gather of the reduced shards.
//!
//! # Timeouts
//!
//! Every collective is built from one nonblocking send and one nonblocking receive per peer
//! (`MPI_Isend`/`MPI_Irecv`), polled with `MPI_Test` until a deadline. A collective first
//! exchanges a small header (which collective, its length, its root or reduce op, and a
//! sequence number) with every peer, so ranks that disagree get [`CommError::Mismatch`] and a
//! rank that never arrives is known by name: the timeout error names the first peer whose
//! message is missing. `MPI_Comm_split` and `MPI_Comm_dup` have no nonblocking form; `split`
//! first meets every rank through a timed header exchange, so it only blocks once everyone is
//! known to be there.
//!
//! After an error the handle is broken, and every buffer that MPI might still touch (the
//! receive and send buffers of the requests left pending) is leaked on purpose: MPI only ever
//! reads or writes memory this engine owns, never the caller's slices, so an abandoned request
//! cannot scribble on freed memory. That costs a copy in and a copy out per collective.
//!
//! A rank that *dies* is Open MPI's business: by default `mpirun` aborts the whole job when a
//! process exits without `MPI_Finalize` or with a non-zero status, killing the survivors and
//! printing which rank it was. So on this engine a dead peer shows up as the job ending, and a
//! stalled peer as [`CommError::Timeout`].
//!
//! # Threads
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: any thread may call MPI, never two at a
//! time. Every MPI call of this module holds one process-wide lock, which is what makes the
//! raw communicator handles (plain pointers in Open MPI) sound to move between threads, so
//! [`MpiComm`] is `Send` as the [`Comm`] trait requires. It is not `Sync`.
//!
//! MPI is finalised when the last handle (world or split) is dropped, and cannot be initialised
//! again in the same process (an MPI rule). `MPI_Finalize` waits for every rank to arrive; after
//! a communication error in this process it waits at most two timeouts (at least 5 s), then the
//! process exits with status 1 rather than hang (Open MPI then ends the job).

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void};
use std::mem::{ManuallyDrop, MaybeUninit};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use mpi::environment::Universe;
use mpi::ffi;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::{AsRaw, Communicator};
use mpi::Threading;

use crate::{shard_range, Comm, CommError, ReduceOp};

/// Held around every MPI call: `MPI_THREAD_SERIALIZED` is promised.
static MPI_LOCK: Mutex<()> = Mutex::new(());
/// The live MPI environment, shared by every handle; MPI is finalised when the last one goes.
static ENV: Mutex<Weak<Env>> = Mutex::new(Weak::new());
/// Set once any collective of this process failed: requests may be left pending, and a peer
/// may never reach `MPI_Finalize`, so finalising gets a watchdog.
static TROUBLE: AtomicBool = AtomicBool::new(false);
/// The longest timeout of a handle that failed, in milliseconds: the watchdog's grace is twice it.
static TROUBLE_GRACE_MS: AtomicU64 = AtomicU64::new(0);

fn mpi_lock() -> MutexGuard<'static, ()> {
    MPI_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

extern "C" {
    /// Ends the process without atexit handlers (which could wait on MPI's internal locks).
    fn _exit(status: c_int) -> !;
}

struct Env {
    universe: ManuallyDrop<Universe>,
    tag_ub: i32,
}

// SAFETY: `Universe` only carries MPI state; it is dropped (MPI_Finalize) under MPI_LOCK, and
// MPI runs at MPI_THREAD_SERIALIZED, which allows any thread to call it, one at a time.
unsafe impl Send for Env {}
unsafe impl Sync for Env {}

impl Drop for Env {
    fn drop(&mut self) {
        if TROUBLE.load(Ordering::SeqCst) {
            // Two timeouts: a peer may still be finishing a collective that times out on the
            // same stall, and one more that it started before noticing.
            let grace = Duration::from_millis(TROUBLE_GRACE_MS.load(Ordering::SeqCst).saturating_mul(2).max(5000));
            // Detached: if MPI_Finalize returns first, the process goes on and this thread
            // dies with it.
            std::thread::spawn(move || {
                std::thread::sleep(grace);
                eprintln!(
                    "kiln-comm: MPI_Finalize did not complete within {grace:?} after a communication error \
                     (a peer stalled or failed); exiting with status 1 instead of hanging"
                );
                // SAFETY: _exit is async-signal-safe and takes no locks.
                unsafe { _exit(1) }
            });
        }
        let _g = mpi_lock();
        // SAFETY: dropped once, here; every communicator was freed before (they hold an Arc).
        unsafe { ManuallyDrop::drop(&mut self.universe) };
    }
}

fn mpi_error(what: &str, code: c_int) -> CommError {
    let mut buf = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_ERROR_STRING characters, as MPI_Error_string requires.
    let rc = unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr().cast(), &mut len) };
    let text = if rc == ffi::MPI_SUCCESS as c_int {
        String::from_utf8_lossy(&buf[..len.max(0) as usize]).into_owned()
    } else {
        format!("error code {code}")
    };
    CommError::Mpi(format!("{what}: {text}"))
}

/// Element types the engine moves and reduces.
trait Elem: Copy + Default + PartialOrd + std::ops::Add<Output = Self> + std::ops::Div<Output = Self> {
    fn from_usize(n: usize) -> Self;
    fn is_nan(self) -> bool;
    fn datatype() -> ffi::MPI_Datatype;
    fn scratch(c: &MpiComm) -> &RefCell<Vec<Self>>;
}

impl Elem for f32 {
    fn from_usize(n: usize) -> f32 {
        n as f32
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: a constant handle set up by the MPI library.
        unsafe { ffi::RSMPI_FLOAT }
    }
    fn scratch(c: &MpiComm) -> &RefCell<Vec<f32>> {
        &c.scratch32
    }
}

impl Elem for f64 {
    fn from_usize(n: usize) -> f64 {
        n as f64
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as above.
        unsafe { ffi::RSMPI_DOUBLE }
    }
    fn scratch(c: &MpiComm) -> &RefCell<Vec<f64>> {
        &c.scratch64
    }
}

/// `out[i] = combine(out[i], x[i])`, the ThreadComm way (NaN propagates through Max).
fn combine<T: Elem>(out: &mut [T], src: &[T], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => out.iter_mut().zip(src).for_each(|(o, &x)| *o = *o + x),
        ReduceOp::Max => out.iter_mut().zip(src).for_each(|(o, &x)| {
            if x > *o || x.is_nan() {
                *o = x
            }
        }),
    }
}

/// The collectives, as they appear in headers.
const OPS: [&str; 8] =
    ["?", "all_reduce", "all_reduce_f64", "reduce_scatter", "all_gather", "broadcast", "barrier", "split"];

fn op_code(op: &str) -> u64 {
    OPS.iter().position(|&o| o == op).unwrap_or(0) as u64
}

/// What a rank is doing at a collective; every rank must agree. `extra` travels but is not
/// compared (split's color and key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    op: u64,
    len: u64,
    aux: u64,
    seq: u64,
    extra: [u64; 2],
}

impl Header {
    const WORDS: usize = 6;
    fn words(&self) -> [u64; Header::WORDS] {
        [self.op, self.len, self.aux, self.seq, self.extra[0], self.extra[1]]
    }
    fn from_words(w: &[u64]) -> Header {
        Header { op: w[0], len: w[1], aux: w[2], seq: w[3], extra: [w[4], w[5]] }
    }
    fn describe(&self) -> String {
        let op = OPS.get(self.op as usize).copied().unwrap_or("?");
        format!("{op}(len {}, root/op {}) as collective #{}", self.len, self.aux, self.seq)
    }
}

/// One nonblocking operation in flight.
struct Req {
    req: ffi::MPI_Request,
    peer: usize,
    /// For a receive, the number of elements expected.
    recv: Option<usize>,
    datatype: ffi::MPI_Datatype,
    done: bool,
}

/// A point-to-point send still in flight: its buffer lives here until MPI is done with it.
struct PendingSend {
    req: ffi::MPI_Request,
    _buf: Vec<f32>,
}

/// One rank's handle on a group of MPI processes. Get the world with [`MpiComm::world`], then
/// [`Comm::split`] it (or [`MpiComm::split_mpi`] for the concrete type).
pub struct MpiComm {
    /// Freed (MPI_Comm_free) under the lock in `Drop`, before `env` can finalise MPI.
    comm: ManuallyDrop<SimpleCommunicator>,
    rank: usize,
    size: usize,
    /// MPI_COMM_WORLD rank of each member, so errors name the rank the user knows.
    world: Vec<usize>,
    timeout: Duration,
    seq: Cell<u64>,
    broken: RefCell<Option<String>>,
    scratch32: RefCell<Vec<f32>>,
    scratch64: RefCell<Vec<f64>>,
    /// Receive buffers for all-to-all shards (f32 and f64 share nothing, so two).
    recv32: RefCell<Vec<f32>>,
    recv64: RefCell<Vec<f64>>,
    pending: RefCell<Vec<PendingSend>>,
    env: Arc<Env>,
}

// SAFETY: the communicator is an MPI handle (a pointer in Open MPI) with no thread affinity;
// MPI runs at MPI_THREAD_SERIALIZED and every MPI call here holds MPI_LOCK, so moving a handle
// to another thread and calling MPI from there is allowed. The RefCells make MpiComm !Sync, so
// one handle is never used from two threads at once. The request handles in `pending` are
// likewise plain MPI handles touched only under the lock.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// Initialises MPI (once per process, at `MPI_THREAD_SERIALIZED`) and returns this process's
    /// handle on all ranks of the job: a private duplicate of `MPI_COMM_WORLD`, so several
    /// handles never mix up their messages. Blocks until every rank has called it (MPI_Init and
    /// MPI_Comm_dup are blocking). Every later blocking call gives up after `timeout`.
    ///
    /// Outside `mpirun` this is a world of one rank.
    pub fn world(timeout: Duration) -> Result<MpiComm, CommError> {
        let mut slot = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let env = match slot.upgrade() {
            Some(env) => env,
            None => {
                let env = Arc::new(Env::init()?);
                *slot = Arc::downgrade(&env);
                env
            }
        };
        drop(slot);
        let _g = mpi_lock();
        let world = env.universe.world();
        let comm = world.duplicate();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        Ok(MpiComm::new(comm, rank, (0..size).collect(), timeout, env.clone()))
    }

    fn new(comm: SimpleCommunicator, rank: usize, world: Vec<usize>, timeout: Duration, env: Arc<Env>) -> MpiComm {
        MpiComm {
            comm: ManuallyDrop::new(comm),
            rank,
            size: world.len(),
            world,
            timeout,
            seq: Cell::new(0),
            broken: RefCell::new(None),
            scratch32: RefCell::new(Vec::new()),
            scratch64: RefCell::new(Vec::new()),
            recv32: RefCell::new(Vec::new()),
            recv64: RefCell::new(Vec::new()),
            pending: RefCell::new(Vec::new()),
            env,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// This rank's rank in the whole job (`MPI_COMM_WORLD`).
    pub fn world_rank(&self) -> usize {
        self.world[self.rank]
    }

    /// The MPI library's own version string (Open MPI's, on Debian).
    pub fn library_version() -> String {
        let _g = mpi_lock();
        mpi::environment::library_version().unwrap_or_default()
    }

    /// The underlying communicator, for calling the MPI library directly (benchmarks compare
    /// against `MPI_Allreduce`). Any MPI call made through it must not overlap a call of
    /// another thread: see the module docs.
    pub fn raw(&self) -> &SimpleCommunicator {
        &self.comm
    }

    fn raw_comm(&self) -> ffi::MPI_Comm {
        self.comm.as_raw()
    }

    fn coll_tag(&self) -> c_int {
        self.env.tag_ub
    }

    /// Runs one operation; an error breaks the handle for good.
    fn guarded<R>(&self, op: &'static str, f: impl FnOnce() -> Result<R, CommError>) -> Result<R, CommError> {
        if let Some(why) = self.broken.borrow().as_ref() {
            return Err(CommError::Broken(format!("{op} on rank {} after: {why}", self.world_rank())));
        }
        let r = f();
        if let Err(e) = &r {
            *self.broken.borrow_mut() = Some(e.to_string());
            TROUBLE.store(true, Ordering::SeqCst);
            TROUBLE_GRACE_MS.fetch_max(self.timeout.as_millis().min(u64::MAX as u128) as u64, Ordering::SeqCst);
        }
        r
    }

    /// Leaks every buffer that a request left pending by a failure might still use.
    fn abandon_buffers(&self) {
        std::mem::forget(self.scratch32.take());
        std::mem::forget(self.scratch64.take());
        std::mem::forget(self.recv32.take());
        std::mem::forget(self.recv64.take());
    }

    /// Frees the buffers of point-to-point sends that have completed.
    fn reap_sends(&self) -> Result<(), CommError> {
        let mut pending = self.pending.borrow_mut();
        if pending.is_empty() {
            return Ok(());
        }
        let _g = mpi_lock();
        let mut err = None;
        pending.retain_mut(|p| {
            let mut flag: c_int = 0;
            // SAFETY: a live request of this module; the status is ignored.
            let rc = unsafe { ffi::MPI_Test(&mut p.req, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
            if rc != ffi::MPI_SUCCESS as c_int {
                err = Some(mpi_error("send", rc));
                return true;
            }
            flag == 0
        });
        err.map_or(Ok(()), Err)
    }

    /// Posts the given sends and receives (one message per entry, collective tag) and polls
    /// them until all complete or the deadline passes. The pointers must stay valid, and the
    /// memory be owned by this handle, until then, or forever if this fails (the caller leaks it).
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for `len` elements of `T` (writable for receives) and
    /// the receive regions must not overlap each other or any send region.
    unsafe fn transfer<T: Elem>(
        &self,
        op: &'static str,
        tag: c_int,
        sends: &[(usize, *const T, usize)],
        recvs: &[(usize, *mut T, usize)],
        deadline: Instant,
    ) -> Result<(), CommError> {
        let mut reqs = Vec::with_capacity(sends.len() + recvs.len());
        {
            let _g = mpi_lock();
            let comm = self.raw_comm();
            // Receives first, so a message that arrives early lands in place.
            for &(peer, ptr, len) in recvs {
                let len_c = c_int::try_from(len)
                    .map_err(|_| CommError::Invalid { op, msg: format!("{len} values exceed MPI's int count") })?;
                let mut req = MaybeUninit::uninit();
                let rc = ffi::MPI_Irecv(ptr.cast(), len_c, T::datatype(), peer as c_int, tag, comm, req.as_mut_ptr());
                if rc != ffi::MPI_SUCCESS as c_int {
                    return Err(mpi_error(op, rc));
                }
                reqs.push(Req { req: req.assume_init(), peer, recv: Some(len), datatype: T::datatype(), done: false });
            }
            for &(peer, ptr, len) in sends {
                let len_c = c_int::try_from(len)
                    .map_err(|_| CommError::Invalid { op, msg: format!("{len} values exceed MPI's int count") })?;
                let mut req = MaybeUninit::uninit();
                let rc = ffi::MPI_Isend(ptr.cast(), len_c, T::datatype(), peer as c_int, tag, comm, req.as_mut_ptr());
                if rc != ffi::MPI_SUCCESS as c_int {
                    return Err(mpi_error(op, rc));
                }
                reqs.push(Req { req: req.assume_init(), peer, recv: None, datatype: T::datatype(), done: false });
            }
        }
        self.poll(op, &mut reqs, deadline)
    }

    /// Polls `reqs` until all are done, an error, or the deadline.
    fn poll(&self, op: &'static str, reqs: &mut [Req], deadline: Instant) -> Result<(), CommError> {
        let mut last_progress = Instant::now();
        let mut nap = Duration::from_micros(20);
        loop {
            let mut remaining = 0;
            {
                let _g = mpi_lock();
                for r in reqs.iter_mut().filter(|r| !r.done) {
                    let mut flag: c_int = 0;
                    let mut st = MaybeUninit::<ffi::MPI_Status>::zeroed();
                    // SAFETY: a live request posted by `transfer`.
                    let rc = unsafe { ffi::MPI_Test(&mut r.req, &mut flag, st.as_mut_ptr()) };
                    if rc != ffi::MPI_SUCCESS as c_int {
                        return Err(match r.recv {
                            // MPI_ERR_TRUNCATE: the peer sent more than this rank expects.
                            Some(want) => CommError::Mismatch {
                                op,
                                msg: format!(
                                    "rank {} sent rank {} a message longer than the {want} values expected ({})",
                                    self.world[r.peer],
                                    self.world_rank(),
                                    mpi_error(op, rc)
                                ),
                            },
                            None => mpi_error(op, rc),
                        });
                    }
                    if flag == 0 {
                        remaining += 1;
                        continue;
                    }
                    r.done = true;
                    last_progress = Instant::now();
                    if let Some(want) = r.recv {
                        let mut count: c_int = 0;
                        // SAFETY: the status of a completed receive.
                        unsafe { ffi::MPI_Get_count(st.as_ptr(), r.datatype, &mut count) };
                        if count as usize != want {
                            return Err(CommError::Mismatch {
                                op,
                                msg: format!(
                                    "rank {} sent rank {} {count} values, {want} expected",
                                    self.world[r.peer],
                                    self.world_rank()
                                ),
                            });
                        }
                    }
                }
            }
            if remaining == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                // A missing receive names who did not send; else the peer that did not receive.
                let late = reqs.iter().find(|r| !r.done && r.recv.is_some()).or_else(|| reqs.iter().find(|r| !r.done));
                let peer = late.map_or(self.rank, |r| r.peer);
                return Err(CommError::Timeout { op, waiting_for: self.world[peer], timeout: self.timeout });
            }
            // MPI progresses only inside MPI calls: poll hard while data is moving, then back
            // off, so a rank waiting minutes for a checkpointing peer does not burn a core.
            if now - last_progress < Duration::from_millis(20) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(nap.min(deadline - now));
                nap = (nap * 2).min(Duration::from_millis(1));
            }
        }
    }

    /// Exchanges headers with every peer and checks they agree; returns every rank's header.
    fn meet(
        &self,
        op: &'static str,
        len: usize,
        aux: u64,
        extra: [u64; 2],
        deadline: Instant,
    ) -> Result<Vec<Header>, CommError> {
        self.reap_sends()?;
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let mine = Header { op: op_code(op), len: len as u64, aux, seq, extra };
        let n = self.size;
        // Owned and leaked on failure, like every buffer MPI may still touch.
        let send: Box<[u64; Header::WORDS]> = Box::new(mine.words());
        let mut recv = vec![0u64; n * Header::WORDS].into_boxed_slice();
        let peers: Vec<usize> = (0..n).filter(|&k| k != self.rank).collect();
        let sends: Vec<_> = peers.iter().map(|&k| (k, send.as_ptr(), Header::WORDS)).collect();
        let base = recv.as_mut_ptr();
        // SAFETY: disjoint slots of `recv`, one per peer.
        let recvs: Vec<_> = peers.iter().map(|&k| (k, unsafe { base.add(k * Header::WORDS) }, Header::WORDS)).collect();
        // SAFETY: the buffers outlive the requests: on failure they are leaked below.
        let r = unsafe { self.transfer_u64(op, &sends, &recvs, deadline) };
        if let Err(e) = r {
            std::mem::forget(send);
            std::mem::forget(recv);
            return Err(e);
        }
        let mut headers: Vec<Header> = recv.chunks(Header::WORDS).map(Header::from_words).collect();
        headers[self.rank] = mine;
        let differs = |h: &Header| (h.op, h.len, h.aux, h.seq) != (mine.op, mine.len, mine.aux, mine.seq);
        if let Some(j) = (0..n).find(|&j| differs(&headers[j])) {
            return Err(CommError::Mismatch {
                op,
                msg: format!(
                    "rank {} called {} while rank {} called {}",
                    self.world_rank(),
                    mine.describe(),
                    self.world[j],
                    headers[j].describe()
                ),
            });
        }
        Ok(headers)
    }

    /// `transfer` for u64 headers (not an `Elem`: never reduced).
    unsafe fn transfer_u64(
        &self,
        op: &'static str,
        sends: &[(usize, *const u64, usize)],
        recvs: &[(usize, *mut u64, usize)],
        deadline: Instant,
    ) -> Result<(), CommError> {
        let dt = ffi::RSMPI_UINT64_T;
        let tag = self.coll_tag();
        let mut reqs = Vec::new();
        {
            let _g = mpi_lock();
            let comm = self.raw_comm();
            for &(peer, ptr, len) in recvs {
                let mut req = MaybeUninit::uninit();
                let rc = ffi::MPI_Irecv(ptr.cast(), len as c_int, dt, peer as c_int, tag, comm, req.as_mut_ptr());
                if rc != ffi::MPI_SUCCESS as c_int {
                    return Err(mpi_error(op, rc));
                }
                reqs.push(Req { req: req.assume_init(), peer, recv: Some(len), datatype: dt, done: false });
            }
            for &(peer, ptr, len) in sends {
                let mut req = MaybeUninit::uninit();
                let rc = ffi::MPI_Isend(ptr.cast(), len as c_int, dt, peer as c_int, tag, comm, req.as_mut_ptr());
                if rc != ffi::MPI_SUCCESS as c_int {
                    return Err(mpi_error(op, rc));
                }
                reqs.push(Req { req: req.assume_init(), peer, recv: None, datatype: dt, done: false });
            }
        }
        self.poll(op, &mut reqs, deadline)
    }

    /// Runs a collective body with this type's scratch buffers; on failure they are leaked.
    fn with_scratch<T: Elem, R>(
        &self,
        recv: &RefCell<Vec<T>>,
        f: impl FnOnce(&mut Vec<T>, &mut Vec<T>) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        let (mut s, mut r) = (T::scratch(self).take(), recv.take());
        let out = f(&mut s, &mut r);
        match out {
            Ok(v) => {
                *T::scratch(self).borrow_mut() = s;
                *recv.borrow_mut() = r;
                Ok(v)
            }
            Err(e) => {
                std::mem::forget(s);
                std::mem::forget(r);
                self.abandon_buffers();
                Err(e)
            }
        }
    }

    /// Reduce-scatter of `input`: this rank's reduced shard goes to `out`, or with `None` to
    /// `stage[shard]` (where an all-reduce gathers from). `stage` is the send scratch (resized to
    /// `input.len()`), `recv` the receive scratch. Headers must have been exchanged.
    #[allow(clippy::too_many_arguments)]
    fn reduce_scatter_core<T: Elem>(
        &self,
        op_name: &'static str,
        input: &[T],
        out: Option<&mut [T]>,
        op: ReduceOp,
        stage: &mut Vec<T>,
        recv: &mut Vec<T>,
        deadline: Instant,
    ) -> Result<(), CommError> {
        let (n, me, len) = (self.size, self.rank, input.len());
        let mine = shard_range(len, n, me);
        let m = mine.len();
        stage.resize(len, T::default());
        recv.resize((n - 1) * m, T::default());
        let peers = || (0..n).filter(move |&k| k != me);
        for k in peers() {
            let s = shard_range(len, n, k);
            stage[s.clone()].copy_from_slice(&input[s]);
        }
        let slot = |k: usize| if k < me { k } else { k - 1 };
        let sbase = stage.as_ptr();
        let sends: Vec<_> = peers()
            .map(|k| (k, shard_range(len, n, k)))
            .filter(|(_, s)| !s.is_empty())
            .map(|(k, s)| (k, sbase.wrapping_add(s.start), s.len()))
            .collect();
        let rbase = recv.as_mut_ptr();
        let recvs: Vec<_> =
            if m == 0 { Vec::new() } else { peers().map(|k| (k, rbase.wrapping_add(slot(k) * m), m)).collect() };
        // SAFETY: the regions lie in this handle's scratch, are disjoint, and are leaked on
        // failure (`with_scratch`).
        unsafe { self.transfer(op_name, self.coll_tag(), &sends, &recvs, deadline)? };
        let part = |k: usize| -> &[T] {
            if k == me {
                &input[mine.clone()]
            } else {
                &recv[slot(k) * m..slot(k) * m + m]
            }
        };
        let out = match out {
            Some(o) => o,
            None => &mut stage[mine.clone()],
        };
        out.copy_from_slice(part(0));
        for k in 1..n {
            combine(out, part(k), op);
        }
        if op == ReduceOp::Mean {
            let d = T::from_usize(n);
            out.iter_mut().for_each(|o| *o = *o / d);
        }
        Ok(())
    }

    /// All-gather within `buf` (this handle's scratch): this rank's shard `shard_range(len, n,
    /// rank)` is already in place; every peer's shard is received into its own place.
    fn all_gather_core<T: Elem>(&self, op: &'static str, buf: &mut [T], deadline: Instant) -> Result<(), CommError> {
        let (n, me, len) = (self.size, self.rank, buf.len());
        let mine = shard_range(len, n, me);
        let base = buf.as_mut_ptr();
        let sends: Vec<_> = if mine.is_empty() {
            Vec::new()
        } else {
            (0..n).filter(|&k| k != me).map(|k| (k, base.cast_const().wrapping_add(mine.start), mine.len())).collect()
        };
        let recvs: Vec<_> = (0..n)
            .filter(|&k| k != me)
            .map(|k| (k, shard_range(len, n, k)))
            .filter(|(_, s)| !s.is_empty())
            .map(|(k, s)| (k, base.wrapping_add(s.start), s.len()))
            .collect();
        // SAFETY: the shards are disjoint ranges of `buf`, which this handle owns.
        unsafe { self.transfer(op, self.coll_tag(), &sends, &recvs, deadline) }
    }

    fn all_reduce_t<T: Elem>(
        &self,
        op_name: &'static str,
        buf: &mut [T],
        op: ReduceOp,
        recv: &RefCell<Vec<T>>,
    ) -> Result<(), CommError> {
        self.guarded(op_name, || {
            let n = self.size;
            if n == 1 {
                return Ok(());
            }
            let deadline = Instant::now() + self.timeout;
            self.meet(op_name, buf.len(), op as u64, [0; 2], deadline)?;
            self.with_scratch(recv, |stage, rbuf| {
                let len = buf.len();
                // Reduce into the stage's own-shard region, then gather the others around it.
                self.reduce_scatter_core(op_name, buf, None, op, stage, rbuf, deadline)?;
                self.all_gather_core(op_name, &mut stage[..len], deadline)?;
                buf.copy_from_slice(&stage[..len]);
                Ok(())
            })
        })
    }

    /// [`Comm::split`] with the concrete type.
    pub fn split_mpi(&self, color: usize, key: usize) -> Result<MpiComm, CommError> {
        const OP: &str = "split";
        self.guarded(OP, || {
            let n = self.size;
            let deadline = Instant::now() + self.timeout;
            let headers = if n == 1 {
                vec![Header { op: 0, len: 0, aux: 0, seq: 0, extra: [color as u64, key as u64] }]
            } else {
                self.meet(OP, 0, 0, [color as u64, key as u64], deadline)?
            };
            let ck = |j: usize| (headers[j].extra[0] as usize, headers[j].extra[1] as usize);
            let mut members: Vec<usize> = (0..n).filter(|&j| ck(j).0 == color).collect();
            members.sort_by_key(|&j| (ck(j).1, j));
            let new_rank = members.iter().position(|&j| j == self.rank).expect("a rank is in its own color");
            // MPI wants colors and keys that fit an int: the group's lowest member names the
            // color, and the key is the position computed above (same order as the contract).
            let mpi_color = *members.iter().min().expect("non-empty") as c_int;
            let world: Vec<usize> = members.iter().map(|&j| self.world[j]).collect();
            // Every rank has met above, so this blocking call completes promptly.
            let _g = mpi_lock();
            let sub = self
                .comm
                .split_by_color_with_key(Color::with_value(mpi_color), new_rank as c_int)
                .ok_or_else(|| CommError::Mpi("MPI_Comm_split returned MPI_COMM_NULL".into()))?;
            debug_assert_eq!(sub.rank() as usize, new_rank);
            Ok(MpiComm::new(sub, new_rank, world, self.timeout, self.env.clone()))
        })
    }

    /// Range check shared by send and recv.
    fn check_peer(&self, op: &'static str, peer: usize, tag: u32) -> Result<c_int, CommError> {
        if peer >= self.size || peer == self.rank {
            return Err(CommError::Invalid { op, msg: format!("rank {} cannot {op} rank {peer}", self.rank) });
        }
        match c_int::try_from(tag) {
            Ok(t) if t < self.coll_tag() => Ok(t),
            _ => Err(CommError::Invalid {
                op,
                msg: format!("tag {tag} is outside MPI's tags 0..{} (the top one is kiln's)", self.coll_tag()),
            }),
        }
    }
}

impl Env {
    fn init() -> Result<Env, CommError> {
        let _g = mpi_lock();
        if mpi::environment::is_finalized() {
            return Err(CommError::Mpi(
                "MPI was finalised when the last MpiComm was dropped; it cannot be initialised twice in one process"
                    .into(),
            ));
        }
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized).ok_or_else(|| {
            CommError::Mpi("MPI was already initialised outside kiln-comm; MpiComm must own it".into())
        })?;
        if level < Threading::Serialized {
            drop(universe);
            return Err(CommError::Mpi(format!(
                "the MPI library provides thread level {level:?}; kiln needs MPI_THREAD_SERIALIZED"
            )));
        }
        // SAFETY: plain MPI calls on the world communicator with valid out-pointers.
        let tag_ub = unsafe {
            let world = ffi::RSMPI_COMM_WORLD;
            // Errors come back as codes, never as an abort from inside the library.
            ffi::MPI_Comm_set_errhandler(world, ffi::RSMPI_ERRORS_RETURN);
            let mut val: *mut c_int = std::ptr::null_mut();
            let mut flag: c_int = 0;
            ffi::MPI_Comm_get_attr(
                world,
                ffi::MPI_TAG_UB as c_int,
                (&mut val as *mut *mut c_int).cast::<c_void>(),
                &mut flag,
            );
            if flag != 0 && !val.is_null() {
                *val
            } else {
                32767
            }
        };
        Ok(Env { universe: ManuallyDrop::new(universe), tag_ub })
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        let _g = mpi_lock();
        // Point-to-point sends not yet received: MPI keeps sending them after the request is
        // freed, so their buffers must outlive this handle.
        for mut p in self.pending.take() {
            let mut flag: c_int = 0;
            // SAFETY: a live request of this handle.
            unsafe { ffi::MPI_Test(&mut p.req, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
            if flag == 0 {
                // SAFETY: as above; the buffer is leaked so the send may finish later.
                unsafe { ffi::MPI_Request_free(&mut p.req) };
                std::mem::forget(p._buf);
            }
        }
        // SAFETY: dropped once, under the lock, before `env` (which may finalise MPI).
        unsafe { ManuallyDrop::drop(&mut self.comm) };
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn engine(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.all_reduce_t("all_reduce", buf, op, &self.recv32)
    }

    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<(), CommError> {
        self.all_reduce_t("all_reduce_f64", buf, op, &self.recv64)
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        const OP: &str = "reduce_scatter";
        self.guarded(OP, || {
            let n = self.size;
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
            let deadline = Instant::now() + self.timeout;
            self.meet(OP, input.len(), op as u64, [0; 2], deadline)?;
            self.with_scratch(&self.recv32, |stage, rbuf| {
                self.reduce_scatter_core(OP, input, Some(output), op, stage, rbuf, deadline)
            })
        })
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        const OP: &str = "all_gather";
        self.guarded(OP, || {
            let n = self.size;
            let len = output.len();
            let mine = shard_range(len, n, self.rank);
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
            let deadline = Instant::now() + self.timeout;
            self.meet(OP, len, 0, [0; 2], deadline)?;
            self.with_scratch(&self.recv32, |stage, _| {
                stage.resize(len, 0.0);
                stage[mine].copy_from_slice(input);
                self.all_gather_core(OP, &mut stage[..len], deadline)?;
                output.copy_from_slice(&stage[..len]);
                Ok(())
            })
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        const OP: &str = "broadcast";
        self.guarded(OP, || {
            let n = self.size;
            if root >= n {
                return Err(CommError::Invalid { op: OP, msg: format!("root {root} is outside a group of {n}") });
            }
            if n == 1 {
                return Ok(());
            }
            let deadline = Instant::now() + self.timeout;
            self.meet(OP, buf.len(), root as u64, [0; 2], deadline)?;
            if buf.is_empty() {
                return Ok(());
            }
            self.with_scratch(&self.recv32, |stage, _| {
                let len = buf.len();
                stage.resize(len, 0.0);
                let p = stage.as_mut_ptr();
                if self.rank == root {
                    stage[..len].copy_from_slice(buf);
                    let sends: Vec<_> = (0..n).filter(|&k| k != root).map(|k| (k, p.cast_const(), len)).collect();
                    // SAFETY: reads of this handle's scratch only, leaked on failure.
                    unsafe { self.transfer::<f32>(OP, self.coll_tag(), &sends, &[], deadline) }
                } else {
                    // SAFETY: one receive into this handle's scratch, leaked on failure.
                    unsafe { self.transfer::<f32>(OP, self.coll_tag(), &[], &[(root, p, len)], deadline)? };
                    buf.copy_from_slice(&stage[..len]);
                    Ok(())
                }
            })
        })
    }

    fn send(&self, buf: &[f32], dest: usize, tag: u32) -> Result<(), CommError> {
        const OP: &str = "send";
        self.guarded(OP, || {
            let tag = self.check_peer(OP, dest, tag)?;
            self.reap_sends()?;
            let len = c_int::try_from(buf.len()).map_err(|_| CommError::Invalid {
                op: OP,
                msg: format!("{} values exceed MPI's int count", buf.len()),
            })?;
            let data = buf.to_vec();
            let mut req = MaybeUninit::uninit();
            let _g = mpi_lock();
            // SAFETY: `data` moves into `pending` (a Vec's heap buffer does not move) and lives
            // until the send completes, or forever.
            let rc = unsafe {
                ffi::MPI_Isend(
                    data.as_ptr().cast(),
                    len,
                    f32::datatype(),
                    dest as c_int,
                    tag,
                    self.raw_comm(),
                    req.as_mut_ptr(),
                )
            };
            if rc != ffi::MPI_SUCCESS as c_int {
                return Err(mpi_error(OP, rc));
            }
            // SAFETY: initialised by the successful MPI_Isend.
            self.pending.borrow_mut().push(PendingSend { req: unsafe { req.assume_init() }, _buf: data });
            Ok(())
        })
    }

    fn recv(&self, buf: &mut [f32], src: usize, tag: u32) -> Result<(), CommError> {
        const OP: &str = "recv";
        self.guarded(OP, || {
            let tag = self.check_peer(OP, src, tag)?;
            self.reap_sends()?;
            let deadline = Instant::now() + self.timeout;
            let mut data = vec![0.0f32; buf.len()];
            // SAFETY: one receive into `data`, leaked on failure.
            let r = unsafe { self.transfer::<f32>(OP, tag, &[], &[(src, data.as_mut_ptr(), data.len())], deadline) };
            match r {
                Ok(()) => {
                    buf.copy_from_slice(&data);
                    Ok(())
                }
                Err(e) => {
                    std::mem::forget(data);
                    Err(e)
                }
            }
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.guarded("barrier", || {
            if self.size == 1 {
                return Ok(());
            }
            self.meet("barrier", 0, 0, [0; 2], Instant::now() + self.timeout).map(|_| ())
        })
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Comm>, CommError> {
        self.split_mpi(color, key).map(|c| Box::new(c) as Box<dyn Comm>)
    }
}
