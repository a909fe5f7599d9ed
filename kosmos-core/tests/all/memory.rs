//! Huge pages under the weights (`kosmos_core::memory`): values unchanged, the report exact, a
//! no-op where tensors are not flex's.

use burn::backend::{Autodiff, Flex};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use kosmos_core::memory::{self, HUGE_PAGE, HugePages};

type B = Flex;

/// Whether this machine can build huge pages on request: transparent huge pages not `never`, and
/// Linux 6.1 or later (`MADV_COLLAPSE`).
fn kernel_collapses() -> bool {
    let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    !setting.is_empty() && !setting.contains("[never]") && (major, minor) >= (6, 1)
}

fn linear(d_in: usize, d_out: usize) -> Linear<B> {
    LinearConfig::new(d_in, d_out).init(&Default::default())
}

#[test]
fn module_parameters_move_to_huge_pages_with_their_values() {
    // 1024 x 2048 f32 = 8 MiB of weight (whole huge pages inside it whatever its alignment) and a
    // 2048-value bias (one 8 KiB buffer: counted, too small to move by itself).
    let layer = linear(1024, 2048);
    let before = (
        layer.weight.val().into_data(),
        layer.bias.as_ref().unwrap().val().into_data(),
    );
    let report = memory::use_huge_pages(&layer);
    assert_eq!(report.tensors, 2, "{report:?}");
    assert_eq!(report.bytes, (1024 * 2048 + 2048) * 4, "{report:?}");
    assert!(report.huge_bytes <= report.bytes, "{report:?}");
    if memory::enabled() && kernel_collapses() {
        // At least the whole huge pages inside the weight's buffer.
        assert!(report.huge_bytes >= 1024 * 2048 * 4 - 2 * HUGE_PAGE, "{report:?}");
        let process = memory::process_huge_bytes().expect("Linux has /proc/self/smaps_rollup");
        assert!(process >= HUGE_PAGE, "{process} bytes of the process on huge pages");
    }
    layer.weight.val().into_data().assert_eq(&before.0, true);
    layer
        .bias
        .as_ref()
        .unwrap()
        .val()
        .into_data()
        .assert_eq(&before.1, true);
    // Asking again is harmless (the pages are already huge).
    let again = memory::use_huge_pages(&layer);
    assert_eq!((again.tensors, again.bytes), (report.tensors, report.bytes));
}

#[test]
fn single_tensors_and_raw_buffers() {
    let device = Default::default();
    // Int tensors (the int8 values of Q8 weights take this path).
    let ints = Tensor::<B, 1, Int>::arange(0..(1 << 20), &device).reshape([1024, 1024]);
    let before = ints.to_data();
    let report = memory::int_tensor(&ints);
    assert_eq!(report.tensors, 1);
    assert_eq!(report.bytes, ints.dtype().size() << 20);
    ints.into_data().assert_eq(&before, true);
    // Below one huge page nothing moves.
    let small = Tensor::<B, 1>::ones([1000], &device);
    let report = memory::float_tensor(&small);
    assert_eq!((report.tensors, report.bytes, report.huge_bytes), (1, 4000, 0));
    assert_eq!(memory::advise(&[0u8; 100]), 0);
    // A plain buffer: values kept, at most its own bytes counted.
    let buffer: Vec<u8> = (0..6 * HUGE_PAGE).map(|i| (i % 251) as u8).collect();
    let moved = memory::advise(&buffer);
    assert!(moved <= buffer.len());
    if memory::enabled() && kernel_collapses() {
        assert!(moved >= 4 * HUGE_PAGE, "{moved}");
    }
    assert!(buffer.iter().enumerate().all(|(i, &v)| v == (i % 251) as u8));
}

#[test]
fn tensors_outside_host_storage_are_left_alone() {
    // Autodiff wraps flex's tensors in its own: nothing this module can see or move.
    let layer: Linear<Autodiff<B>> = LinearConfig::new(1024, 2048).init(&Default::default());
    assert_eq!(memory::use_huge_pages(&layer), HugePages::default());
    #[cfg(feature = "ndarray")]
    {
        let layer: Linear<burn::backend::NdArray> = LinearConfig::new(1024, 2048).init(&Default::default());
        assert_eq!(memory::use_huge_pages(&layer), HugePages::default());
    }
}

#[test]
fn host_buffers_are_zeroed_aligned_and_exact() {
    for len in [0, 17, 100, 4096, HUGE_PAGE - 16, HUGE_PAGE, 3 * HUGE_PAGE + 12] {
        let mut bytes = memory::host_bytes(len);
        assert_eq!(bytes.len(), len);
        assert!(bytes.iter().all(|&b| b == 0), "{len} bytes not zeroed");
        assert_eq!(bytes.as_ptr() as usize % 16, 0, "{len} bytes misaligned");
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i % 199) as u8;
        }
        assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i % 199) as u8));
    }
    // A large buffer backs a flex tensor without a copy, and is put on huge pages as it is written.
    let len = 4 * HUGE_PAGE;
    let bytes = memory::host_bytes(len);
    let pointer = bytes.as_ptr();
    let mut data = burn::tensor::TensorData::from_bytes(bytes, [len / 4], burn::tensor::DType::F32);
    data.as_mut_slice::<f32>().unwrap().fill(1.5);
    let tensor = Tensor::<B, 1>::from_data(data, &Default::default());
    let report = memory::float_tensor(&tensor);
    assert_eq!(report.bytes, len);
    if memory::enabled() && kernel_collapses() {
        assert_eq!(report.huge_bytes, len, "a 2 MiB-aligned mapping is whole huge pages");
    }
    assert_eq!(tensor.clone().sum().into_scalar(), 1.5 * (len / 4) as f32);
    let burn::tensor::TensorPrimitive::Float(primitive) = tensor.into_primitive() else {
        panic!("flex float tensors are not quantized");
    };
    assert_eq!(
        primitive.bytes().as_ptr(),
        pointer,
        "the tensor keeps the buffer it was read into"
    );
}
