//! ONNX export without Python: export the fixture models (f32 and QDQ), decode the protobuf
//! back with prost, and check the graph's structure. onnxruntime's numbers are checked by
//! tools/onnx/check_onnx.py.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use kiln_hw::onnx::proto::{data_type, tensor_shape_proto::dimension::Value as Dim, type_proto, ModelProto};
use kiln_hw::{export_onnx, OnnxOptions};
use prost::Message;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiln-model/tests/fixtures")
}

/// A GPT-2 checkpoint directory written by kiln-model (random weights, vocab not a multiple of 64).
fn gpt2_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("gpt2");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = kiln_model::GptConfig { n_layer: 2, n_head: 4, n_embd: 32, block_size: 48, vocab_size: 101 };
    kiln_model::save_hf_files(&kiln_model::Gpt::new(cfg, 3).unwrap(), &dir, None).unwrap();
    dir
}

fn element_size(ty: i32) -> usize {
    match ty {
        data_type::FLOAT | data_type::INT32 => 4,
        data_type::INT8 => 1,
        data_type::INT64 => 8,
        other => panic!("unexpected data type {other}"),
    }
}

/// Checks the structure every export must have; returns the initializers' shapes by name and
/// the op types used.
fn check(path: &Path, vocab: i64, opset: i64) -> (HashMap<String, Vec<i64>>, HashMap<String, usize>) {
    let bytes = std::fs::read(path).unwrap();
    let m = ModelProto::decode(bytes.as_slice()).expect("a valid protobuf ModelProto");
    assert_eq!(m.producer_name.as_deref(), Some("kiln"));
    assert_eq!(m.opset_import.len(), 1);
    assert_eq!(m.opset_import[0].version, Some(opset));
    assert!(m.ir_version.unwrap() >= 8);
    let g = m.graph.expect("a graph");

    let io = |v: &kiln_hw::onnx::proto::ValueInfoProto| {
        let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.clone()) else {
            panic!("tensor type")
        };
        let dims: Vec<Dim> = t.shape.unwrap().dim.into_iter().map(|d| d.value.unwrap()).collect();
        (v.name.clone().unwrap(), t.elem_type.unwrap(), dims)
    };
    let inputs: Vec<_> = g.input.iter().map(io).collect();
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0].0, "input_ids");
    assert_eq!(inputs[0].1, data_type::INT64);
    assert_eq!(inputs[0].2, vec![Dim::DimParam("batch".into()), Dim::DimParam("seq".into())]);
    let outputs: Vec<_> = g.output.iter().map(io).collect();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].0, "logits");
    assert_eq!(outputs[0].1, data_type::FLOAT);
    assert_eq!(outputs[0].2, vec![Dim::DimParam("batch".into()), Dim::DimParam("seq".into()), Dim::DimValue(vocab)]);

    let mut shapes = HashMap::new();
    for t in &g.initializer {
        let name = t.name.clone().unwrap();
        let n: i64 = t.dims.iter().product();
        let raw = t.raw_data.as_ref().expect("raw data");
        assert_eq!(raw.len(), n as usize * element_size(t.data_type.unwrap()), "initializer {name}");
        assert!(shapes.insert(name.clone(), t.dims.clone()).is_none(), "initializer {name} twice");
    }
    // Every node input is defined before use: a graph input, an initializer, or an earlier output.
    let mut defined: HashSet<String> = shapes.keys().cloned().collect();
    defined.insert("input_ids".into());
    let mut ops = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            assert!(i.is_empty() || defined.contains(i), "node {:?} reads undefined {i}", n.name);
        }
        for o in &n.output {
            assert!(defined.insert(o.clone()), "{o} defined twice");
        }
        *ops.entry(n.op_type.clone().unwrap()).or_insert(0) += 1;
    }
    assert!(defined.contains("logits"), "the output is produced");
    (shapes, ops)
}

