//! Which backend serves as "the device": CUDA where a driver is present, else host memory.
//!
//! Only the selection lives here for now; the backends themselves arrive with the streaming
//! engine.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What the operator asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA if a driver can be loaded, else host.
    #[default]
    Auto,
    /// NVIDIA GPUs through the CUDA driver API.
    Cuda,
    /// System memory standing in for device memory.
    Host,
}

/// The backend actually in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cuda,
    Host,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Cuda => "cuda",
            Backend::Host => "host",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("the cuda backend was requested but no CUDA driver (libcuda.so) could be loaded")]
    NoCudaDriver,
}

/// Whether libcuda can be loaded. cudarc panics on first use without it, so this is asked first.
pub fn cuda_driver_present() -> bool {
    // SAFETY: this only attempts to dlopen libcuda by its usual names and closes it again; it
    // runs no CUDA call. Loading a library runs its initialisers, which for the NVIDIA driver
    // are safe to run at any point in the process.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Resolves the operator's choice against what this machine has.
pub fn select(choice: DeviceChoice) -> Result<(Backend, &'static str), DeviceError> {
    select_with(choice, cuda_driver_present())
}

fn select_with(choice: DeviceChoice, cuda: bool) -> Result<(Backend, &'static str), DeviceError> {
    match (choice, cuda) {
        (DeviceChoice::Host, _) => Ok((Backend::Host, "host requested")),
        (DeviceChoice::Cuda, true) => Ok((Backend::Cuda, "cuda requested")),
        (DeviceChoice::Cuda, false) => Err(DeviceError::NoCudaDriver),
        (DeviceChoice::Auto, true) => Ok((Backend::Cuda, "auto: CUDA driver found")),
        (DeviceChoice::Auto, false) => {
            Ok((Backend::Host, "auto: no CUDA driver, using host memory"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_host_and_cuda_fails_clearly() {
        assert_eq!(select_with(DeviceChoice::Auto, false).map(|s| s.0), Ok(Backend::Host));
        assert_eq!(select_with(DeviceChoice::Auto, true).map(|s| s.0), Ok(Backend::Cuda));
        assert_eq!(select_with(DeviceChoice::Cuda, false), Err(DeviceError::NoCudaDriver));
        assert_eq!(select_with(DeviceChoice::Host, true).map(|s| s.0), Ok(Backend::Host));
    }

    #[test]
    fn probing_for_the_driver_does_not_panic() {
        let _ = cuda_driver_present();
    }
}
