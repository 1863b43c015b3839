//! Every collective of the thread engine against a sequential reference, on awkward sizes, and
//! the failure modes: a rank that panics, a rank that stalls, ranks that disagree.

use std::time::{Duration, Instant};

use kiln_comm::{shard_range, Comm, CommError, Plan, ReduceOp, ThreadComm};

const T: Duration = Duration::from_secs(20);
const LENS: [usize; 9] = [0, 1, 2, 3, 5, 7, 13, 100, 1031];

/// Rank `r`'s test input: values with many mantissa bits, so order changes would show.
fn input(r: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((r * 31 + i * 7) % 17) as f32 * 0.1373 - 0.8 + (i as f32).sqrt() * 1e-3).collect()
}

/// The sequential reference: element i summed over ranks 0..n in order.
fn reference(n: usize, len: usize, op: ReduceOp) -> Vec<f32> {
    let mut acc = input(0, len);
    for r in 1..n {
        for (a, x) in acc.iter_mut().zip(input(r, len)) {
            match op {
                ReduceOp::Max => *a = a.max(x),
                _ => *a += x,
            }
        }
    }
    if op == ReduceOp::Mean {
        acc.iter_mut().for_each(|a| *a /= n as f32);
    }
    acc
}

fn ok<R: std::fmt::Debug>(results: Vec<std::thread::Result<R>>) -> Vec<R> {
    results.into_iter().map(|r| r.expect("rank panicked")).collect()
}

#[test]
fn all_reduce_matches_the_reference_bit_for_bit() {
    for n in 1..=4 {
        for &len in &LENS {
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
                let want = reference(n, len, op);
                let got = ok(ThreadComm::launch(n, T, |c| {
                    let mut buf = input(c.rank(), len);
                    c.all_reduce(&mut buf, op).unwrap();
                    buf
                }));
                for (r, g) in got.iter().enumerate() {
                    let (gb, wb): (Vec<u32>, Vec<u32>) =
                        (g.iter().map(|x| x.to_bits()).collect(), want.iter().map(|x| x.to_bits()).collect());
                    assert_eq!(gb, wb, "n={n} len={len} {op:?} rank {r}");
                }
            }
        }
    }
}

#[test]
fn all_reduce_f64_sums_in_rank_order() {
    for n in 1..=4 {
        let got = ok(ThreadComm::launch(n, T, |c| {
            let mut v = [c.rank() as f64 + 0.1, 1e-17];
            c.all_reduce_f64(&mut v, ReduceOp::Sum).unwrap();
            v
        }));
        let want = (0..n).fold(0.0, |a, r| a + (r as f64 + 0.1));
        for g in got {
            assert_eq!(g[0].to_bits(), want.to_bits());
        }
    }
}

#[test]
fn reduce_scatter_leaves_each_rank_its_shard() {
    for n in 1..=4 {
        for &len in &LENS {
            let want = reference(n, len, ReduceOp::Mean);
            let got = ok(ThreadComm::launch(n, T, |c| {
                let mut out = vec![0.0; shard_range(len, n, c.rank()).len()];
                c.reduce_scatter(&input(c.rank(), len), &mut out, ReduceOp::Mean).unwrap();
                out
            }));
            for (r, g) in got.iter().enumerate() {
                assert_eq!(g.as_slice(), &want[shard_range(len, n, r)], "n={n} len={len} rank {r}");
            }
        }
    }
}

#[test]
fn all_gather_concatenates_shards_in_rank_order() {
    for n in 1..=4 {
        for &len in &LENS {
            let full = input(99, len);
            let got = ok(ThreadComm::launch(n, T, |c| {
                let mut out = vec![f32::NAN; len];
                c.all_gather(&full[shard_range(len, n, c.rank())], &mut out).unwrap();
                out
            }));
            for g in got {
                assert_eq!(g, full, "n={n} len={len}");
            }
        }
    }
}