#[test]
fn gpt2_f32_and_qdq() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = gpt2_dir(tmp.path());
    let out = tmp.path().join("gpt2.onnx");
    let n = export_onnx(&dir, &OnnxOptions::default(), &out).unwrap();
    assert_eq!(n as u64, std::fs::metadata(&out).unwrap().len());
    let (shapes, ops) = check(&out, 101, 17);
    assert_eq!(shapes["embed.weight"], vec![101, 32]);
    assert_eq!(shapes["pos_embed.weight"], vec![48, 32]);
    assert_eq!(shapes["layers.0.q.weight"], vec![32, 32]);
    assert_eq!(shapes["layers.1.fc.weight"], vec![32, 128]);
    assert_eq!(shapes["layers.1.down.weight"], vec![128, 32]);
    assert_eq!(shapes["lm_head.weight"], vec![32, 101]);
    assert_eq!(ops["LayerNormalization"], 5);
    assert_eq!(ops["Softmax"], 2);
    assert_eq!(ops["Tanh"], 2, "GELU-tanh from primitives below opset 20");
    assert!(!ops.contains_key("QuantizeLinear"));

    let opts = OnnxOptions { qdq: true, opset: 20, calib_seqs: 2, calib_len: 16, ..Default::default() };
    export_onnx(&dir, &opts, &out).unwrap();
    let (shapes, ops) = check(&out, 101, 20);
    assert_eq!(shapes["layers.0.q.weight_int8"], vec![32, 32]);
    assert_eq!(shapes["layers.0.q.weight_scale"], vec![32]);
    assert_eq!(shapes["layers.1.fc.weight_int8"], vec![32, 128]);
    assert_eq!(shapes["layers.1.fc.weight_scale"], vec![128]);
    assert_eq!(shapes["lm_head.weight_scale"], vec![101]);
    assert!(shapes["layers.0.attn_in.act_scale"].is_empty(), "per-tensor activation scale");
    // 6 linears per layer plus the head; 4 activation points per layer plus the head's.
    assert_eq!(ops["DequantizeLinear"], 2 * 6 + 1 + 2 * 4 + 1);
    assert_eq!(ops["QuantizeLinear"], 2 * 4 + 1);
    assert_eq!(ops["Gelu"], 2);
    assert!(!shapes.contains_key("layers.0.q.weight"), "no f32 copy of quantized weights");
}

#[test]
fn llama_and_qwen2_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    // The scaled fixture is Llama with attention_bias (q, k, v and o biases), GQA 4:1, linear RoPE.
    for (name, bias) in [("hf_llama_tiny", false), ("hf_qwen2_tiny", true), ("hf_llama_scaled_tiny", true)] {
        let dir = fixtures().join(name);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let vocab = cfg["vocab_size"].as_i64().unwrap();
        let (nh, nkv) = (cfg["num_attention_heads"].as_i64().unwrap(), cfg["num_key_value_heads"].as_i64().unwrap());
        let c = cfg["hidden_size"].as_i64().unwrap();
        let hd = c / nh;
        let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
        for (qdq, opset) in [(false, 17), (false, 18), (true, 17)] {
            let out = tmp.path().join(format!("{name}_{qdq}_{opset}.onnx"));
            let opts = OnnxOptions { qdq, opset, calib_seqs: 2, calib_len: 16, ..Default::default() };
            export_onnx(&dir, &opts, &out).unwrap();
            let (shapes, ops) = check(&out, vocab, opset);
            let w = if qdq { "weight_int8" } else { "weight" };
            assert_eq!(shapes[&format!("layers.0.k.{w}")], vec![c, nkv * hd], "{name}");
            assert_eq!(shapes[&format!("layers.0.q.{w}")], vec![c, nh * hd], "{name}");
            assert_eq!(shapes.contains_key("layers.0.q.bias"), bias, "{name}: q bias");
            assert_eq!(shapes["rope.cos"][1], hd);
            assert_eq!(ops.get("LayerNormalization"), None);
            assert_eq!(ops["Sigmoid"], layers, "SiLU in each layer");
            // RoPE concatenates twice a layer (q and k); GQA repeats keys and values, two more.
            let concats = ops.get("Concat").copied().unwrap_or(0);
            assert_eq!(concats, layers * if nh != nkv { 4 } else { 2 }, "{name}: {ops:?}");
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.onnx");
    assert!(export_onnx(&tmp.path().join("missing"), &OnnxOptions::default(), &out).is_err());
    // A directory with a config.json but no weights.
    let dir = tmp.path().join("broken");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"gpt2\", \"n_layer\": 1}").unwrap();
    assert!(export_onnx(&dir, &OnnxOptions::default(), &out).is_err());
    std::fs::write(dir.join("config.json"), "not json").unwrap();
    assert!(export_onnx(&dir, &OnnxOptions::default(), &out).is_err());
    // Truncated weights.
    let good = gpt2_dir(tmp.path());
    let st = std::fs::read(good.join("model.safetensors")).unwrap();
    std::fs::write(good.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    assert!(export_onnx(&good, &OnnxOptions::default(), &out).is_err());
    // Unsupported opset; calibration text that does not exist.
    let good = gpt2_dir(&tmp.path().join("again"));
    let opts = OnnxOptions { opset: 13, ..Default::default() };
    assert!(export_onnx(&good, &opts, &out).is_err());
    let opts = OnnxOptions { qdq: true, calib_text: Some(tmp.path().join("nope.txt")), ..Default::default() };
    assert!(export_onnx(&good, &opts, &out).is_err());
    assert!(!out.exists(), "nothing is written on failure");
}
