"""Target 4, memory: peak RSS holding terabyte-scale state.

- ``Memory64TiB``: a 64 TiB file, 1 GiB backing, fully allocated and private: the
  engine must stay within 256 MiB peak RSS.
- ``Memory1TiBSplit``: a 1 TiB file, 1 GiB backing, allocated, then one page in every
  2 MiB block converted to shared (batched for the engine): every 1 GiB folio is split
  to 4 KiB and every 2 MiB block holds per-page detail; within 1.5 GiB.

asv's peakmem is the peak RSS (ru_maxrss) of the process running the benchmark (forked
from asv's server, so the imports are already resident).  ``setup`` compiles the engine's
kernels on a small file (or loads them from numba's cache) and then resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``), so the figure is: resident memory after setup
(interpreter, imports, kernels) plus the peak while building and holding the state, not
the compiler's transient memory when numba's cache is cold.  ``run_targets.py`` reports
the whole-process peak of a fresh process as well.
The dense model is left out at 64 TiB: one byte per page is 16 GiB.
"""
from __future__ import annotations

from gmemfast.bench import workloads as W
from gmemfast.bench.baselines import DenseModel, RoaringModel

ENGINE = "gmemfast"
ROARING = "roaring model"
DENSE = "dense numpy"


class Memory64TiB:
    params = [[ENGINE, ROARING]]
    param_names = ["impl"]
    timeout = 600

    def setup(self, impl):
        if impl == ENGINE:
            W.warm_engine()
        W.reset_peak_rss()

    def peakmem_allocated_private(self, impl):
        if impl == ENGINE:
            g = W.engine_allocated(64 * W.TIB)
            assert g.folio_order(64 * W.TIB - W.PAGE) == 18
        else:
            m = W.roaring_allocated(64 * W.TIB_PAGES)
            assert m.folio_order(64 * W.TIB_PAGES - 1) == 18


class Memory1TiBSplit:
    params = [[ENGINE, ROARING, DENSE]]
    param_names = ["impl"]
    timeout = 900

    def setup(self, impl):
        if impl == ENGINE:
            W.warm_engine()
        W.reset_peak_rss()

    def peakmem_split_to_4k(self, impl):
        pages = W.split_pages()
        if impl == ENGINE:
            g = W.engine_allocated()
            r = g.set_memory_attributes_many(pages * W.PAGE, W.PAGE, 0)
            assert not r.errno.any()
            assert g.folio_order(0) == 0
        else:
            m = W.model_allocated(RoaringModel if impl == ROARING else DenseModel)
            conv = m.to_shared_page
            for p in pages.tolist():
                conv(p)
            assert m.folio_order(0) == 0