#[test]
fn broadcast_copies_the_roots_buffer() {
    for n in 1..=4 {
        for root in 0..n {
            let got = ok(ThreadComm::launch(n, T, |c| {
                let mut buf = input(c.rank(), 13);
                c.broadcast(&mut buf, root).unwrap();
                buf
            }));
            for g in got {
                assert_eq!(g, input(root, 13));
            }
        }
    }
}

#[test]
fn send_recv_around_a_ring_keeps_message_order() {
    for n in 2..=4 {
        let got = ok(ThreadComm::launch(n, T, |c| {
            let (r, next, prev) = (c.rank(), (c.rank() + 1) % n, (c.rank() + n - 1) % n);
            c.send(&input(r, 5), next, 7).unwrap();
            c.send(&input(r + 10, 3), next, 7).unwrap();
            let (mut a, mut b) = (vec![0.0; 5], vec![0.0; 3]);
            c.recv(&mut a, prev, 7).unwrap();
            c.recv(&mut b, prev, 7).unwrap();
            c.barrier().unwrap();
            (a, b)
        }));
        for (r, (a, b)) in got.into_iter().enumerate() {
            let prev = (r + n - 1) % n;
            assert_eq!((a, b), (input(prev, 5), input(prev + 10, 3)));
        }
    }
}

/// Hundreds of back-to-back collectives of changing sizes: the alternating slot sets must never
/// let a fast rank overwrite data a slow rank is still reading.
#[test]
fn many_back_to_back_collectives_stay_correct() {
    let n = 3;
    ok(ThreadComm::launch(n, T, |c| {
        for i in 0..300 {
            let len = 1 + (i * 37) % 200;
            let mut buf = input(c.rank() + i, len);
            c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
            let mut want = input(i, len);
            for r in 1..n {
                want.iter_mut().zip(input(r + i, len)).for_each(|(w, x)| *w += x);
            }
            assert_eq!(buf, want, "iteration {i}");
            let mut g = vec![0.0; len];
            c.all_gather(&want[shard_range(len, n, c.rank())], &mut g).unwrap();
            assert_eq!(g, want);
        }
    }));
}

#[test]
fn split_forms_sub_groups_and_plans_have_the_right_members() {
    let got = ok(ThreadComm::launch(4, T, |c| {
        let sub = c.split(c.rank() % 2, 10 - c.rank()).unwrap();
        let mut v = [c.rank() as f32];
        sub.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        (sub.rank(), sub.size(), v[0])
    }));
    // Colors {0, 2} and {1, 3}; keys descend with the rank, so the higher rank leads.
    assert_eq!(got, vec![(1, 2, 2.0), (1, 2, 4.0), (0, 2, 2.0), (0, 2, 4.0)]);

    let plan = Plan { dp: 2, tp: 2, pp: 2 };
    for r in 0..8 {
        assert_eq!(plan.rank_of(plan.coords(r)), r);
    }
    let got = ok(ThreadComm::launch(8, T, |c| {
        let g = plan.groups(&c).unwrap();
        let mut sums = [0.0f32; 3];
        for (s, comm) in sums.iter_mut().zip([&g.dp, &g.tp, &g.pp]) {
            let mut v = [c.rank() as f32];
            comm.all_reduce(&mut v, ReduceOp::Sum).unwrap();
            *s = v[0];
        }
        (g.coords, sums)
    }));
    for (r, (coords, [dp, tp, pp])) in got.into_iter().enumerate() {
        assert_eq!(coords, plan.coords(r));
        let members = |f: &dyn Fn(usize) -> bool| (0..8).filter(|&q| f(q)).sum::<usize>() as f32;
        let c = plan.coords(r);
        assert_eq!(dp, members(&|q| plan.coords(q).tp == c.tp && plan.coords(q).pp == c.pp), "dp group of {r}");
        assert_eq!(tp, members(&|q| plan.coords(q).dp == c.dp && plan.coords(q).pp == c.pp), "tp group of {r}");
        assert_eq!(pp, members(&|q| plan.coords(q).dp == c.dp && plan.coords(q).tp == c.tp), "pp group of {r}");
    }
}

