//! Compute cycles kiln predicts for GEMMs on an array, as JSON, for tools/hw/scalesim_compare.py.
//!
//!     cargo run -p kiln-hw --example gemm_cycles -- M,N,K,ROWS,COLS,DATAFLOW ...

use kiln_hw::systolic::{fold_cycles, Gemm};
use kiln_hw::Dataflow;

fn main() -> Result<(), String> {
    let mut out = Vec::new();
    for arg in std::env::args().skip(1) {
        let f: Vec<&str> = arg.split(',').collect();
        let bad = || format!("expected M,N,K,ROWS,COLS,ws|os|is, got {arg}");
        if f.len() != 6 {
            return Err(bad());
        }
        let n: Vec<u64> = f[..5].iter().map(|x| x.parse::<u64>()).collect::<Result<_, _>>().map_err(|_| bad())?;
        if n.contains(&0) {
            return Err(bad());
        }
        let df = Dataflow::parse(f[5]).ok_or_else(bad)?;
        let r = fold_cycles(Gemm { m: n[0], n: n[1], k: n[2] }, n[3], n[4], df);
        out.push(format!(
            "{{\"m\":{},\"n\":{},\"k\":{},\"rows\":{},\"cols\":{},\"dataflow\":\"{df}\",\"folds\":{},\"cycles\":{}}}",
            n[0],
            n[1],
            n[2],
            n[3],
            n[4],
            r.row_folds * r.col_folds,
            r.cycles
        ));
    }
    println!("[{}]", out.join(","));
    Ok(())
}
