//! kiln-hw: hardware mapping of a decoder-only LLM onto accelerator descriptions.
//!
//! A target is a TOML description ([`spec`]); a model is a [`shape::ModelShape`]. [`lower`] turns
//! prefill and one decode step into GEMM, vector and memory ops; [`systolic`] maps each GEMM onto
//! the array (fold counting as SCALE-Sim does it, buffer tiling, dataflow choice); [`perf`] costs
//! every op in time, DRAM traffic and energy, checks the FPGA / DRAM fit, and records every
//! assumption it made; [`report`] renders the result as a table, Markdown, HTML or JSON.
//! Nothing here prints: the CLI does.

pub mod error;
pub mod integer;
pub mod lower;
pub mod onnx;
pub mod perf;
pub mod report;
pub mod shape;
pub mod spec;
pub mod systolic;

pub use error::{HwError, Result};
pub use integer::{load_integer_only, IntegerGpt};
pub use lower::Workload;
pub use onnx::{export_onnx, OnnxOptions};
pub use perf::{estimate, Estimate};
pub use shape::ModelShape;
pub use spec::{load_target, Kind, Precision, Target};
pub use systolic::Dataflow;
