//! Times each fast kernel at the shapes of one gpt-s training step (B=8, T=256, C=384,
//! vocab 8192), with the achieved GFLOP/s where the op is a GEMM or attention.
//! Run: cargo run --release -p kiln-tensor --example kernel_times

use std::time::Instant;

use kiln_tensor::{CpuKernels, Kernels};

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let k = CpuKernels::default();
    let (b, t, c, nh, v) = (8usize, 256usize, 384usize, 6usize, 8192usize);
    let n = b * t;
    let fill = |len: usize| (0..len).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect::<Vec<f32>>();
    println!("kernels: {}", k.name());
    let mut total = 0.0;
    for (name, cin, cout, count) in [
        ("qkv", c, 3 * c, 6),
        ("attn proj", c, c, 6),
        ("fc", c, 4 * c, 6),
        ("fc proj", 4 * c, c, 6),
        ("lm head", c, v, 1),
    ] {
        let (x, w, bias, dy) = (fill(n * cin), fill(cout * cin), fill(cout), fill(n * cout));
        let (mut y, mut dx, mut dw, mut db) =
            (vec![0.0; n * cout], vec![0.0; n * cin], vec![0.0; cout * cin], vec![0.0; cout]);
        let fwd = time(|| k.matmul_forward(&mut y, &x, &w, Some(&bias), cin, cout));
        let bwd = time(|| k.matmul_backward(&mut dx, &mut dw, Some(&mut db), &dy, &x, &w, cin, cout));
        let gf = 2.0 * (n * cin * cout) as f64 / 1e9;
        println!(
            "matmul {name:10} fwd {:7.2} ms ({:5.1} GFLOP/s)  bwd {:7.2} ms ({:5.1} GFLOP/s)  x{count}",
            fwd * 1e3,
            gf / fwd,
            bwd * 1e3,
            2.0 * gf / bwd
        );
        total += (fwd + bwd) * count as f64;
    }
    let hs = c / nh;
    let (qkv, dout) = (fill(n * 3 * c), fill(n * c));
    let (mut out, mut lse, mut dqkv) = (vec![0.0; n * c], vec![0.0; b * nh * t], vec![0.0; n * 3 * c]);
    let af = time(|| k.attention_forward(&mut out, &mut lse, &qkv, b, t, nh, hs));
    let ab = time(|| k.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, b, t, nh, hs));
    let causal_flops = 2.0 * (b * nh) as f64 * (t * (t + 1) / 2) as f64 * hs as f64 * 2.0 / 1e9;
    println!(
        "attention          fwd {:7.2} ms ({:5.1} GFLOP/s)  bwd {:7.2} ms ({:5.1} GFLOP/s)  x6",
        af * 1e3,
        causal_flops / af,
        ab * 1e3,
        2.5 * causal_flops / ab
    );
    total += (af + ab) * 6.0;
    let (x, w, bias, dy) = (fill(n * c), fill(c), fill(c), fill(n * c));
    let (mut y, mut m, mut r, mut dx, mut dw, mut db) =
        (vec![0.0; n * c], vec![0.0; n], vec![0.0; n], vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
    let lf = time(|| k.layernorm_forward(&mut y, &mut m, &mut r, &x, &w, &bias, c));
    let lb = time(|| k.layernorm_backward(&mut dx, &mut dw, &mut db, &dy, &x, &w, &m, &r, c));
    println!("layernorm          fwd {:7.2} ms  bwd {:7.2} ms  x13", lf * 1e3, lb * 1e3);
    total += (lf + lb) * 13.0;
    let (x4, g4) = (fill(n * 4 * c), fill(n * 4 * c));
    let (mut y4, mut d4) = (vec![0.0; n * 4 * c], vec![0.0; n * 4 * c]);
    let gf = time(|| k.gelu_forward(&mut y4, &x4));
    let gb = time(|| k.gelu_backward(&mut d4, &x4, &g4));
    println!("gelu               fwd {:7.2} ms  bwd {:7.2} ms  x6 (+6 recomputes)", gf * 1e3, gb * 1e3);
    total += (2.0 * gf + gb) * 6.0;
    let (a1, a2) = (fill(n * c), fill(n * c));
    let mut o = vec![0.0; n * c];
    let rf = time(|| k.residual_forward(&mut o, &a1, &a2));
    println!("residual           fwd {:7.2} ms  x12", rf * 1e3);
    total += rf * 12.0;
    let logits0 = fill(n * v);
    let targets: Vec<u32> = (0..n).map(|i| (i * 31 % v) as u32).collect();
    let mut losses = vec![0.0; n];
    let mut logits = logits0.clone();
    let cf = time(|| k.crossentropy_forward_backward(&mut logits, &mut losses, &targets, v, v, None));
    let cb = time(|| {
        logits.copy_from_slice(&logits0);
        k.crossentropy_forward_backward(&mut logits, &mut losses, &targets, v, v, Some(1.0 / n as f32))
    });
    println!("cross-entropy      fwd {:7.2} ms  fwd+bwd (incl. copy) {:7.2} ms", cf * 1e3, cb * 1e3);
    total += cf + cb;
    let np = 14_000_000;
    let (mut p, g, mut mm, mut vv) = (fill(np), fill(np), vec![0.0; np], vec![0.0; np]);
    let s = kiln_tensor::kernels::AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        t: 1,
        grad_scale: 1.0,
    };
    let ad = time(|| k.adamw_update(&mut p, &g, &mut mm, &mut vv, &s));
    println!("adamw (14M)            {:7.2} ms", ad * 1e3);
    total += ad;
    println!("sum of the above for one step: {:.1} ms", total * 1e3);
}
