"""Platform pieces for confidential VMs: SEV-SNP and TDX.

:mod:`gmemfast.platforms.measure` holds the pure launch-measurement accumulators (the
SEV-SNP launch digest and the TDX MRTD); the VM adapters feed them page by page from
their populate paths.
"""
