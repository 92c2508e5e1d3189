"""Triton kernels of fip_fast, installed as ``fip_fast.kernels``; reached only through :mod:`fip_fast.ops`."""
def available(device):
    return False, "the Triton kernels are not written yet"
