//! [`CudaLayer::calibrate`]: measured plan choice on the device (see [`crate::layer::calibrate`]).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;

use super::{driver_err, CudaLayer, Dtype};
use crate::error::Result;
use crate::layer::calibrate::{self, CalibrationKey, CalibrationOptions, PlanTable};
use crate::layer::core::LayerCore;
use crate::layer::plan::{ExecPlan, SMALL_N_MAX};
use crate::rng::Rng;

/// A token count's calibration buffers: n, then X, G, Y, dX (in `T`) and dM, dgamma (f32).
type Buffers<T> = (usize, [CudaSlice<T>; 4], [CudaSlice<f32>; 2]);

impl<T: Dtype> CudaLayer<T> {
    /// What a calibration of this layer is valid for: this GPU, dtype, shape and pattern.
    pub fn calibration_key(&self) -> CalibrationKey {
        LayerCore::calibration_key(self, "cuda", self.gpu().name().to_string(), T::SUFFIX)
    }

    /// Measures every plan (factored, merged, and small-n where `n <= SMALL_N_MAX`) at each of
    /// `options.tokens`, forward + backward on random inputs, timed with CUDA events on the
    /// layer's stream (launch gaps count, as they do for a caller), or loads the table from
    /// the plan cache; then `Auto` uses it. Coefficients, gate and the configured plan are
    /// unchanged; the workspace grows to what the largest token count needs.
    pub fn calibrate(&mut self, options: &CalibrationOptions) -> Result<&PlanTable> {
        let key = self.calibration_key();
        if self.gpu().is_virtual() {
            // The plan table still works (and is keyed by this device's name, so it never
            // steers a real GPU), but what it measured is the interpreter, not a card.
            eprintln!("svft calibrate on {}: virtual device: timings meaningless", self.gpu().name());
        }
        let configured = self.config().plan;
        let (d_out, d_in, nnz) = (self.dims().d_out, self.dims().d_in, self.omega().len());
        let stream = self.stream().clone();
        let mut rng = Rng::new(0xca11_b7a7e);
        let mut upload = |len: usize| -> Result<CudaSlice<T>> {
            let host: Vec<T> = rng.normal_vec(len, 1.0).into_iter().map(T::from_f32).collect();
            stream.clone_htod(&host).map_err(|e| driver_err("uploading calibration inputs", e))
        };
        let plans = [ExecPlan::Factored, ExecPlan::Merged, ExecPlan::SmallN];
        let ctx = stream.context();
        let event =
            || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| driver_err("creating an event", e));
        let (begin, end) = (event()?, event()?);
        // Inputs and outputs for the token count being measured, made once per count.
        let mut bufs: Option<Buffers<T>> = None;
        let result = calibrate::calibrate(
            &key,
            &plans,
            options,
            |plan, n| {
                if bufs.as_ref().is_none_or(|b| b.0 != n) {
                    let acts = [upload(n * d_in)?, upload(n * d_out)?, upload(n * d_out)?, upload(n * d_in)?];
                    let alloc = |len| {
                        stream.alloc_zeros::<f32>(len).map_err(|e| driver_err("allocating calibration outputs", e))
                    };
                    bufs = Some((n, acts, [alloc(nnz)?, alloc(1)?]));
                }
                let (_, [x, g, y, dx], [dm, dgamma]) = bufs.as_mut().expect("made above");
                self.set_plan(plan.into());
                // One forward + backward between two events: device time, launch gaps included.
                begin.record(&stream).map_err(|e| driver_err("recording an event", e))?;
                self.forward(&x.slice(..), n, &mut y.slice_mut(..))?;
                self.backward(
                    &g.slice(..),
                    n,
                    &mut dx.slice_mut(..),
                    &mut dm.slice_mut(..),
                    &mut dgamma.slice_mut(..),
                )?;
                end.record(&stream).map_err(|e| driver_err("recording an event", e))?;
                end.synchronize().map_err(|e| driver_err("calibrating", e))?;
                Ok(begin.elapsed_ms(&end).map_err(|e| driver_err("reading an event", e))? as f64)
            },
            |plan, n| plan != ExecPlan::SmallN || n <= SMALL_N_MAX,
        );
        self.set_plan(configured);
        let table = result?;
        self.set_plan_table(Some(table));
        Ok(self.plan_table().expect("set above"))
    }
}
