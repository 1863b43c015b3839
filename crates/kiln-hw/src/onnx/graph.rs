//! A small builder for ONNX graphs: nodes with fresh output names, initializers, constants.

use super::proto::{attr_type, data_type, AttributeProto, NodeProto, TensorProto};

pub struct Graph {
    pub nodes: Vec<NodeProto>,
    pub inits: Vec<TensorProto>,
    pub opset: i64,
    next: usize,
    consts: std::collections::HashMap<String, String>,
}

pub fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), i: Some(v), r#type: Some(attr_type::INT), ..Default::default() }
}

pub fn attr_f(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: Some(name.into()), f: Some(v), r#type: Some(attr_type::FLOAT), ..Default::default() }
}

pub fn attr_s(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        s: Some(v.as_bytes().to_vec()),
        r#type: Some(attr_type::STRING),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: Some(name.into()), ints: v.to_vec(), r#type: Some(attr_type::INTS), ..Default::default() }
}

fn tensor(name: &str, dims: &[usize], ty: i32, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(ty),
        name: Some(name.into()),
        raw_data: Some(raw),
    }
}

impl Graph {
    pub fn new(opset: i64) -> Graph {
        Graph { nodes: Vec::new(), inits: Vec::new(), opset, next: 0, consts: Default::default() }
    }

    /// A node with one output, named after `hint`; returns the output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, hint: &str) -> String {
        self.next += 1;
        let out = format!("{hint}_{}", self.next);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: Some(format!("{op}_{}", self.next)),
            op_type: Some(op.into()),
            attribute: attrs,
            domain: None,
        });
        out
    }

    pub fn init_f32(&mut self, name: &str, dims: &[usize], v: &[f32]) -> String {
        self.inits.push(tensor(name, dims, data_type::FLOAT, v.iter().flat_map(|x| x.to_le_bytes()).collect()));
        name.to_string()
    }

    pub fn init_i8(&mut self, name: &str, dims: &[usize], v: &[i8]) -> String {
        self.inits.push(tensor(name, dims, data_type::INT8, v.iter().map(|&x| x as u8).collect()));
        name.to_string()
    }

    pub fn init_i64(&mut self, name: &str, dims: &[usize], v: &[i64]) -> String {
        self.inits.push(tensor(name, dims, data_type::INT64, v.iter().flat_map(|x| x.to_le_bytes()).collect()));
        name.to_string()
    }

    /// A scalar f32 constant (shared by every use of the same value).
    pub fn scalar_f32(&mut self, v: f32) -> String {
        let key = format!("f{:08x}", v.to_bits());
        if let Some(n) = self.consts.get(&key) {
            return n.clone();
        }
        let name = format!("const_{key}");
        self.init_f32(&name, &[], &[v]);
        self.consts.insert(key, name.clone());
        name
    }

    /// A 1-D int64 constant (shapes, axes), or a scalar when `scalar`.
    pub fn ints(&mut self, v: &[i64], scalar: bool) -> String {
        let key = format!("i{}{:?}", if scalar { "s" } else { "" }, v);
        if let Some(n) = self.consts.get(&key) {
            return n.clone();
        }
        let name = format!("const_i64_{}", self.consts.len());
        let dims: Vec<usize> = if scalar { vec![] } else { vec![v.len()] };
        self.init_i64(&name, &dims, v);
        self.consts.insert(key, name.clone());
        name
    }

    pub fn add(&mut self, a: &str, b: &str, hint: &str) -> String {
        self.op("Add", &[a, b], vec![], hint)
    }

    pub fn mul(&mut self, a: &str, b: &str, hint: &str) -> String {
        self.op("Mul", &[a, b], vec![], hint)
    }

    pub fn reshape(&mut self, x: &str, shape: &[i64], hint: &str) -> String {
        let s = self.ints(shape, false);
        self.op("Reshape", &[x, &s], vec![], hint)
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64], hint: &str) -> String {
        self.op("Transpose", &[x], vec![attr_ints("perm", perm)], hint)
    }

    pub fn unsqueeze(&mut self, x: &str, axes: &[i64], hint: &str) -> String {
        let a = self.ints(axes, false);
        self.op("Unsqueeze", &[x, &a], vec![], hint)
    }

    /// Mean over the last axis, kept (the `axes` input form from opset 18, the attribute before).
    pub fn reduce_mean_last(&mut self, x: &str, hint: &str) -> String {
        if self.opset >= 18 {
            let a = self.ints(&[-1], false);
            self.op("ReduceMean", &[x, &a], vec![attr_i("keepdims", 1)], hint)
        } else {
            self.op("ReduceMean", &[x], vec![attr_ints("axes", &[-1]), attr_i("keepdims", 1)], hint)
        }
    }

    /// `x[..., :len]` style slice on axis `axis` from 0 to the 1-D tensor `end`.
    pub fn slice_to(&mut self, x: &str, end: &str, axis: i64, hint: &str) -> String {
        let (zero, ax) = (self.ints(&[0], false), self.ints(&[axis], false));
        self.op("Slice", &[x, &zero, end, &ax], vec![], hint)
    }

    /// `x[start:end]` on axis `axis`, constant bounds.
    pub fn slice(&mut self, x: &str, start: i64, end: i64, axis: i64, hint: &str) -> String {
        let (s, e, ax) = (self.ints(&[start], false), self.ints(&[end], false), self.ints(&[axis], false));
        self.op("Slice", &[x, &s, &e, &ax], vec![], hint)
    }
}
