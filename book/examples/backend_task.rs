//! Book example: run generic code on a backend chosen by name at run time.
use burn::prelude::*;
use kosmos_core::backend::{BackendTask, run_task};

// ANCHOR: task
struct Norm;

impl BackendTask for Norm {
    type Output = f32;
    fn run<B: Backend>(self, device: B::Device) -> f32 {
        let x = Tensor::<B, 1>::from_floats([3.0, 4.0], &device);
        x.powf_scalar(2.0).sum().sqrt().into_scalar().elem()
    }
}

fn main() {
    let device = std::env::args().nth(1).unwrap_or_else(|| "flex".into());
    match run_task(&device, Norm) {
        Ok(norm) => println!("{device}: |(3, 4)| = {norm}"),
        Err(err) => eprintln!("error: {err}"),
    }
}
// ANCHOR_END: task
