//! CUDA checks through cudarc, loaded dynamically: builds and runs without CUDA. Every
//! call is gated on `is_culib_present()`, since cudarc panics when the library is absent.
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
