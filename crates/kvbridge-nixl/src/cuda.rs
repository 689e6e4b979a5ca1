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

/// A CUDA event recorded on the engine's stream (RAII: destroyed on drop): the fence a
/// push WRITE waits on, so that it never reads a layer a kernel is still writing.
#[derive(Debug)]
pub struct CudaFence {
    ev: cudarc::driver::sys::CUevent,
    ctx: cudarc::driver::sys::CUcontext,
}

// SAFETY: a CUDA event and context handle may be used from any thread; the event is
// destroyed once, by its owner (Drop).
unsafe impl Send for CudaFence {}

impl CudaFence {
    /// Record an event on `stream` (a `CUstream` handle, as torch's
    /// `torch.cuda.current_stream().cuda_stream`; 0 is the legacy default stream) in the
    /// calling thread's current context: it completes once the work queued on the stream
    /// before it has. Without a CUDA driver or a current context, a typed error.
    pub fn record(stream: u64) -> Result<Self, NixlError> {
        use cudarc::driver::sys::{self, CUresult};
        if !driver_present() {
            return Err(NixlError::CudaUnavailable);
        }
        let fail = |what: &str, r: CUresult| NixlError::CudaDevice { ordinal: 0, reason: format!("{what}: {r:?}") };
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the driver library is present; cuCtxGetCurrent writes one handle.
        let r = unsafe { sys::cuCtxGetCurrent(&mut ctx) };
        if r != CUresult::CUDA_SUCCESS || ctx.is_null() {
            return Err(fail("no current CUDA context on the engine thread", r));
        }
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: a context is current; cuEventCreate writes one handle.
        let r = unsafe { sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) };
        if r != CUresult::CUDA_SUCCESS {
            return Err(fail("cuEventCreate", r));
        }
        let fence = Self { ev, ctx };
        // SAFETY: `ev` is a live event of the current context; `stream` comes from the
        // engine (torch) for the same context.
        let r = unsafe { sys::cuEventRecord(fence.ev, stream as usize as sys::CUstream) };
        if r != CUresult::CUDA_SUCCESS {
            return Err(fail("cuEventRecord", r));
        }
        Ok(fence)
    }
}

impl kvbridge_driver::worker::Fence for CudaFence {
    fn wait(&self) -> Result<(), String> {
        use cudarc::driver::sys::{self, CUresult};
        // SAFETY: `ctx` and `ev` are the live handles `record` made; making the context
        // current on this (writer) thread is what NIXL's own calls here expect anyway.
        let r = unsafe {
            let r = sys::cuCtxSetCurrent(self.ctx);
            if r != CUresult::CUDA_SUCCESS {
                r
            } else {
                sys::cuEventSynchronize(self.ev)
            }
        };
        if r == CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(format!("cuEventSynchronize: {r:?}"))
        }
    }
}

impl Drop for CudaFence {
    fn drop(&mut self) {
        // SAFETY: `ev` was created by `record` and is destroyed only here.
        unsafe {
            let _ = cudarc::driver::sys::cuEventDestroy_v2(self.ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_cuda_calls_are_typed_errors() {
        if driver_present() {
            return; // covered by the GPU tests (tests/gpu/main.rs)
        }
        assert!(matches!(bind_device(0), Err(NixlError::CudaUnavailable)));
        assert!(matches!(check_device_pointer(0x1000), Err(NixlError::CudaUnavailable)));
        assert!(matches!(CudaFence::record(0), Err(NixlError::CudaUnavailable)));
    }
}
