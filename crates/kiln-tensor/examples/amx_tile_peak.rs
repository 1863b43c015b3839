//! The AMX-INT8 ceilings the int8 tiles work under (Linux x86-64 with AMX only): `tdpbssd`
//! alone (K = 32 and K = 64 bytes a row), and the sequence one int8 block costs the weight-only
//! kernel (zero, two tile loads, multiply, store), one core, in ns and TOP/s.
//!
//!     cargo run --release -p kiln-tensor --example amx_tile_peak

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn main() {
    use std::arch::asm;
    use std::time::Instant;
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    // SAFETY: the request only widens this process's permitted XSAVE features.
    let granted = unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023, 18) } == 0;
    if leaf7.edx >> 25 & 1 == 0 || !granted {
        println!("amx_tile_peak: no AMX-INT8 here (or the kernel refused the tile state)");
        return;
    }
    let buf = vec![1i8; 64 << 10];
    let mut out = vec![0i32; 4 * 256];
    for (colsa, rowsb) in [(32u16, 8u8), (64, 16)] {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for (t, rows, colsb) in [
            (0, 16, 64),
            (1, 16, 64),
            (2, 16, 64),
            (3, 16, 64),
            (4, 16, colsa),
            (5, 16, colsa),
            (6, rowsb, 64),
            (7, rowsb, 64),
        ] {
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            cfg[48 + t] = rows;
        }
        let ops = 2.0 * 16.0 * 16.0 * colsa as f64;
        let n = 2_000_000usize;
        // SAFETY: every tile load reads 16 rows of at most 64 bytes inside `buf`, every store
        // writes 1 KiB inside `out`; the configuration above is valid for palette 1.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr());
            asm!("tileloadd tmm4, [{p} + {s}*1]", "tileloadd tmm5, [{p} + {s}*1]",
                 "tileloadd tmm6, [{p} + {s}*1]", "tileloadd tmm7, [{p} + {s}*1]",
                 p = in(reg) buf.as_ptr(), s = in(reg) 64usize);
            let t = Instant::now();
            for _ in 0..n / 4 {
                asm!(
                    "tdpbssd tmm0, tmm4, tmm6",
                    "tdpbssd tmm1, tmm5, tmm7",
                    "tdpbssd tmm2, tmm4, tmm7",
                    "tdpbssd tmm3, tmm5, tmm6"
                );
            }
            let ns = t.elapsed().as_secs_f64() / n as f64 * 1e9;
            println!("K = {colsa:2}: tdpbssd alone             {ns:6.2} ns  {:6.2} TOP/s", ops / ns / 1e3);
            let t = Instant::now();
            for i in 0..n / 4 {
                let p = buf.as_ptr().add(i % 32 * 1024);
                let o = out.as_mut_ptr();
                asm!("tilezero tmm0", "tileloadd tmm4, [{p} + {s}*1]", "tileloadd tmm6, [{p} + {s}*1]",
                     "tdpbssd tmm0, tmm4, tmm6", "tilestored [{o} + {s}*1], tmm0",
                     "tilezero tmm1", "tileloadd tmm5, [{p} + {s}*1]", "tileloadd tmm7, [{p} + {s}*1]",
                     "tdpbssd tmm1, tmm5, tmm7", "tilestored [{o} + {s}*1 + 1024], tmm1",
                     "tilezero tmm2", "tileloadd tmm4, [{p} + {s}*1]", "tileloadd tmm6, [{p} + {s}*1]",
                     "tdpbssd tmm2, tmm4, tmm6", "tilestored [{o} + {s}*1 + 2048], tmm2",
                     "tilezero tmm3", "tileloadd tmm5, [{p} + {s}*1]", "tileloadd tmm7, [{p} + {s}*1]",
                     "tdpbssd tmm3, tmm5, tmm7", "tilestored [{o} + {s}*1 + 3072], tmm3",
                     p = in(reg) p, s = in(reg) 64usize, o = in(reg) o);
            }
            let ns = t.elapsed().as_secs_f64() / n as f64 * 1e9;
            println!("K = {colsa:2}: zero, 2 loads, tdp, store {ns:6.2} ns  {:6.2} TOP/s", ops / ns / 1e3);
            asm!("tilerelease");
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    println!("amx_tile_peak: x86-64 Linux only");
}
