//! [`CudaLayer::calibrate`]: measured plan choice on the device (see [`crate::calibrate`]).

use cudarc::driver::CudaSlice;

use super::{driver_err, CudaLayer, Dtype};
use crate::calibrate::{self, CalibrationKey, CalibrationOptions, PlanTable};
use crate::error::Result;
use crate::plan::{ExecPlan, Plan, SMALL_N_MAX};
use crate::rng::Rng;

impl<T: Dtype> CudaLayer<T> {
    /// What a calibration of this layer is valid for: this GPU, dtype, shape and pattern.
    pub fn calibration_key(&self) -> CalibrationKey {
        let d = self.dims();
        CalibrationKey {
            backend: "cuda".into(),
            device: self.gpu().name().to_string(),
            dtype: T::SUFFIX.into(),
            d_out: d.d_out,
            d_in: d.d_in,
            r: d.r,
            pattern: self.config().pattern.to_string(),
        }
    }

    /// Measures every plan (factored, merged, and small-n where `n <= SMALL_N_MAX`) at each of
    /// `options.tokens`, forward + backward on random inputs, timed on the host around a stream
    /// synchronisation (launch costs count, as they do for a caller), or loads the table from
    /// the plan cache; then `Auto` uses it. Coefficients, gate and the configured plan are
    /// unchanged; the workspace grows to what the largest token count needs.
    pub fn calibrate(&mut self, options: &CalibrationOptions) -> Result<&PlanTable> {
        let key = self.calibration_key();
        let configured = self.config().plan;
        let (d_out, d_in, nnz) = (self.dims().d_out, self.dims().d_in, self.omega().len());
        let stream = self.stream().clone();
        let mut rng = Rng::new(0xca11_b7a7e);
        let mut upload = |len: usize| -> Result<CudaSlice<T>> {
            let host: Vec<T> = rng.normal_vec(len, 1.0).into_iter().map(T::from_f32).collect();
            stream.clone_htod(&host).map_err(|e| driver_err("uploading calibration inputs", e))
        };
        let plans = [ExecPlan::Factored, ExecPlan::Merged, ExecPlan::SmallN];
        let result = calibrate::calibrate(
            &key,
            &plans,
            options,
            |plan, n| {
                let (x, g) = (upload(n * d_in)?, upload(n * d_out)?);
                let (mut y, mut dx) = (upload(n * d_out)?, upload(n * d_in)?);
                let alloc =
                    |len| stream.alloc_zeros::<f32>(len).map_err(|e| driver_err("allocating calibration outputs", e));
                let (mut dm, mut dgamma) = (alloc(nnz)?, alloc(1)?);
                self.set_plan(match plan {
                    ExecPlan::Factored => Plan::Factored,
                    ExecPlan::Merged => Plan::Merged,
                    ExecPlan::SmallN => Plan::SmallN,
                });
                calibrate::median_ms(options.budget, || {
                    self.forward(&x.slice(..), n, &mut y.slice_mut(..))?;
                    self.backward(
                        &g.slice(..),
                        n,
                        &mut dx.slice_mut(..),
                        &mut dm.slice_mut(..),
                        &mut dgamma.slice_mut(..),
                    )?;
                    stream.synchronize().map_err(|e| driver_err("calibrating", e))
                })
            },
            |plan, n| plan != ExecPlan::SmallN || n <= SMALL_N_MAX,
        );
        self.set_plan(configured);
        let table = result?;
        self.set_plan_table(Some(table));
        Ok(self.plan_table().expect("set above"))
    }
}
