//! Writes a Llama-family model as a Hugging Face directory with kiln's logits beside it, for
//! tools/check_hf_llama_export.py to load in `transformers` and compare.
//!
//!     cargo run --release -p kiln-model --example llama_export -- (PRESET | HF_DIR) OUT_DIR

use kiln_model::{load_llama_dir, safetensors_bytes, save_llama_hf_files, write_atomic, Llama, LlamaConfig};
use kiln_tensor::CpuKernels;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (src, out) = match args.as_slice() {
        [_, s, o] => (s.clone(), std::path::PathBuf::from(o)),
        _ => return Err("usage: llama_export (PRESET | HF_DIR) OUT_DIR".into()),
    };
    let mut model = if std::path::Path::new(&src).is_dir() {
        load_llama_dir(std::path::Path::new(&src))?
    } else {
        Llama::new(LlamaConfig::preset(&src, Some(1000))?, 7)?
    };
    std::fs::create_dir_all(&out)?;
    save_llama_hf_files(&model, &out, None, None)?;
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % v).collect();
    model.forward(&CpuKernels::default(), &ids, None, 1, ids.len())?;
    let logits = model.logits().expect("forward ran").to_vec();
    let tensors = vec![
        ("ids".to_string(), vec![ids.len()], ids.iter().map(|&x| x as f32).collect()),
        ("logits".to_string(), vec![ids.len(), v as usize], logits),
    ];
    write_atomic(&out.join("kiln_logits.safetensors"), &safetensors_bytes(&tensors, None)?)?;
    println!("wrote {}", out.display());
    Ok(())
}