#[test]
fn mismatched_collectives_are_an_error_on_every_rank() {
    let got = ok(ThreadComm::launch(2, T, |c| {
        let mut buf = vec![1.0; 3 + c.rank()];
        c.all_reduce(&mut buf, ReduceOp::Sum)
    }));
    for r in got {
        assert!(matches!(r, Err(CommError::Mismatch { op: "all_reduce", .. })), "{r:?}");
    }
}

/// A rank panics mid-step: the others fail at their next collective, naming it, long before
/// the timeout (its handle is dropped while unwinding).
#[test]
fn a_rank_that_panics_fails_the_others_promptly() {
    let timeout = Duration::from_secs(10);
    let start = Instant::now();
    let got = ThreadComm::launch(3, timeout, |c| {
        let mut buf = input(c.rank(), 64);
        c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
        if c.rank() == 1 {
            panic!("rank 1 dies mid-step (on purpose)");
        }
        c.all_reduce(&mut buf, ReduceOp::Sum)
    });
    assert!(start.elapsed() < timeout / 2, "took {:?}", start.elapsed());
    assert!(got[1].is_err(), "rank 1 should have panicked");
    for r in [0, 2] {
        let e = got[r].as_ref().expect("no panic").as_ref().unwrap_err();
        assert_eq!(*e, CommError::PeerFailed { op: "all_reduce", rank: 1 }, "rank {r}");
        assert!(e.to_string().contains("rank 1"), "{e}");
    }
}

/// A rank stalls: the others time out naming it, within the timeout (plus scheduling slack).
/// The timeout is a second so that a busy machine (CI runs the other tests beside this one on
/// 2 cores) cannot delay a healthy rank's arrival past it: at 300 ms it once did, and the
/// waiting rank rightly named that late rank instead.
#[test]
fn a_stalled_rank_times_out_the_others() {
    let timeout = Duration::from_millis(1000);
    let got = ok(ThreadComm::launch(3, timeout, |c| {
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(4000));
        }
        let start = Instant::now();
        let r = c.barrier();
        (r, start.elapsed())
    }));
    for (r, (res, took)) in got.iter().enumerate().take(2) {
        assert!(matches!(res, Err(CommError::Timeout { waiting_for: 2, .. })), "rank {r}: {res:?}");
        assert!(*took < Duration::from_millis(3000), "rank {r} took {took:?}");
    }
    // The late rank finds the others gone instead of waiting again.
    assert!(matches!(got[2].0, Err(CommError::PeerFailed { .. })), "{:?}", got[2].0);
}

#[test]
fn recv_from_a_dead_rank_fails_and_a_broken_handle_stays_broken() {
    let got = ok(ThreadComm::launch(2, T, |c| {
        if c.rank() == 1 {
            return Ok(());
        }
        let mut buf = [0.0f32; 4];
        let first = c.recv(&mut buf, 1, 0);
        assert!(matches!(first, Err(CommError::PeerFailed { op: "recv", rank: 1 })), "{first:?}");
        c.barrier()
    }));
    assert!(matches!(got[0], Err(CommError::Broken(_))), "{:?}", got[0]);
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let got = ok(ThreadComm::launch(2, T, |c| {
        let mut out = vec![0.0; 5];
        let e1 = c.reduce_scatter(&[1.0; 4], &mut out, ReduceOp::Sum).unwrap_err();
        let e2 = ThreadComm::group(1, T)[0].broadcast(&mut out, 3).unwrap_err();
        (e1, e2)
    }));
    for (e1, e2) in got {
        assert!(matches!(e1, CommError::Invalid { op: "reduce_scatter", .. }), "{e1:?}");
        assert!(matches!(e2, CommError::Invalid { op: "broadcast", .. }), "{e2:?}");
    }
}
