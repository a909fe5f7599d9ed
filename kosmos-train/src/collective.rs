//! Data parallelism over several machines ("nodes"): one gradient all-reduce per optimizer step
//! through burn-collective's global orchestrator (see [`crate::config::NodesConfig`]).
//!
//! Each step, every node flattens its partial gradient sums (one segment per trainable parameter,
//! zeros where it has none), one presence flag per parameter and its partial loss into one f32
//! vector; the nodes sum the vectors (`all_reduce`, `Sum`); every node reads back the same
//! gradients (a parameter keeps a gradient when any node had one) and the same loss. One
//! collective operation per step keeps the network round trips to one per step, as bucketed
//! all-reduce does in PyTorch's DDP.
//!
//! burn-collective 0.21.0 workaround: its global sync never empties its list of synced peers
//! (`SyncService::sync` clears a copy), so the second global operation of a registration hangs.
//! Each step therefore registers, all-reduces once and finishes; on loopback that costs about
//! 45 ms a step (measured with two processes on this machine).

use std::sync::Once;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};
use kosmos_models::Kosmos2;

use crate::TrainError;
use crate::config::NodesConfig;
use crate::trainer::Accumulated;

/// This node's place in a multi-node run.
#[derive(Clone, Debug)]
pub struct NodeGroup {
    config: NodesConfig,
}

impl NodeGroup {
    /// Join the run described by `config` (validated); rank 0 with `serve_orchestrator` starts
    /// the orchestrator in this process, in a background thread.
    pub fn join(config: &NodesConfig) -> Result<Self, TrainError> {
        if config.serve_orchestrator {
            let port = NodesConfig::port_of(&config.orchestrator, "nodes.orchestrator")?;
            serve_orchestrator_in_background(port)?;
        }
        Ok(Self { config: config.clone() })
    }

    /// This node's rank.
    pub fn rank(&self) -> usize {
        self.config.rank as usize
    }

    /// Nodes in the run.
    pub fn count(&self) -> usize {
        self.config.count as usize
    }

    /// Sum `acc` (this node's share of the step: its loss times its token share, its gradients)
    /// over all nodes. Every node gets the same result: the step's loss and gradients.
    /// A node whose loss was not finite passes it on (its gradients absent), so that every node
    /// sees the non-finite sum and stops at the same step instead of waiting for it.
    pub fn all_reduce<B: AutodiffBackend>(
        &self,
        model: &Kosmos2<B>,
        acc: Accumulated,
        device: &B::Device,
    ) -> Result<Accumulated, TrainError> {
        let mut flatten = Flatten::<B::InnerBackend> {
            grads: &acc.grads,
            parts: Vec::new(),
            present: Vec::new(),
            device: device.clone(),
        };
        model.visit(&mut flatten);
        let Flatten { mut parts, present, .. } = flatten;
        // The loss as two f32 summands (high and low part) in this node's own slots (the others'
        // are zero, so the sum moves them exactly); they are added in f64 afterwards.
        let hi = acc.loss as f32;
        let lo = (acc.loss - hi as f64) as f32;
        let (rank, count) = (self.rank(), self.count());
        let mut losses = vec![0f32; 2 * count];
        (losses[2 * rank], losses[2 * rank + 1]) = (hi, lo);
        let tail: Vec<f32> = present.iter().copied().chain(losses).collect();
        let tail_len = tail.len();
        parts.push(Tensor::from_data(TensorData::new(tail, [tail_len]), device));
        let flat = Tensor::cat(parts, 0);
        let summed = self.all_reduce_flat::<B::InnerBackend>(flat, device)?;
        let n = summed.dims()[0];
        let tail: Vec<f32> = summed
            .clone()
            .slice(n - tail_len..n)
            .into_data()
            .to_vec()
            .map_err(|e| TrainError::Invalid(format!("multi-node all-reduce: {e:?}")))?;
        let loss = tail[present.len()..].iter().map(|&x| x as f64).sum();
        let mut unflatten = Unflatten::<B::InnerBackend> {
            flat: summed,
            offset: 0,
            present: &tail[..present.len()],
            index: 0,
            grads: GradientsParams::new(),
        };
        model.visit(&mut unflatten);
        Ok(Accumulated {
            loss,
            grads: unflatten.grads,
            ..acc
        })
    }

    fn all_reduce_flat<I: Backend>(&self, flat: Tensor<I, 1>, device: &I::Device) -> Result<Tensor<I, 1>, TrainError> {
        let c = &self.config;
        let err = |what: &str, e: burn_collective::CollectiveError| {
            TrainError::Invalid(format!(
                "multi-node {what} (rank {} of {}, orchestrator {}, this node {}): {e:?}",
                c.rank, c.count, c.orchestrator, c.address
            ))
        };
        let parse = |a: &str| a.parse().expect("an address parses (any string does)");
        let port = NodesConfig::port_of(&c.address, "nodes.address")?;
        let collective = CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(c.count)
            .with_global_address(parse(&c.orchestrator))
            .with_node_address(parse(&c.address))
            .with_data_service_port(port);
        let id = PeerId(c.rank);
        burn_collective::register::<I>(id, device.clone(), collective).map_err(|e| err("register", e))?;
        let summed = burn_collective::all_reduce::<I>(id, flat.into_primitive().tensor(), ReduceOperation::Sum)
            .map_err(|e| err("all-reduce", e))?;
        burn_collective::finish_collective::<I>(id).map_err(|e| err("finish", e))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(summed)))
    }
}

/// Serve burn-collective's global orchestrator on `port` in a background thread of this process
/// (once per process).
pub fn serve_orchestrator_in_background(port: u16) -> Result<(), TrainError> {
    static START: Once = Once::new();
    let mut result = Ok(());
    START.call_once(|| match runtime(port) {
        Ok(runtime) => {
            std::thread::spawn(move || runtime.block_on(burn_collective::start_global_orchestrator(port)));
            // Let it bind before the nodes connect.
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Err(e) => result = Err(e),
    });
    result
}

/// Serve the orchestrator on `port` until the process is stopped (`kosmos orchestrator`).
pub fn serve_orchestrator(port: u16) -> Result<(), TrainError> {
    runtime(port)?.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

/// The tokio runtime the orchestrator runs on.
fn runtime(port: u16) -> Result<tokio::runtime::Runtime, TrainError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| TrainError::Invalid(format!("orchestrator on port {port}: {e}")))
}

/// Every trainable parameter's gradient (or zeros), flattened, in visiting order.
struct Flatten<'a, I: Backend> {
    grads: &'a GradientsParams,
    parts: Vec<Tensor<I, 1>>,
    present: Vec<f32>,
    device: I::Device,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let shape = param.val().shape();
        let numel = shape.num_elements();
        match self.grads.get::<B::InnerBackend, D>(param.id) {
            Some(g) => {
                self.parts.push(g.to_device(&self.device).reshape([numel]));
                self.present.push(1.0);
            }
            None => {
                self.parts.push(Tensor::zeros([numel], &self.device));
                self.present.push(0.0);
            }
        }
    }
}

/// The inverse of [`Flatten`] on the summed vector.
struct Unflatten<'a, I: Backend> {
    flat: Tensor<I, 1>,
    offset: usize,
    present: &'a [f32],
    index: usize,
    grads: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let shape = param.val().shape();
        let numel = shape.num_elements();
        let range = self.offset..self.offset + numel;
        self.offset += numel;
        let present = self.present[self.index] > 0.0;
        self.index += 1;
        if present {
            let g: Tensor<B::InnerBackend, D> = self.flat.clone().slice(range).reshape(shape);
            self.grads.register(param.id, g);
        }
    }
}
