//! Element types, shapes and a contiguous row-major CPU tensor.

use half::{bf16, f16};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error("shape {shape:?} holds {expected} elements but {got} were given")]
    SizeMismatch { shape: Vec<usize>, expected: usize, got: usize },
    #[error("tensor has dtype {0:?}; this operation needs {1:?}")]
    WrongDType(DType, DType),
}

/// Element types kiln stores; compute kernels for the low-precision ones arrive with later issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    I8,
    I32,
    /// Two 4-bit integers per byte, low nibble first.
    I4Packed,
}

impl DType {
    /// Bits per element (4 for packed int4).
    pub fn bits(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 32,
            DType::BF16 | DType::F16 => 16,
            DType::I8 => 8,
            DType::I4Packed => 4,
        }
    }

    /// Bytes needed to hold `n` elements.
    pub fn storage_bytes(self, n: usize) -> usize {
        (n * self.bits()).div_ceil(8)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    pub fn new(dims: &[usize]) -> Shape {
        Shape(dims.to_vec())
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I8(Vec<i8>),
    I32(Vec<i32>),
    I4Packed(Vec<u8>),
}

/// A contiguous, row-major tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Shape,
    storage: Storage,
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Tensor {
        let shape = Shape::new(shape);
        let n = shape.numel();
        Tensor { shape, storage: Storage::F32(vec![0.0; n]) }
    }

    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Tensor, TensorError> {
        let shape = Shape::new(shape);
        if shape.numel() != data.len() {
            let expected = shape.numel();
            return Err(TensorError::SizeMismatch { shape: shape.0, expected, got: data.len() });
        }
        Ok(Tensor { shape, storage: Storage::F32(data) })
    }

    pub fn from_i8(shape: &[usize], data: Vec<i8>) -> Result<Tensor, TensorError> {
        Self::check(shape, data.len()).map(|shape| Tensor { shape, storage: Storage::I8(data) })
    }

    pub fn from_i32(shape: &[usize], data: Vec<i32>) -> Result<Tensor, TensorError> {
        Self::check(shape, data.len()).map(|shape| Tensor { shape, storage: Storage::I32(data) })
    }

    /// Packed int4: `bytes` holds two elements per byte, low nibble first.
    pub fn from_i4_packed(shape: &[usize], bytes: Vec<u8>) -> Result<Tensor, TensorError> {
        let shape = Shape::new(shape);
        let expected = DType::I4Packed.storage_bytes(shape.numel());
        if bytes.len() != expected {
            return Err(TensorError::SizeMismatch { shape: shape.0, expected, got: bytes.len() });
        }
        Ok(Tensor { shape, storage: Storage::I4Packed(bytes) })
    }

    fn check(shape: &[usize], got: usize) -> Result<Shape, TensorError> {
        let shape = Shape::new(shape);
        let expected = shape.numel();
        if expected != got {
            return Err(TensorError::SizeMismatch { shape: shape.0, expected, got });
        }
        Ok(shape)
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
            Storage::I8(_) => DType::I8,
            Storage::I32(_) => DType::I32,
            Storage::I4Packed(_) => DType::I4Packed,
        }
    }

    pub fn as_f32(&self) -> Result<&[f32], TensorError> {
        match &self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(TensorError::WrongDType(self.dtype(), DType::F32)),
        }
    }

    pub fn as_f32_mut(&mut self) -> Result<&mut [f32], TensorError> {
        let dt = self.dtype();
        match &mut self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(TensorError::WrongDType(dt, DType::F32)),
        }
    }

    /// Converts to another floating dtype (f32, bf16, f16), rounding to nearest even.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor, TensorError> {
        let f32s: Vec<f32> = match &self.storage {
            Storage::F32(v) => v.clone(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::I8(v) => v.iter().map(|&x| x as f32).collect(),
            Storage::I32(v) => v.iter().map(|&x| x as f32).collect(),
            Storage::I4Packed(_) => return Err(TensorError::WrongDType(DType::I4Packed, dtype)),
        };
        let storage = match dtype {
            DType::F32 => Storage::F32(f32s),
            DType::BF16 => Storage::BF16(f32s.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => Storage::F16(f32s.iter().map(|&x| f16::from_f32(x)).collect()),
            other => return Err(TensorError::WrongDType(self.dtype(), other)),
        };
        Ok(Tensor { shape: self.shape.clone(), storage })
    }

    pub fn into_f32_vec(self) -> Result<Vec<f32>, TensorError> {
        match self.storage {
            Storage::F32(v) => Ok(v),
            other => {
                let t = Tensor { shape: self.shape, storage: other };
                t.to_dtype(DType::F32)?.into_f32_vec()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_mismatch_is_an_error() {
        assert!(Tensor::from_f32(&[2, 3], vec![0.0; 5]).is_err());
        let t = Tensor::from_f32(&[2, 3], vec![1.5; 6]).unwrap();
        assert_eq!(t.shape().numel(), 6);
    }

    #[test]
    fn bf16_round_trip_keeps_representable_values() {
        let t = Tensor::from_f32(&[3], vec![1.0, -2.5, 0.15625]).unwrap();
        let back = t.to_dtype(DType::BF16).unwrap().into_f32_vec().unwrap();
        assert_eq!(back, vec![1.0, -2.5, 0.15625]);
        assert_eq!(DType::I4Packed.storage_bytes(7), 4);
    }
}
