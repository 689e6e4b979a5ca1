//! CUDA checks through cudarc, loaded dynamically: builds and runs without CUDA. Every
//! call is gated on `is_culib_present()`, since cudarc panics when the library is absent.
use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::error::NixlError;

/// True if the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only probes whether libcuda can be dlopened.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Check that `ptr` is CUDA device memory before registering it as VRAM.
pub fn check_device_pointer(ptr: u64) -> Result<(), NixlError> {
    if !driver_present() {
        return Err(NixlError::CudaUnavailable);
    }
    cudarc::driver::result::init().map_err(|_| NixlError::CudaUnavailable)?;
    let mut mem_type: u32 = 0;
    // SAFETY: the driver is initialised; the attribute writes one unsigned int.
    let r = unsafe {
        cudarc::driver::sys::cuPointerGetAttribute(
            &mut mem_type as *mut u32 as *mut core::ffi::c_void,
            cudarc::driver::sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr,
        )
    };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS || mem_type != cudarc::driver::sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
        return Err(NixlError::NotDeviceMemory { ptr, code: r as i64 });
    }
    Ok(())
}

/// Make device `ordinal`'s primary CUDA context current on the calling thread, retained for
/// as long as the returned handle lives.
///
/// Call it before the NIXL agent and its UCX backend are created on this thread: UCX looks
/// for a current context when it initialises, and without one it silently leaves out its
/// CUDA transports (`cuda_copy`, `cuda_ipc`/NVLink). Without a CUDA driver, or with no such
/// device, this is an error, never a panic.
pub fn bind_device(ordinal: u32) -> Result<Arc<CudaContext>, NixlError> {
    if !driver_present() {
        return Err(NixlError::CudaUnavailable);
    }
    let ctx = CudaContext::new(ordinal as usize).map_err(|e| NixlError::CudaDevice { ordinal, reason: e.to_string() })?;
    tracing::info!(device = ordinal, "kvbridge: CUDA context current before NIXL starts");
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_cuda_calls_are_typed_errors() {
        if driver_present() {
            return; // covered by the GPU tests (tests/gpu.rs)
        }
        assert!(matches!(bind_device(0), Err(NixlError::CudaUnavailable)));
        assert!(matches!(check_device_pointer(0x1000), Err(NixlError::CudaUnavailable)));
    }
}
