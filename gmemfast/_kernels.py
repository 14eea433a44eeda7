"""numba kernels of the page-state store.

The store is a three-level tree shaped like a page table, so that work follows the
number of distinct regions touched, not the number of pages:

* level 2, one entry per 1 GiB block (``n2``, dense over the file);
* level 1, tables of 512 entries, one per 2 MiB block (``n1``, a pool, int32: an entry
  is 48 bytes, its counts packed two to a field);
* level 0, tables of 512 page words (``w0``, a pool, uint16).

An entry with no child table is *uniform*: its ``F_WORD`` is the state word of every page
below it. Every entry also keeps, per counted state bit, how many pages below it have the
bit set, so range questions ("is any page pinned?", "is this block wholly private?")
skip whole blocks. A child table whose pages become identical again is folded back into
its parent entry and returned to its pool.

Kernels take only arrays and scalars. The bit, field, meta and counter numbers below are
literal constants of this module (they mirror ``_layout.py``; ``tests/test_layout.py``
checks the two agree) so that numba's on-disk cache is invalidated whenever they change.
Callers validate arguments and guarantee pool capacity (``RESERVE`` free tables of each
level) before calling a kernel that may split entries: kernels never check their inputs
and never bounds-check. Kernels that can decline report it with a named return code
(``RC_GROW``: grow the pools and call again; ``RC_SLOW``: take the general path).
"""
import numpy as np
from numba import njit

# Kernels never allocate (the callers hand them every array), so they run without numba's
# reference counting (``_nrt=False``): with it, every call passing arrays costs atomic
# increments and decrements, 25 ns a call, several times the work of most calls here.
_KERNEL = {"cache": True, "nogil": True, "_nrt": False}
_INLINE = {**_KERNEL, "forceinline": True}
# Small steps that one or two kernels call: inlined before typing, so that numba does not
# compile each as a function of its own (a first compile 15% shorter).
_IR_INLINE = {**_KERNEL, "inline": "always"}

# Every constant is an int64 scalar, not a Python int: numba types a Python int constant
# passed to another kernel as a literal and compiles that kernel once per distinct value
# (``walk_apply`` seven times over); an int64 argument compiles it once. For the same
# reason no call below passes a bare number or ``True``/``False``: ``I0``, ``I1``, ``YES``
# and ``NO`` stand in for them.
_i = np.int64
I0 = _i(0)
I1 = _i(1)
YES = np.bool_(True)
NO = np.bool_(False)

# ---- page state word bits (see _layout.py) ----
ALLOC = _i(1)
PRIV = _i(2)
HMAP = _i(4)
GMAP = _i(8)
PIN = _i(16)
DATA = _i(32)
DMAP_OFF = _i(64)
HUGE = _i(128)
GIG = _i(256)
ORDER_MASK = _i(384)
TE_SHIFT = _i(9)
TE_MASK = _i(3584)
NCOUNTED = _i(8)
COUNTED_MASK = _i(255)  # the counted bits of a word
# indices of the counted bits (count k counts pages with bit 1 << k)
K_ALLOC = _i(0)
K_PRIV = _i(1)
K_HMAP = _i(2)
K_GMAP = _i(3)
K_PIN = _i(4)
K_DATA = _i(5)
K_DMAP_OFF = _i(6)
K_HUGE = _i(7)
PAGE_SHIFT = _i(12)
PAGE_BYTES = _i(4096)

# ---- tree geometry and entry fields ----
N1 = _i(512)            # pages per 2 MiB block, entries per table
N2 = _i(262144)         # pages per 1 GiB block
S1 = _i(9)
S2 = _i(18)
F_WORD = _i(0)
F_CHILD = _i(1)
F_DSPLIT = _i(2)        # this block's direct-map entry is broken into smaller entries
F_CNT = _i(3)
NX = _i(4)
NF = _i(16)             # fields of a 1 GiB entry (int64), and of a saved 2 MiB entry
# A 2 MiB entry (int32) keeps the same first three fields, then its eight counts two to a
# field (count k in the 16 bits at ``(k & 1) * 16`` of field ``F_CNT + k // 2``; a count
# is at most 512), then its exceptions: 48 bytes an entry, 24 KiB a 1 GiB block.
F_NX = _i(7)            # 2 MiB entries: number of exception pages (see below)
F_X0 = _i(8)
NF1 = _i(12)
CNT_MASK = _i(0xFFFF)
XQ_MASK = _i(0xFFFF)    # an exception packs page index (low 16 bits) | word << 16
XW_SHIFT = _i(16)

# ---- meta array: counters first (up to 80 of them), then bookkeeping ----
# Saved states of format 1 kept the bookkeeping 16 slots lower (from 64): see META_V1_SHIFT.
M_FREE1 = _i(80)
M_USED1 = _i(81)
M_CAP1 = _i(82)
M_NFREE1 = _i(83)
M_FREE0 = _i(84)
M_USED0 = _i(85)
M_CAP0 = _i(86)
M_NFREE0 = _i(87)
M_ENOMEM = _i(88)       # injected metadata-allocation failures still to deliver
M_LIMIT = _i(89)        # maximum number of shareability ranges, -1 = unlimited
M_NPAGES = _i(90)
M_ORDER = _i(91)        # backing page order: 0, 9 or 18
M_DMAP = _i(92)         # 0 keep, 1 no-direct-map, 2 on-conversion
M_MERGE = _i(93)        # 1 eager re-merge on conversion to private, 0 never
M_VMTYPE = _i(94)       # 0 sw-protected, 1 snp, 2 tdx
M_HUGETLB = _i(95)
M_FINALIZED = _i(96)
M_CONTENT_MODES = _i(97)
M_TAIL = _i(98)         # pages of the last 1 GiB block beyond the end of the file
M_INITW = _i(99)        # their (never changing) state word
M_DSPLIT1 = _i(100)     # 1 GiB direct-map entries broken up (n2 entries with F_DSPLIT)
M_DSPLIT1_2M = _i(101)  # 2 MiB blocks under them
M_DSPLIT2 = _i(102)     # 2 MiB direct-map entries broken up (n1 entries with F_DSPLIT)
M_GCNT = _i(104)        # 8 slots: per counted bit, pages of the whole tree with it set
META_SIZE = _i(128)
META_V1_SHIFT = 16      # bookkeeping of state format 1 started at M_FREE1 - 16
RESERVE = _i(64)        # free tables of each level guaranteed before a mutating kernel
TOUCH_MIN = _i(64)      # a batch's items in a block from which its table is read ahead

DMAP_KEEP = _i(0)
DMAP_NONE = _i(1)
DMAP_ONCONV = _i(2)
VM_SW = _i(0)
VM_SNP = _i(1)
VM_TDX = _i(2)

EAGAIN = _i(11)
EFAULT = _i(14)
ENOMEM = _i(12)
TLB_CEILING = _i(33)    # tlb_single_page_flush_ceiling
RC_GROW = _i(-1)        # nothing done: the pools need growing first
RC_SLOW = _i(-2)        # nothing done: the single-page path declines, use ``convert``

# HugeTLB Vmemmap Optimization keeps one vmemmap page per huge folio and frees the rest:
# 2 MiB -> 8 pages of struct page (7 freed), 1 GiB -> 4096 (4095 freed).
HVO_FREED_2M = _i(7)
HVO_FREED_1G = _i(4095)

# ---- invariants (numbers and texts: _layout.INVARIANTS)
INV_HMAP = _i(1)
INV_PIN = _i(2)
INV_NEEDS_FOLIO = _i(3)
INV_HUGE = _i(4)
INV_DMAP_KEEP = _i(5)
INV_DMAP_NONE = _i(6)
INV_DMAP_ONCONV = _i(7)
INV_TE = _i(8)
INV_COUNTS = _i(10)
INV_HUGE_BLOCK = _i(11)
INV_TAIL = _i(12)
INV_DSPLIT = _i(13)
INV_GCOUNTS = _i(14)
INV_EXCEPTIONS = _i(15)
INV_ORDER = _i(16)
INV_DMAP_COUNTS = _i(17)    # checked by the store (dmap_entries against dmap_counts)
INV_POOLS = _i(18)

# ---- counters (index into meta) ----
C_HOST_FAULTS = _i(0)
C_HOST_PTES_ZAPPED = _i(1)
C_TLB_INVLPG = _i(2)
C_TLB_FLUSH_FULL = _i(3)
C_TLB_SHOOTDOWNS = _i(4)
C_GUEST_INVALIDATIONS = _i(5)
C_GUEST_PTES_ZAPPED = _i(6)
C_FOLIOS_CHECKED = _i(7)
C_LRU_DRAINS = _i(8)
C_FOLIO_SPLITS_2M = _i(9)
C_FOLIO_SPLITS_1G = _i(10)
C_FOLIO_MERGES_2M = _i(11)
C_FOLIO_MERGES_1G = _i(12)
C_VMEMMAP_PAGES_RESTORED = _i(13)
C_VMEMMAP_PAGES_FREED = _i(14)
C_PAGES_ALLOCATED = _i(15)
C_PAGES_FREED = _i(16)
C_PINS = _i(17)
C_UNPINS = _i(18)
C_PAGES_ZEROED = _i(19)
C_BYTES_ZEROED_4K = _i(20)
C_BYTES_ZEROED_2M = _i(21)
C_BYTES_ZEROED_1G = _i(22)
C_BYTES_COPIED = _i(23)
C_DMAP_ENTRIES_CHANGED = _i(24)
C_DMAP_SPLITS_1G = _i(25)
C_DMAP_SPLITS_2M = _i(26)
C_ATTR_WRITES_PAGE = _i(27)
C_ATTR_WRITES_RANGE = _i(28)
C_PAGES_TO_PRIVATE = _i(29)
C_PAGES_TO_SHARED = _i(30)
C_CONVERT_CALLS = _i(31)
C_CONVERT_NOOP = _i(32)
C_CONVERT_EINVAL = _i(33)
C_CONVERT_ENOMEM = _i(34)
C_CONVERT_EAGAIN = _i(35)
C_FALLOCATE_CALLS = _i(36)
C_PUNCH_CALLS = _i(37)
C_PUNCH_EAGAIN = _i(38)
C_VM_ATTR_CALLS = _i(39)
C_RMP_UPDATES = _i(40)
C_PSMASH = _i(41)
C_SNP_FW_LAUNCH_UPDATE = _i(42)
C_SNP_PVALIDATE_4K = _i(43)
C_SNP_PVALIDATE_2M = _i(44)
C_TDX_SEAMCALL_PAGE_ADD = _i(45)
C_TDX_SEAMCALL_MR_EXTEND = _i(46)
C_TDX_SEAMCALL_PAGE_AUG = _i(47)
C_TDX_SEAMCALL_BLOCK = _i(48)
C_TDX_SEAMCALL_TRACK = _i(49)
C_TDX_SEAMCALL_DEMOTE = _i(50)
C_TDX_SEAMCALL_PAGE_REMOVE = _i(51)
C_TDX_ACCEPTS = _i(52)
C_GUEST_EXITS = _i(53)
C_HASH_BYTES = _i(54)
C_PAGES_POPULATED_INPLACE = _i(55)
C_PAGES_POPULATED_LEGACY = _i(56)
C_SNP_FW_LAUNCH_FINISH = _i(57)
C_CONVERT_EOPNOTSUPP = _i(58)
C_ACCEPT_FALLBACKS = _i(59)
C_PREFAULT_CALLS = _i(60)
C_TDX_BUSY_RETRIES = _i(61)
C_ACCEPT_MEMORY_CALLS = _i(62)
C_GUEST_PAGES_TOUCHED = _i(63)
C_IOMMU_MAPS = _i(64)
C_IOMMU_UNMAPS = _i(65)
C_SHARED_DISCARDS = _i(66)


# ======================================================================================
# pools
# ======================================================================================

def _new_l1(n1, meta, w):
    t = meta[M_FREE1]
    if t >= 0:
        meta[M_FREE1] = n1[t * N1, F_CHILD]
        meta[M_NFREE1] -= 1
    else:
        t = meta[M_USED1]
        meta[M_USED1] = t + 1
    base = t * N1
    for j in range(N1):
        r = base + j
        n1[r, F_WORD] = w
        n1[r, F_CHILD] = -1
        n1[r, F_DSPLIT] = 0
        n1[r, F_NX] = 0
    return t


def _free_l1(n1, meta, t):
    n1[t * N1, F_CHILD] = meta[M_FREE1]
    meta[M_FREE1] = t
    meta[M_NFREE1] += 1


def _free_link0(w0, u):
    """The next table on the free list after freed page table ``u`` (-1: none), kept +1
    in its first four words by ``_free_l0``."""
    base = u * N1
    return (np.int64(w0[base]) | (np.int64(w0[base + 1]) << 16)
            | (np.int64(w0[base + 2]) << 32) | (np.int64(w0[base + 3]) << 48)) - 1


def _new_l0(w0, meta, w):
    u = meta[M_FREE0]
    base = 0
    if u >= 0:
        base = u * N1
        meta[M_FREE0] = _free_link0(w0, u)
        meta[M_NFREE0] -= 1
    else:
        u = meta[M_USED0]
        meta[M_USED0] = u + 1
        base = u * N1
    for q in range(N1):
        w0[base + q] = w
    return u


def _free_l0(w0, meta, u):
    base = u * N1
    v = meta[M_FREE0] + 1   # stored +1 so that "none" (-1) packs as 0
    w0[base] = v & 0xFFFF
    w0[base + 1] = (v >> XW_SHIFT) & 0xFFFF
    w0[base + 2] = (v >> 32) & 0xFFFF
    w0[base + 3] = (v >> 48) & 0xFFFF
    meta[M_FREE0] = u
    meta[M_NFREE0] += 1


def free_tables(meta):
    """Free tables of (level 1, level 0) available without growing the pools."""
    return (meta[M_CAP1] - meta[M_USED1] + meta[M_NFREE1],
            meta[M_CAP0] - meta[M_USED0] + meta[M_NFREE0])


# ======================================================================================
# counts, exceptions and folding
#
# Counts are stored only for entries with a child table or exceptions; a uniform entry's
# counts follow from its word (all or nothing), so changing a uniform entry is one write.
# A 2 MiB entry with no page table may list up to NX pages whose words differ from its
# own (``F_X0...``: page index | word << 16): a few scattered 4 KiB conversions in a
# block then cost no page table. A fifth exception turns the entry into a page table.
# ======================================================================================

def cnt2(n2, i, k):
    """Pages of 1 GiB entry ``i`` with counted bit ``k`` set."""
    if n2[i, F_CHILD] < 0:
        return N2 if (n2[i, F_WORD] >> k) & 1 else 0
    return n2[i, F_CNT + k]


def cnt1(n1, e, k):
    """Pages of 2 MiB entry ``e`` with counted bit ``k`` set."""
    if n1[e, F_CHILD] < 0 and n1[e, F_NX] == 0:
        return N1 if (n1[e, F_WORD] >> k) & 1 else 0
    return _get_cnt1(n1, e, k)


def _get_cnt1(n1, e, k):
    """Stored count ``k`` of 2 MiB entry ``e`` (valid with a page table or exceptions)."""
    return (np.int64(n1[e, F_CNT + (k >> 1)]) >> ((k & 1) << 4)) & CNT_MASK


def _add_cnt1(n1, e, k, d):
    """Add ``d`` to stored count ``k`` of 2 MiB entry ``e``."""
    n1[e, F_CNT + (k >> 1)] += np.int64(d) << ((k & 1) << 4)


def _xword(n1, e, q):
    """Word of page ``q`` of 2 MiB entry ``e`` (no page table)."""
    w = n1[e, F_WORD]
    for x in range(n1[e, F_NX]):
        v = n1[e, F_X0 + x]
        if (v & XQ_MASK) == q:
            return (v >> XW_SHIFT) | (w & ORDER_MASK)
    return w


def _split_l2(n2, n1, meta, i):
    """Give uniform 1 GiB entry ``i`` a table of 512 uniform entries."""
    w = n2[i, F_WORD]
    t = _new_l1(n1, meta, w)
    n2[i, F_CHILD] = t
    for k in range(NCOUNTED):
        n2[i, F_CNT + k] = N2 if (w >> k) & 1 else 0
    return t


def _init_cnt1(n1, e):
    w = n1[e, F_WORD]
    for j in range(NCOUNTED >> 1):
        lo = N1 if (w >> (2 * j)) & 1 else 0
        hi = N1 if (w >> (2 * j + 1)) & 1 else 0
        n1[e, F_CNT + j] = lo | (hi << 16)


def _split_l1(n1, w0, meta, e):
    """Give 2 MiB entry ``e`` (uniform, maybe with exceptions) a table of page words."""
    w = n1[e, F_WORD]
    u = _new_l0(w0, meta, w & ~ORDER_MASK)
    nx = n1[e, F_NX]
    if nx == 0:
        _init_cnt1(n1, e)
    base = u * N1
    for x in range(nx):
        v = n1[e, F_X0 + x]
        w0[base + (v & XQ_MASK)] = v >> XW_SHIFT
    n1[e, F_NX] = 0
    n1[e, F_CHILD] = u
    return u


def _add_cnt(n2, n1, meta, i, e, w, nw):
    """Count page word ``w`` becoming ``nw`` in entries ``e`` (2 MiB) and ``i`` (1 GiB)."""
    diff = (w ^ nw) & COUNTED_MASK
    if diff:
        for k in range(NCOUNTED):
            if (diff >> k) & 1:
                d = 1 if (nw >> k) & 1 else -1
                _add_cnt1(n1, e, k, d)
                n2[i, F_CNT + k] += d
                meta[M_GCNT + k] += d


def _set_xpage(n2, n1, w0, meta, i, e, q, nw):
    """Set page ``q`` of 2 MiB entry ``e`` (no page table) to ``nw``, as an exception
    if it fits. Returns False when the entry needs a page table instead (untouched).
    ``nw`` keeps the block's folio order (its ``ORDER_MASK`` bits are the entry's)."""
    w = n1[e, F_WORD]
    ob = w & ORDER_MASK
    nws = nw & ~ORDER_MASK
    nx = n1[e, F_NX]
    for x in range(nx):
        v = n1[e, F_X0 + x]
        if (v & XQ_MASK) == q:
            old = v >> XW_SHIFT
            if old == nws:
                return True
            _add_cnt(n2, n1, meta, i, e, old | ob, nw)
            if nw == w:
                n1[e, F_X0 + x] = n1[e, F_X0 + nx - 1]
                n1[e, F_NX] = nx - 1
            else:
                n1[e, F_X0 + x] = q | (nws << XW_SHIFT)
            return True
    if nw == w:
        return True
    if nx == NX:
        return False
    if nx == 0:
        _init_cnt1(n1, e)
    _add_cnt(n2, n1, meta, i, e, w, nw)
    n1[e, F_X0 + nx] = q | (nws << XW_SHIFT)
    n1[e, F_NX] = nx + 1
    return True


def _xapply_whole(n2, n1, meta, i, e, cmask, cval, clr, setb):
    """Apply a transform to every page of 2 MiB entry ``e`` (no page table, with
    exceptions) without a page table. Returns pages changed."""
    w = n1[e, F_WORD]
    ob = w & ORDER_MASK
    nx = n1[e, F_NX]
    nw = (w & ~clr) | setb if (w & cmask) == cval else w
    changed = 0
    if nw != w:
        changed = N1 - nx
        # the base word's pages: count their change
        diff = (w ^ nw) & COUNTED_MASK
        for k in range(NCOUNTED):
            if (diff >> k) & 1:
                d = (N1 - nx) if (nw >> k) & 1 else -(N1 - nx)
                _add_cnt1(n1, e, k, d)
                n2[i, F_CNT + k] += d
                meta[M_GCNT + k] += d
    n1[e, F_WORD] = nw
    keep = 0
    for x in range(nx):
        v = n1[e, F_X0 + x]
        xw = (v >> XW_SHIFT) | ob
        nxw = (xw & ~clr) | setb if (xw & cmask) == cval else xw
        if nxw != xw:
            changed += 1
            _add_cnt(n2, n1, meta, i, e, xw, nxw)
        if nxw != nw:
            n1[e, F_X0 + keep] = (v & XQ_MASK) | ((nxw & ~ORDER_MASK) << XW_SHIFT)
            keep += 1
    n1[e, F_NX] = keep
    return changed


def _fold_l0(n1, w0, meta, e):
    """Fold entry ``e``'s page table into the entry if all its pages are equal."""
    u = n1[e, F_CHILD]
    if u < 0:
        return
    for k in range(NCOUNTED):
        c = _get_cnt1(n1, e, k)
        if c != 0 and c != N1:
            return
    base = u * N1
    w = w0[base]
    for q in range(1, N1):
        if w0[base + q] != w:
            return
    n1[e, F_WORD] = np.int64(w) | (n1[e, F_WORD] & ORDER_MASK)
    n1[e, F_CHILD] = -1
    _free_l0(w0, meta, u)


def _fold_l1(n2, n1, meta, i):
    """Fold 1 GiB entry ``i``'s table into the entry if all its entries are equal."""
    t = n2[i, F_CHILD]
    if t < 0:
        return
    for k in range(NCOUNTED):
        c = n2[i, F_CNT + k]
        if c != 0 and c != N2:
            return
    base = t * N1
    w = n1[base, F_WORD]
    for j in range(N1):
        r = base + j
        if (n1[r, F_CHILD] >= 0 or n1[r, F_NX] != 0 or n1[r, F_WORD] != w
                or n1[r, F_DSPLIT] != 0):
            return
    n2[i, F_WORD] = w
    n2[i, F_CHILD] = -1
    _free_l1(n1, meta, t)


# ======================================================================================
# walks: read and transform page ranges
# ======================================================================================

def get_word(n2, n1, w0, p):
    i = p >> S2
    t = n2[i, F_CHILD]
    if t < 0:
        return n2[i, F_WORD]
    e = t * N1 + ((p >> S1) & (N1 - 1))
    u = n1[e, F_CHILD]
    if u < 0:
        if n1[e, F_NX]:
            return _xword(n1, e, p & (N1 - 1))
        return n1[e, F_WORD]
    return np.int64(w0[u * N1 + (p & (N1 - 1))]) | (n1[e, F_WORD] & ORDER_MASK)


def set_word(n2, n1, w0, meta, p, nw):
    """Set page ``p``'s word to ``nw`` (a one-page ``walk_apply``, without the walk). A
    folio order is a 2 MiB block's: new ``ORDER_MASK`` bits in ``nw`` are given to every
    page of the block (the conversions never change them here)."""
    i = p >> S2
    t = n2[i, F_CHILD]
    if t < 0:
        if n2[i, F_WORD] == nw:
            return
        t = _split_l2(n2, n1, meta, i)
    e = t * N1 + ((p >> S1) & (N1 - 1))
    q = p & (N1 - 1)
    ob = n1[e, F_WORD] & ORDER_MASK
    if (nw & ORDER_MASK) != ob:
        n1[e, F_WORD] = (n1[e, F_WORD] & ~ORDER_MASK) | (nw & ORDER_MASK)
        if (nw ^ ob) & HUGE:
            d = N1 if nw & HUGE else -N1
            if n1[e, F_CHILD] >= 0 or n1[e, F_NX]:
                _add_cnt1(n1, e, K_HUGE, d)
            n2[i, F_CNT + K_HUGE] += d
            meta[M_GCNT + K_HUGE] += d
    u = n1[e, F_CHILD]
    if u < 0:
        if _set_xpage(n2, n1, w0, meta, i, e, q, nw):
            _fold_l1(n2, n1, meta, i)
            return
        u = _split_l1(n1, w0, meta, e)
    r = u * N1 + q
    w = np.int64(w0[r]) | (n1[e, F_WORD] & ORDER_MASK)
    if w == nw:
        return
    w0[r] = nw & ~ORDER_MASK
    _add_cnt(n2, n1, meta, i, e, w, nw)
    _fold_l0(n1, w0, meta, e)
    _fold_l1(n2, n1, meta, i)


def get_words(n2, n1, w0, p0, p1, out):
    """Fill ``out[0:p1-p0]`` with the page words of ``[p0, p1)``."""
    p = p0
    while p < p1:
        i = p >> S2
        t = n2[i, F_CHILD]
        if t < 0:
            hi = min(p1, (i + 1) << S2)
            out[p - p0:hi - p0] = n2[i, F_WORD]
            p = hi
            continue
        c0 = (p >> S1) << S1
        e = t * N1 + ((p >> S1) & (N1 - 1))
        hi = min(p1, c0 + N1)
        u = n1[e, F_CHILD]
        ob = n1[e, F_WORD] & ORDER_MASK
        if u < 0:
            out[p - p0:hi - p0] = n1[e, F_WORD]
            for x in range(n1[e, F_NX]):
                v = n1[e, F_X0 + x]
                pg = c0 + (v & XQ_MASK)
                if p <= pg < hi:
                    out[pg - p0] = (v >> XW_SHIFT) | ob
        else:
            b = u * N1 + (p & (N1 - 1))
            for q in range(hi - p):
                out[p - p0 + q] = np.int64(w0[b + q]) | ob
        p = hi


def _single_bit(cmask):
    """Index k if ``cmask`` is exactly one counted bit, else -1."""
    for k in range(NCOUNTED):
        if cmask == (1 << k):
            return k
    return -1


def _match1(n1, e, cmask, cval):
    """Whether every page (1), no page (0) of 2 MiB entry ``e`` (with counts) satisfies
    ``w & cmask == cval``, as its counts and folio order show; -1 if they cannot tell."""
    if cmask & ~(COUNTED_MASK | ORDER_MASK):
        return -1
    rep = n1[e, F_WORD] & ORDER_MASK
    for k in range(NCOUNTED):
        if (cmask >> k) & 1:
            c = _get_cnt1(n1, e, k)
            if c == N1:
                rep |= np.int64(1) << k
            elif c != 0:
                return -1
    return 1 if (rep & cmask) == cval else 0


def _match2(n2, i, cmask, cval):
    """``_match1`` for 1 GiB entry ``i`` (with a table), on counted bits only."""
    if cmask & ~COUNTED_MASK:
        return -1
    rep = 0
    for k in range(NCOUNTED):
        if (cmask >> k) & 1:
            c = n2[i, F_CNT + k]
            if c == N2:
                rep |= np.int64(1) << k
            elif c != 0:
                return -1
    return 1 if (rep & cmask) == cval else 0


def _xcount(n1, e, c0, clo, chi, cmask, cval):
    """Pages of ``[clo, chi)`` in 2 MiB entry ``e`` (no page table) matching."""
    inside = 0
    hits = 0
    ob = n1[e, F_WORD] & ORDER_MASK
    for x in range(n1[e, F_NX]):
        v = n1[e, F_X0 + x]
        pg = c0 + (v & XQ_MASK)
        if clo <= pg < chi:
            inside += 1
            if (((v >> XW_SHIFT) | ob) & cmask) == cval:
                hits += 1
    if (n1[e, F_WORD] & cmask) == cval:
        hits += chi - clo - inside
    return hits


def walk_count(n2, n1, w0, p0, p1, cmask, cval):
    """Number of pages in ``[p0, p1)`` whose word satisfies ``w & cmask == cval``."""
    k = _single_bit(cmask)
    total = 0
    for i in range(p0 >> S2, ((p1 - 1) >> S2) + 1):
        b0 = i << S2
        lo = max(p0, b0)
        hi = min(p1, b0 + N2)
        t = n2[i, F_CHILD]
        if t < 0:
            if (n2[i, F_WORD] & cmask) == cval:
                total += hi - lo
            continue
        if k >= 0 and lo == b0 and hi == b0 + N2:
            c = n2[i, F_CNT + k]
            total += c if cval != 0 else N2 - c
            continue
        m = _match2(n2, i, cmask, cval)
        if m >= 0:
            total += (hi - lo) * m
            continue
        for j in range((lo - b0) >> S1, ((hi - 1 - b0) >> S1) + 1):
            e = t * N1 + j
            c0 = b0 + (j << S1)
            clo = max(lo, c0)
            chi = min(hi, c0 + N1)
            u = n1[e, F_CHILD]
            if u < 0 and n1[e, F_NX] == 0:
                if (n1[e, F_WORD] & cmask) == cval:
                    total += chi - clo
                continue
            if k >= 0 and clo == c0 and chi == c0 + N1:
                c = _get_cnt1(n1, e, k)
                total += c if cval != 0 else N1 - c
                continue
            m = _match1(n1, e, cmask, cval)
            if m >= 0:
                total += (chi - clo) * m
                continue
            if u < 0:
                total += _xcount(n1, e, c0, clo, chi, cmask, cval)
                continue
            ob = n1[e, F_WORD] & ORDER_MASK
            if (ob & cmask) != (cval & ORDER_MASK):
                continue
            cm = cmask & ~ORDER_MASK
            cv = cval & ~ORDER_MASK
            base = u * N1 - c0
            for p in range(clo, chi):
                if (w0[base + p] & cm) == cv:
                    total += 1
    return total


def walk_first(n2, n1, w0, p0, p1, cmask, cval):
    """First page in ``[p0, p1)`` with ``w & cmask == cval``, or -1."""
    for i in range(p0 >> S2, ((p1 - 1) >> S2) + 1):
        b0 = i << S2
        lo = max(p0, b0)
        hi = min(p1, b0 + N2)
        t = n2[i, F_CHILD]
        if t < 0:
            if (n2[i, F_WORD] & cmask) == cval:
                return lo
            continue
        m = _match2(n2, i, cmask, cval)
        if m == 0:
            continue
        if m == 1:
            return lo
        for j in range((lo - b0) >> S1, ((hi - 1 - b0) >> S1) + 1):
            e = t * N1 + j
            c0 = b0 + (j << S1)
            clo = max(lo, c0)
            chi = min(hi, c0 + N1)
            u = n1[e, F_CHILD]
            if u < 0 and n1[e, F_NX] == 0:
                if (n1[e, F_WORD] & cmask) == cval:
                    return clo
                continue
            m = _match1(n1, e, cmask, cval)
            if m == 0:
                continue
            if m == 1:
                return clo
            if u < 0:
                for p in range(clo, chi):
                    if (_xword(n1, e, p - c0) & cmask) == cval:
                        return p
                continue
            ob = n1[e, F_WORD] & ORDER_MASK
            if (ob & cmask) != (cval & ORDER_MASK):
                continue
            cm = cmask & ~ORDER_MASK
            cv = cval & ~ORDER_MASK
            base = u * N1 - c0
            for p in range(clo, chi):
                if (w0[base + p] & cm) == cv:
                    return p
    return -1


def _order_l2(n2, n1, meta, i, clr, setb):
    """A new folio order (``ORDER_MASK`` bits only) for every page of 1 GiB entry ``i``
    (with a table): one write per 2 MiB entry, whatever its pages hold. Returns the
    pages changed."""
    t = n2[i, F_CHILD]
    changed = 0
    dh = 0
    for e in range(t * N1, (t + 1) * N1):
        w = n1[e, F_WORD]
        ob = w & ORDER_MASK
        nob = (ob & ~clr) | setb
        if nob == ob:
            continue
        n1[e, F_WORD] = (w & ~ORDER_MASK) | nob
        changed += N1
        if (ob ^ nob) & HUGE:
            d = N1 if nob & HUGE else -N1
            dh += d
            if n1[e, F_CHILD] >= 0 or n1[e, F_NX]:
                _add_cnt1(n1, e, K_HUGE, d)
    n2[i, F_CNT + K_HUGE] += dh
    meta[M_GCNT + K_HUGE] += dh
    return changed


def walk_apply(n2, n1, w0, meta, p0, p1, cmask, cval, clr, setb):
    """For pages of ``[p0, p1)`` with ``w & cmask == cval``: ``w = (w & ~clr) | setb``.

    Returns the number of pages whose word changed. Keeps every count and folds tables
    that become uniform. Creates at most two tables of each level (at the range's ends).
    A change of folio order (``ORDER_MASK`` bits) must be the same for every page of each
    2 MiB block it touches: the order is kept per 2 MiB entry, so changing it costs one
    write per block whatever the pages below hold. A few pages of a uniform 2 MiB block
    (up to ``NX``) become exceptions of its entry rather than a page table.
    """
    changed = 0
    for i in range(p0 >> S2, ((p1 - 1) >> S2) + 1):
        b0 = i << S2
        lo = max(p0, b0)
        hi = min(p1, b0 + N2)
        t = n2[i, F_CHILD]
        if t < 0:
            w = n2[i, F_WORD]
            if (w & cmask) != cval:
                continue
            nw = (w & ~clr) | setb
            if nw == w:
                continue
            if lo == b0 and hi == b0 + N2:
                diff = (w ^ nw) & COUNTED_MASK
                for k in range(NCOUNTED):
                    if (diff >> k) & 1:
                        meta[M_GCNT + k] += N2 if (nw >> k) & 1 else -N2
                n2[i, F_WORD] = nw
                changed += N2
                continue
            t = _split_l2(n2, n1, meta, i)
        else:
            m = _match2(n2, i, cmask, cval)
            if m == 0:
                continue
            if m == 1 and lo == b0 and hi == b0 + N2 and ((clr | setb) & ~ORDER_MASK) == 0:
                ch = _order_l2(n2, n1, meta, i, clr, setb)
                if ch:
                    changed += ch
                    _fold_l1(n2, n1, meta, i)
                continue
        touched = False
        order_only = ((clr | setb) & ~ORDER_MASK) == 0
        for j in range((lo - b0) >> S1, ((hi - 1 - b0) >> S1) + 1):
            e = t * N1 + j
            c0 = b0 + (j << S1)
            clo = max(lo, c0)
            chi = min(hi, c0 + N1)
            whole = clo == c0 and chi == c0 + N1
            u = n1[e, F_CHILD]
            if u < 0:
                w = n1[e, F_WORD]
                if n1[e, F_NX]:
                    if whole:
                        ch = _xapply_whole(n2, n1, meta, i, e, cmask, cval, clr, setb)
                        if ch:
                            touched = True
                            changed += ch
                        continue
                    if chi - clo <= NX:
                        # page by page, as exceptions while they fit
                        fits = True
                        for p in range(clo, chi):
                            xw = _xword(n1, e, p - c0)
                            if (xw & cmask) != cval:
                                continue
                            nxw = (xw & ~clr) | setb
                            if nxw == xw:
                                continue
                            if not _set_xpage(n2, n1, w0, meta, i, e, p - c0, nxw):
                                fits = False
                                break
                            touched = True
                            changed += 1
                        if fits:
                            continue
                    # the rest through a page table (pages already done match no more,
                    # or change no more: the transform is idempotent)
                    u = _split_l1(n1, w0, meta, e)
                else:
                    if (w & cmask) != cval:
                        continue
                    nw = (w & ~clr) | setb
                    if nw == w:
                        continue
                    touched = True
                    if whole:
                        diff = (w ^ nw) & COUNTED_MASK
                        for k in range(NCOUNTED):
                            if (diff >> k) & 1:
                                d = N1 if (nw >> k) & 1 else -N1
                                n2[i, F_CNT + k] += d
                                meta[M_GCNT + k] += d
                        n1[e, F_WORD] = nw
                        changed += N1
                        continue
                    if chi - clo <= NX:
                        _init_cnt1(n1, e)
                        nws = nw & ~ORDER_MASK
                        for p in range(clo, chi):
                            _add_cnt(n2, n1, meta, i, e, w, nw)
                            n1[e, F_X0 + p - clo] = (p - c0) | (nws << XW_SHIFT)
                        n1[e, F_NX] = chi - clo
                        changed += chi - clo
                        continue
                    u = _split_l1(n1, w0, meta, e)
            ob = n1[e, F_WORD] & ORDER_MASK
            m = _match1(n1, e, cmask, cval)
            if m == 0:
                continue
            if whole:
                if m == 1 and order_only:
                    # a new folio order for the whole block: the entry's bits alone
                    nob = (ob & ~clr) | setb
                    if nob != ob:
                        n1[e, F_WORD] = (n1[e, F_WORD] & ~ORDER_MASK) | nob
                        if (ob ^ nob) & HUGE:
                            d = N1 if nob & HUGE else -N1
                            _add_cnt1(n1, e, K_HUGE, d)
                            n2[i, F_CNT + K_HUGE] += d
                            meta[M_GCNT + K_HUGE] += d
                        touched = True
                        changed += N1
                    continue
            base = u * N1 - c0
            n_here = 0
            nob = ob
            for p in range(clo, chi):
                w = np.int64(w0[base + p]) | ob
                if (w & cmask) != cval:
                    continue
                nw = (w & ~clr) | setb
                if nw == w:
                    continue
                w0[base + p] = nw & ~ORDER_MASK
                nob = nw & ORDER_MASK
                n_here += 1
                _add_cnt(n2, n1, meta, i, e, w, nw)
            if n_here:
                if nob != ob:
                    n1[e, F_WORD] = (n1[e, F_WORD] & ~ORDER_MASK) | nob
                touched = True
                changed += n_here
                _fold_l0(n1, w0, meta, e)
        if touched:
            _fold_l1(n2, n1, meta, i)
    return changed


def walk_transitions(n2, n1, w0, p0, p1, bit):
    """Number of ``p`` in ``(p0, p1)`` where ``bit`` (a counted bit) differs between page
    p-1 and p. Blocks whose counts show the bit uniform cost one step."""
    k = _single_bit(bit)
    total = 0
    prev = -1
    for i in range(p0 >> S2, ((p1 - 1) >> S2) + 1):
        b0 = i << S2
        lo = max(p0, b0)
        hi = min(p1, b0 + N2)
        t = n2[i, F_CHILD]
        v = -1
        if t < 0:
            v = 1 if n2[i, F_WORD] & bit else 0
        elif n2[i, F_CNT + k] == 0 or n2[i, F_CNT + k] == N2:
            v = 1 if n2[i, F_CNT + k] else 0
        if v >= 0:
            if prev >= 0 and v != prev:
                total += 1
            prev = v
            continue
        for j in range((lo - b0) >> S1, ((hi - 1 - b0) >> S1) + 1):
            e = t * N1 + j
            c0 = b0 + (j << S1)
            clo = max(lo, c0)
            chi = min(hi, c0 + N1)
            u = n1[e, F_CHILD]
            c = cnt1(n1, e, k)
            if c == 0 or c == N1:
                v = 1 if c else 0
                if prev >= 0 and v != prev:
                    total += 1
                prev = v
                continue
            for p in range(clo, chi):
                if u < 0:
                    w = _xword(n1, e, p - c0)
                else:
                    w = np.int64(w0[u * N1 + p - c0])
                v = 1 if w & bit else 0
                if prev >= 0 and v != prev:
                    total += 1
                prev = v
    return total


def gcount(meta, k):
    """Pages of the file with counted bit ``k`` set."""
    c = meta[M_GCNT + k]
    if (meta[M_INITW] >> k) & 1:
        c -= meta[M_TAIL]
    return c


# ======================================================================================
# mechanisms: TLB, direct map, folios
# ======================================================================================

def _tlb_flush(meta, npages):
    if npages <= 0:
        return
    if npages <= TLB_CEILING:
        meta[C_TLB_INVLPG] += npages
    else:
        meta[C_TLB_FLUSH_FULL] += 1
    meta[C_TLB_SHOOTDOWNS] += 1


def zap_host(n2, n1, w0, meta, p0, p1):
    """Unmap the host userspace mappings of ``[p0, p1)`` (every process)."""
    if gcount(meta, K_HMAP) == 0:
        return 0
    z = walk_apply(n2, n1, w0, meta, p0, p1, HMAP, HMAP, HMAP, I0)
    meta[C_HOST_PTES_ZAPPED] += z
    _tlb_flush(meta, z)
    return z


def zap_guest(n2, n1, w0, meta, p0, p1):
    """Invalidate the guest (stage-2) mappings of ``[p0, p1)``."""
    meta[C_GUEST_INVALIDATIONS] += 1
    if gcount(meta, K_GMAP) == 0:
        return 0
    z = walk_apply(n2, n1, w0, meta, p0, p1, GMAP, GMAP, GMAP, I0)
    meta[C_GUEST_PTES_ZAPPED] += z
    return z


def dmap_change(n2, n1, w0, meta, p0, p1, cmask, cval, remove):
    """Remove (or restore) the pages of ``[p0, p1)`` matching the condition from the
    kernel direct map.

    The kernel changes the direct map a folio at a time, so an entry survives only when
    one folio covers it wholly: a 1 GiB entry when a whole 1 GiB folio changes, a 2 MiB
    entry when a whole 2 MiB (or 1 GiB) folio does; any other change breaks the entries
    it touches into the next size down, for good.
    """
    total = 0
    entries = 0
    for i in range(p0 >> S2, ((p1 - 1) >> S2) + 1):
        b0 = i << S2
        lo = max(p0, b0)
        hi = min(p1, b0 + N2)
        m = walk_count(n2, n1, w0, lo, hi, cmask, cval)
        if m == 0:
            continue
        total += m
        if (m == N2 and n2[i, F_DSPLIT] == 0 and meta[M_ORDER] == S2
                and cnt2(n2, i, K_HUGE) == N2):
            entries += 1
        else:
            if n2[i, F_DSPLIT] == 0:
                n2[i, F_DSPLIT] = 1
                meta[C_DMAP_SPLITS_1G] += 1
                meta[M_DSPLIT1] += 1
                meta[M_DSPLIT1_2M] += min(N1, (meta[M_NPAGES] - b0 + N1 - 1) >> S1)
            for j in range((lo - b0) >> S1, ((hi - 1 - b0) >> S1) + 1):
                c0 = b0 + (j << S1)
                clo = max(lo, c0)
                chi = min(hi, c0 + N1)
                m2 = walk_count(n2, n1, w0, clo, chi, cmask, cval)
                if m2 == 0:
                    continue
                t = n2[i, F_CHILD]
                split = 0
                if t >= 0:
                    split = n1[t * N1 + j, F_DSPLIT]
                if (m2 == N1 and split == 0
                        and walk_count(n2, n1, w0, clo, chi, HUGE, HUGE) == N1):
                    entries += 1
                    continue
                if split == 0:
                    if t < 0:
                        t = _split_l2(n2, n1, meta, i)
                    n1[t * N1 + j, F_DSPLIT] = 1
                    meta[C_DMAP_SPLITS_2M] += 1
                    meta[M_DSPLIT2] += 1
                entries += m2
        bit = DMAP_OFF if remove else 0
        walk_apply(n2, n1, w0, meta, lo, hi, cmask, cval, DMAP_OFF - bit, bit)
    if total:
        meta[C_DMAP_ENTRIES_CHANGED] += entries
        _tlb_flush(meta, total)
    return total


def _vmemmap_per_folio(order):
    return HVO_FREED_2M if order == S1 else HVO_FREED_1G


def _count_split(meta, nfolios):
    if nfolios <= 0:
        return
    order = meta[M_ORDER]
    if order == S1:
        meta[C_FOLIO_SPLITS_2M] += nfolios
    else:
        meta[C_FOLIO_SPLITS_1G] += nfolios
    if meta[M_HUGETLB]:
        meta[C_VMEMMAP_PAGES_RESTORED] += nfolios * _vmemmap_per_folio(order)


def split_folios(n2, n1, w0, meta, p0, p1):
    """Split to order 0 every huge folio touching ``[p0, p1)``. Returns folios split."""
    order = meta[M_ORDER]
    if order == 0 or gcount(meta, K_HUGE) == 0:
        return 0
    bmask = (np.int64(1) << order) - 1
    q0 = p0 & ~bmask
    q1 = (p1 + bmask) & ~bmask
    ch = 0
    for i in range(q0 >> S2, ((q1 - 1) >> S2) + 1):
        # blocks holding no huge folio (by their counts) are skipped without a walk
        if cnt2(n2, i, K_HUGE) == 0:
            continue
        b0 = i << S2
        lo = max(q0, b0)
        hi = min(q1, b0 + N2)
        whole = n2[i, F_CHILD] < 0 or order == S2
        c0 = lo
        while c0 < hi:
            c1 = hi if whole else c0 + N1
            t = n2[i, F_CHILD]
            # 2 MiB blocks whose counts show no huge folio are skipped too
            if whole or t < 0 or cnt1(n1, t * N1 + ((c0 - b0) >> S1), K_HUGE):
                ch += walk_apply(n2, n1, w0, meta, c0, c1, HUGE, HUGE, ORDER_MASK, I0)
            c0 = c1
    nf = ch >> order
    _count_split(meta, nf)
    return nf


def _order_bits(order):
    if order == S1:
        return HUGE
    if order == S2:
        return HUGE | GIG
    return 0


def _mergeable(cnt_alloc, cnt_priv, cnt_pin, cnt_huge, n):
    return cnt_alloc == n and cnt_priv == n and cnt_pin == 0 and cnt_huge == 0


def merge_folios(n2, n1, w0, meta, p0, p1):
    """Merge back to the backing order every huge block touching ``[p0, p1)`` that is
    wholly private, wholly allocated and holds no extra references."""
    order = meta[M_ORDER]
    if order == 0 or meta[M_MERGE] == 0:
        return 0
    ob = _order_bits(order)
    merged = 0
    for i in range(p0 >> S2, ((p1 - 1) >> S2) + 1):
        b0 = i << S2
        # 2 MiB blocks [j, j1) of this 1 GiB block that touch the range (the whole block
        # for 1 GiB folios)
        j = 0 if order == S2 else (max(p0, b0) - b0) >> S1
        j1 = N1 if order == S2 else ((min(p1, b0 + N2) - 1 - b0) >> S1) + 1
        while j < j1:
            t = n2[i, F_CHILD]
            if t < 0:
                # uniform (maybe folded by a merge of the previous block): all or none
                w = n2[i, F_WORD]
                if (w & (ALLOC | PRIV | PIN | HUGE)) != (ALLOC | PRIV):
                    break
                a = j
                j = j1
            elif order == S2:
                if not _mergeable(n2[i, F_CNT + K_ALLOC], n2[i, F_CNT + K_PRIV], n2[i, F_CNT + K_PIN],
                                  n2[i, F_CNT + K_HUGE], N2):
                    break
                a = 0
                j = N1
            else:
                e = t * N1 + j
                a = j
                j += 1
                if not _mergeable(cnt1(n1, e, K_ALLOC), cnt1(n1, e, K_PRIV), cnt1(n1, e, K_PIN), cnt1(n1, e, K_HUGE), N1):
                    continue
            walk_apply(n2, n1, w0, meta, b0 + (a << S1), b0 + (j << S1), I0, I0, I0, ob)
            merged += 1 if order == S2 else j - a
    if merged:
        if order == S1:
            meta[C_FOLIO_MERGES_2M] += merged
        else:
            meta[C_FOLIO_MERGES_1G] += merged
        if meta[M_HUGETLB]:
            meta[C_VMEMMAP_PAGES_FREED] += merged * _vmemmap_per_folio(order)
    return merged


def _count_zero(meta, npages, order):
    if npages <= 0:
        return
    meta[C_PAGES_ZEROED] += npages
    if order == S2:
        meta[C_BYTES_ZEROED_1G] += npages * PAGE_BYTES
    elif order == S1:
        meta[C_BYTES_ZEROED_2M] += npages * PAGE_BYTES
    else:
        meta[C_BYTES_ZEROED_4K] += npages * PAGE_BYTES


def _alloc_block(n2, n1, w0, meta, q0, q1, holes, npriv, order):
    """Allocate the holes of one aligned block ``[q0, q1)`` of the backing order."""
    if holes == 0:
        return
    n = q1 - q0
    setb = ALLOC
    if holes == n:
        if npriv == n:
            setb = ALLOC | _order_bits(order)
        else:
            # allocated huge, split at once: a huge folio may not hold shared pages
            _count_split(meta, I1)
        _count_zero(meta, n, order)
    else:
        _count_zero(meta, holes, I0)
    walk_apply(n2, n1, w0, meta, q0, q1, ALLOC, I0, I0, setb)
    meta[C_PAGES_ALLOCATED] += holes


def allocate(n2, n1, w0, meta, p0, p1):
    """Allocate every hole of ``[p0, p1)`` widened to whole blocks of the backing order.

    Returns the number of pages allocated.
    """
    order = meta[M_ORDER]
    before = meta[C_PAGES_ALLOCATED]
    if order == 0:
        ch = walk_apply(n2, n1, w0, meta, p0, p1, ALLOC, I0, I0, ALLOC)
        meta[C_PAGES_ALLOCATED] += ch
        _count_zero(meta, ch, I0)
    else:
        bmask = (np.int64(1) << order) - 1
        q0 = p0 & ~bmask
        q1 = (p1 + bmask) & ~bmask
        for i in range(q0 >> S2, ((q1 - 1) >> S2) + 1):
            b0 = i << S2
            if order == S2:
                _alloc_block(n2, n1, w0, meta, b0, b0 + N2, N2 - cnt2(n2, i, K_ALLOC),
                             cnt2(n2, i, K_PRIV), S2)
                continue
            lo = max(q0, b0)
            hi = min(q1, b0 + N2)
            if n2[i, F_CHILD] < 0:
                w = n2[i, F_WORD]
                if w & ALLOC:
                    continue
                walk_apply(n2, n1, w0, meta, lo, hi, I0, I0, I0, ALLOC | (HUGE if w & PRIV else 0))
                if not w & PRIV:
                    _count_split(meta, (hi - lo) >> S1)
                _count_zero(meta, hi - lo, S1)
                meta[C_PAGES_ALLOCATED] += hi - lo
                continue
            for c0 in range(lo, hi, N1):
                t = n2[i, F_CHILD]
                if t < 0:
                    w = n2[i, F_WORD]
                    holes = 0 if w & ALLOC else N1
                    npriv = N1 if w & PRIV else 0
                else:
                    e = t * N1 + ((c0 - b0) >> S1)
                    holes = N1 - cnt1(n1, e, K_ALLOC)
                    npriv = cnt1(n1, e, K_PRIV)
                if holes:
                    _alloc_block(n2, n1, w0, meta, c0, c0 + N1, holes, npriv, S1)
        p0 = q0
        p1 = q1
    done = meta[C_PAGES_ALLOCATED] - before
    if done:
        pol = meta[M_DMAP]
        if pol != DMAP_KEEP:
            # no-direct-map: every new page leaves it; on-conversion: the private ones
            priv = PRIV if pol == DMAP_ONCONV else 0
            dmap_change(n2, n1, w0, meta, p0, p1, ALLOC | priv | DMAP_OFF, ALLOC | priv, YES)
    return done


def accept(n2, n1, w0, meta, p0, p1, chunk_pages, te_state, map_pages, prefault):
    """The guest accepts (TDX) or validates (SNP) the private pages of ``[p0, p1)`` in
    chunks of ``chunk_pages`` (1 or 512): each page (already allocated by the caller) is
    mapped in the guest and moved to trusted-entity state ``te_state``. Pages already
    accepted cost nothing. Returns the number of chunks that did work (rounded up).

    ``map_pages`` is the level at which the host maps private memory (1, 512 or 262144
    pages, already bounded by the caller; 0: at the chunk's level) and ``prefault`` says
    the VMM mapped it before the guest asked (KVM_PRE_FAULT_MEMORY). The work counted
    per case is docs/model.md §4.9."""
    n_new = walk_count(n2, n1, w0, p0, p1, TE_MASK, I0)
    if n_new == 0:
        return 0
    walk_apply(n2, n1, w0, meta, p0, p1, TE_MASK, I0, I0, (te_state << TE_SHIFT) | GMAP)
    return _count_accept(meta, n_new, chunk_pages, map_pages, prefault)


def _count_accept(meta, n_new, chunk_pages, map_pages, prefault):
    """The work of accepting ``n_new`` new pages (``accept``); returns the chunks."""
    chunks = (n_new + chunk_pages - 1) // chunk_pages
    vt = meta[M_VMTYPE]
    if vt != VM_TDX and vt != VM_SNP:
        meta[C_GUEST_EXITS] += chunks
        return chunks
    m = map_pages if map_pages > 0 else chunk_pages
    accepts_4k = chunk_pages == 1
    if m < chunk_pages:
        # a 2 MiB accept over 4 KiB host mappings is refused for the size mismatch and
        # the guest accepts the chunk's pages at 4 KiB, each mapped on its own
        meta[C_ACCEPT_FALLBACKS] += chunks
        n_acc = n_new
        maps = n_new
        exits = 0 if prefault else n_new
        accepts_4k = True
    elif m == chunk_pages or (vt == VM_TDX and not prefault):
        # mapped at the accept's level (TDX: the exit carries the accept level)
        n_acc = chunks
        maps = chunks
        exits = 0 if prefault else chunks
    else:
        # mapped larger than the accept, then split for it
        units = (n_new + m - 1) // m
        n_acc = chunks
        maps = units
        if vt == VM_TDX:
            # prefaulted huge: the smaller accept exits with its level and KVM splits
            # each entry with RANGE.BLOCK, TRACK and DEMOTE (1 GiB to 4 KiB: 1 + 512)
            splits = units * (1 + N1) if (m == N2 and chunk_pages == 1) else units
            meta[C_TDX_SEAMCALL_BLOCK] += splits
            meta[C_TDX_SEAMCALL_TRACK] += splits
            meta[C_TDX_SEAMCALL_DEMOTE] += splits
            exits = splits
        else:
            # SNP: the 2 MiB RMP entry faults the 4 KiB PVALIDATE and KVM PSMASHes it
            meta[C_PSMASH] += units
            exits = units if prefault else 2 * units
    meta[C_GUEST_EXITS] += exits
    if vt == VM_TDX:
        meta[C_TDX_SEAMCALL_PAGE_AUG] += maps
        meta[C_TDX_ACCEPTS] += n_acc
    else:
        meta[C_RMP_UPDATES] += maps
        if accepts_4k:
            meta[C_SNP_PVALIDATE_4K] += n_acc
        else:
            meta[C_SNP_PVALIDATE_2M] += n_acc
    return chunks


def _te_release(n2, n1, w0, meta, p0, p1):
    """The trusted entity gives pages of ``[p0, p1)`` back to the host: SNP RMP entries
    become hypervisor-owned (an RMPUPDATE each), TDX secure-EPT entries are removed (a
    BLOCK, a TRACK and a PAGE.REMOVE each)."""
    vt = meta[M_VMTYPE]
    if vt == VM_SW:
        return 0
    ch = walk_apply(n2, n1, w0, meta, p0, p1, I0, I0, TE_MASK, I0)
    if ch == 0:
        return 0
    if vt == VM_SNP:
        meta[C_RMP_UPDATES] += ch
    else:
        # tdx_sept_remove_private_spte(): BLOCK, TRACK and PAGE.REMOVE for each page
        meta[C_TDX_SEAMCALL_BLOCK] += ch
        meta[C_TDX_SEAMCALL_TRACK] += ch
        meta[C_TDX_SEAMCALL_PAGE_REMOVE] += ch
    return ch


def _te_split_cost(meta, nsplit_folios):
    """Breaking a huge folio's trusted-entity mapping: PSMASH per 2 MiB RMP entry on
    SNP, TDH.MEM.PAGE.DEMOTE per 2 MiB secure-EPT mapping on TDX."""
    if nsplit_folios <= 0:
        return
    n2m = nsplit_folios * (1 if meta[M_ORDER] == S1 else N1)
    if meta[M_VMTYPE] == VM_SNP:
        meta[C_PSMASH] += n2m
    elif meta[M_VMTYPE] == VM_TDX:
        meta[C_TDX_SEAMCALL_DEMOTE] += n2m


# ======================================================================================
# operations
# ======================================================================================

def attribute_ranges(n2, n1, w0, meta):
    """Maximal runs of equal shareability over the file (the per-file store's size)."""
    return 1 + walk_transitions(n2, n1, w0, I0, meta[M_NPAGES], PRIV)


def _ranges_after(n2, n1, w0, meta, p0, p1, v):
    npages = meta[M_NPAGES]
    lo = max(p0 - 1, 0)
    hi = min(p1 + 1, npages)
    before = walk_transitions(n2, n1, w0, lo, hi, PRIV)
    after = 0
    if p0 > 0:
        if (1 if get_word(n2, n1, w0, p0 - 1) & PRIV else 0) != v:
            after += 1
    if p1 < npages:
        if (1 if get_word(n2, n1, w0, p1) & PRIV else 0) != v:
            after += 1
    return attribute_ranges(n2, n1, w0, meta) + after - before


def _folios_checked(n2, n1, w0, meta, p0, p1):
    if gcount(meta, K_ALLOC) == 0:
        return 0
    order = meta[M_ORDER]
    small = walk_count(n2, n1, w0, p0, p1, ALLOC | HUGE, ALLOC)
    if order == 0 or gcount(meta, K_HUGE) == 0:
        return small
    bmask = (np.int64(1) << order) - 1
    q0 = p0 & ~bmask
    q1 = (p1 + bmask) & ~bmask
    return small + (walk_count(n2, n1, w0, q0, q1, HUGE, HUGE) >> order)


def convert(n2, n1, w0, meta, p0, p1, to_private, zero):
    """``KVM_SET_MEMORY_ATTRIBUTES2`` on the file for a validated range.

    Returns ``(errno, error_page)``: ``(0, -1)`` on success (or nothing to do),
    ``(ENOMEM, p0)``, ``(EAGAIN, first unsafe page)``, or ``(RC_GROW, -1)`` when the
    pools need growing first (nothing done). Nothing changes on error except zapped host
    mappings.
    """
    f1, f0 = free_tables(meta)
    if f1 < RESERVE or f0 < RESERVE:
        return RC_GROW, -1
    n = p1 - p0
    meta[C_CONVERT_CALLS] += 1
    if n == meta[M_NPAGES]:
        npriv = gcount(meta, K_PRIV)
    else:
        npriv = walk_count(n2, n1, w0, p0, p1, PRIV, PRIV)
    if (to_private and npriv == n) or (not to_private and npriv == 0):
        meta[C_CONVERT_NOOP] += 1
        return 0, -1
    want = PRIV if to_private else 0
    old = 0 if to_private else PRIV
    # 3. reserve metadata
    if meta[M_ENOMEM] > 0:
        meta[M_ENOMEM] -= 1
        meta[C_CONVERT_ENOMEM] += 1
        return ENOMEM, p0
    if meta[M_LIMIT] >= 0:
        if _ranges_after(n2, n1, w0, meta, p0, p1, 1 if to_private else 0) > meta[M_LIMIT]:
            meta[C_CONVERT_ENOMEM] += 1
            return ENOMEM, p0
    # 4. to private: unmap from the host, then every folio must be safe
    if to_private:
        zap_host(n2, n1, w0, meta, p0, p1)
        meta[C_FOLIOS_CHECKED] += _folios_checked(n2, n1, w0, meta, p0, p1)
        if gcount(meta, K_PIN) > 0:
            f = walk_first(n2, n1, w0, p0, p1, PIN, PIN)
            if f >= 0:
                meta[C_LRU_DRAINS] += 1
                meta[C_CONVERT_EAGAIN] += 1
                return EAGAIN, f
    # 5. past this point nothing fails
    zap_guest(n2, n1, w0, meta, p0, p1)
    if not to_private:
        released = _te_release(n2, n1, w0, meta, p0, p1)
        nsplit = split_folios(n2, n1, w0, meta, p0, p1)
        if released:
            _te_split_cost(meta, nsplit)
    # 8. contents of the pages whose shareability changes (zeroed: they hold no bytes)
    clr = PRIV
    if zero and gcount(meta, K_ALLOC) > 0:
        _count_zero(meta, walk_count(n2, n1, w0, p0, p1, ALLOC | PRIV, ALLOC | old), I0)
        clr = PRIV | DATA
    # 9. store the attributes (one range entry in the per-file store)
    ch = walk_apply(n2, n1, w0, meta, p0, p1, PRIV, old, clr, want)
    meta[C_ATTR_WRITES_RANGE] += 1
    if to_private:
        meta[C_PAGES_TO_PRIVATE] += ch
    else:
        meta[C_PAGES_TO_SHARED] += ch
    # 6./7. huge pages merge, then the direct map changes (a folio at a time)
    if to_private:
        merge_folios(n2, n1, w0, meta, p0, p1)
    if meta[M_DMAP] == DMAP_ONCONV and gcount(meta, K_ALLOC) > 0:
        # private pages still in the direct map leave it; shared ones out of it return
        cval = ALLOC | PRIV if to_private else ALLOC | DMAP_OFF
        dmap_change(n2, n1, w0, meta, p0, p1, ALLOC | PRIV | DMAP_OFF, cval, to_private)
    return 0, -1


def convert_page(n2, n1, w0, meta, p, to_private, zero):
    """``convert`` of the single page ``p``: one read and one write of its word.

    Returns ``(RC_SLOW, -1)``, having done nothing, where block-level work is due before the
    store (a huge folio to split, a metadata limit to check): the caller then runs
    ``convert`` on the page. (Calling it from here would make this small kernel compile
    all of ``convert`` again.) With direct map ``on-conversion`` the page leaves or
    rejoins the direct map as ``dmap_change`` of one page does: its 1 GiB and 2 MiB
    entries break (once), one entry changes, one TLB entry is flushed.
    """
    f1, f0 = free_tables(meta)
    if f1 < RESERVE or f0 < RESERVE:
        return RC_GROW, -1
    w = get_word(n2, n1, w0, p)
    if ((w & PRIV) != 0) == to_private:
        meta[C_CONVERT_CALLS] += 1
        meta[C_CONVERT_NOOP] += 1
        return 0, -1
    if (w & HUGE) or meta[M_LIMIT] >= 0:
        return RC_SLOW, -1
    meta[C_CONVERT_CALLS] += 1
    if meta[M_ENOMEM] > 0:
        meta[M_ENOMEM] -= 1
        meta[C_CONVERT_ENOMEM] += 1
        return ENOMEM, p
    nw = w
    if to_private:
        if w & HMAP:
            nw &= ~HMAP
            meta[C_HOST_PTES_ZAPPED] += 1
            _tlb_flush(meta, I1)
        if w & ALLOC:
            meta[C_FOLIOS_CHECKED] += 1
        if w & PIN:
            if nw != w:   # the zapped mapping stays zapped
                set_word(n2, n1, w0, meta, p, nw)
            meta[C_LRU_DRAINS] += 1
            meta[C_CONVERT_EAGAIN] += 1
            return EAGAIN, p
    meta[C_GUEST_INVALIDATIONS] += 1
    if w & GMAP:
        nw &= ~GMAP
        meta[C_GUEST_PTES_ZAPPED] += 1
    if not to_private and (w & TE_MASK):
        nw &= ~TE_MASK
        if meta[M_VMTYPE] == VM_SNP:
            meta[C_RMP_UPDATES] += 1
        elif meta[M_VMTYPE] == VM_TDX:
            meta[C_TDX_SEAMCALL_BLOCK] += 1
            meta[C_TDX_SEAMCALL_TRACK] += 1
            meta[C_TDX_SEAMCALL_PAGE_REMOVE] += 1
    if zero and (w & ALLOC):
        _count_zero(meta, I1, I0)
        nw &= ~DATA
    if to_private:
        nw |= PRIV
        meta[C_PAGES_TO_PRIVATE] += 1
    else:
        nw &= ~PRIV
        meta[C_PAGES_TO_SHARED] += 1
    meta[C_ATTR_WRITES_RANGE] += 1
    dmap = meta[M_DMAP] == DMAP_ONCONV and (w & ALLOC) != 0
    if dmap:
        nw ^= DMAP_OFF              # private pages leave the direct map, shared ones rejoin it
    set_word(n2, n1, w0, meta, p, nw)
    if to_private and meta[M_ORDER] and meta[M_MERGE]:
        merge_folios(n2, n1, w0, meta, p, p + 1)
    if dmap:
        i = p >> S2
        if n2[i, F_DSPLIT] == 0:
            n2[i, F_DSPLIT] = 1
            meta[C_DMAP_SPLITS_1G] += 1
            meta[M_DSPLIT1] += 1
            meta[M_DSPLIT1_2M] += min(N1, (meta[M_NPAGES] - (i << S2) + N1 - 1) >> S1)
        t = n2[i, F_CHILD]
        if t < 0:
            t = _split_l2(n2, n1, meta, i)
        e = t * N1 + ((p >> S1) & (N1 - 1))
        if n1[e, F_DSPLIT] == 0:
            n1[e, F_DSPLIT] = 1
            meta[C_DMAP_SPLITS_2M] += 1
            meta[M_DSPLIT2] += 1
        meta[C_DMAP_ENTRIES_CHANGED] += 1
        _tlb_flush(meta, I1)
    return 0, -1


def group_items(p0s, p1s, to_private, zero, skip, shift, start, order, g0, g1, gpriv, gzero):
    """The items whose ``skip`` is 0 grouped by the block ``p0 >> shift`` they lie in
    (blocks in ascending order, the items of one block in their own order): a counting
    sort, ``start`` (zeros, one more than the blocks) its scratch. Fills ``order`` with
    their indices and ``g0``, ``g1``, ``gpriv``, ``gzero`` with their arguments in that
    order (written block by block as they are read: one pass over each array). Returns
    how many, or -1 (nothing grouped) if an item spans two blocks."""
    n = p0s.shape[0]
    nblocks = start.shape[0] - 1
    for x in range(n):
        if skip[x] != 0:
            continue
        b = p0s[x] >> shift
        if ((p1s[x] - 1) >> shift) != b:
            return -1
        start[b + 1] += 1
    for b in range(nblocks):
        start[b + 1] += start[b]
    m = start[nblocks]
    for x in range(n):
        if skip[x] != 0:
            continue
        b = p0s[x] >> shift
        k = start[b]
        start[b] = k + 1
        order[k] = x
        g0[k] = p0s[x]
        g1[k] = p1s[x]
        gpriv[k] = to_private[x]
        gzero[k] = zero[x]
    return m


def convert_many(n2, n1, w0, meta, p0s, p1s, to_private, zero, order, skip_set, start, out_err,
                 out_page):
    """Apply conversions ``start..`` of validated page ranges ``[p0s[k], p1s[k])`` in that
    order; the result of conversion ``k`` is item ``order[k]``'s, in ``out_err`` and
    ``out_page``, which start at 0 and -1 for every item to do. ``skip_set``: items whose
    ``out_err`` is already set (refused by the caller's validation) are among them, and
    skipped.

    The conversions are the batch's items in order, or grouped by block where the results
    cannot differ (``group_items``): the work on one block then stays in cache. Returns
    the conversion to resume at: ``len(p0s)`` when done, earlier when the pools need
    growing first.
    """
    n = p0s.shape[0]
    for k in range(start, n):
        x = order[k]
        if skip_set and out_err[x] != 0:
            continue
        f1, f0 = free_tables(meta)
        if f1 < RESERVE or f0 < RESERVE:
            return k
        p0 = p0s[k]
        p1 = p1s[k]
        e, pg = RC_SLOW, -1
        if p1 == p0 + 1:
            e, pg = convert_page(n2, n1, w0, meta, p0, to_private[k] != 0, zero[k] != 0)
        if e == RC_SLOW:
            e, pg = convert(n2, n1, w0, meta, p0, p1, to_private[k] != 0, zero[k] != 0)
        if e != 0 or pg != -1:       # (``out_err`` and ``out_page`` start at 0 and -1)
            out_err[x] = e
            out_page[x] = pg
    return n


def group_pages(offs, npages, ends, keys):
    """One-page conversions at byte offsets ``offs`` grouped by the 1 GiB block they lie
    in (blocks in ascending order, the items of one block in their own order): a counting
    sort. ``ends`` (zeros, one per block) is left holding where each block's items end in
    ``keys``; ``keys[k]`` is ``item << S2 | page within its block``. Returns -1, having
    grouped nothing, if an offset is not a page-aligned offset inside the file, else 0."""
    n = offs.shape[0]
    nblocks = ends.shape[0]
    for x in range(n):
        o = offs[x]
        if o < 0 or (o & (PAGE_BYTES - 1)) != 0 or (o >> PAGE_SHIFT) >= npages:
            return -1
        ends[o >> (PAGE_SHIFT + S2)] += 1
    acc = I0
    for b in range(nblocks):
        c = ends[b]
        ends[b] = acc
        acc += c
    for x in range(n):
        p = offs[x] >> PAGE_SHIFT
        b = p >> S2
        k = ends[b]
        ends[b] = k + 1
        keys[k] = (x << S2) | (p & (N2 - 1))
    return 0


def convert_pages(n2, n1, w0, meta, keys, ends, to_private, zero, start, out_err, out_off):
    """Apply one-page conversions grouped by ``group_pages``, from ``start``, all to
    ``to_private`` with ``zero``: the results of applying them in their order when the
    metadata limit is off and no ``ENOMEM`` is injected (conversions of different blocks
    touch disjoint state but for counters that add up). The result of item ``x`` goes to
    ``out_err[x]`` and ``out_off[x]`` (a byte offset), which start at 0 and -1.

    A page of a block with a table whose 2 MiB entry holds no page table and has room for
    another exception, needing no folio split, host unmapping, pin check or direct-map
    change, is converted here, as ``convert_page`` would, with the work counters kept in
    locals and added once; any other page goes through ``convert_page`` (``convert``
    where it declines). Returns ``(k, s)``: the item to resume at (``len(keys)`` when
    done, earlier when the pools need growing first), and a sum of the words read to
    bring a block's table into cache (returned only so that the reads are kept)."""
    n = keys.shape[0]
    nblocks = ends.shape[0]
    b = I0
    while b < nblocks and ends[b] <= start:
        b += 1
    want = PRIV if to_private else I0
    snp = meta[M_VMTYPE] == VM_SNP
    onconv = meta[M_DMAP] == DMAP_ONCONV
    order = meta[M_ORDER]
    merge = to_private and order != 0 and meta[M_MERGE] != 0
    slow_bits = HUGE | (HMAP | PIN if to_private else I0)
    calls = I0
    noop = I0
    checked = I0
    ginv = I0
    gzap = I0
    rmp = I0
    nzero = I0
    moved = I0
    touched = I0
    room = False
    k = start
    stop = n
    while k < n:
        while ends[b] <= k:
            b += 1
        end = ends[b]
        t = n2[b, F_CHILD]
        if t >= 0 and end - k >= TOUCH_MIN:
            # read the block's table in one sequential sweep, so that the items (in
            # their own, random, order) find their entries in cache
            for r in range(t * N1, (t + 1) * N1):
                touched += n1[r, F_WORD]
        while k < end:
            if not room:        # known only until a call that may take tables
                f1, f0 = free_tables(meta)
                if f1 < RESERVE or f0 < RESERVE:
                    stop = k
                    break
                room = True
            key = keys[k]
            k += 1
            x = key >> S2
            p = (b << S2) | (key & (N2 - 1))
            t = n2[b, F_CHILD]
            fast = False
            e = I0
            q = p & (N1 - 1)
            w = I0
            base = I0
            nx = I0
            slot = -1
            if t >= 0:
                e = t * N1 + ((p >> S1) & (N1 - 1))
                nx = np.int64(n1[e, F_NX])
                if n1[e, F_CHILD] < 0 and nx < NX:
                    # the page's word: its exception's, if it has one (every slot is
                    # looked at, so that the loop's end is always the same)
                    base = np.int64(n1[e, F_WORD])
                    w = base
                    for y in range(NX):
                        v = np.int64(n1[e, F_X0 + y])
                        if y < nx and (v & XQ_MASK) == q:
                            slot = y
                            w = (v >> XW_SHIFT) | (base & ORDER_MASK)
                    if (w & PRIV) == want:
                        calls += 1
                        noop += 1
                        continue
                    fast = ((w & slow_bits) == 0 and not (onconv and (w & ALLOC))
                            and not ((w & TE_MASK) and not to_private and not snp))
            if not fast:
                room = False
                err, pg = convert_page(n2, n1, w0, meta, p, to_private, zero)
                if err == RC_SLOW:
                    err, pg = convert(n2, n1, w0, meta, p, p + 1, to_private, zero)
                if err != 0:
                    out_err[x] = err
                if pg != -1:
                    out_off[x] = pg << PAGE_SHIFT
                continue
            calls += 1
            nw = (w & ~PRIV) | want
            if to_private and (w & ALLOC):
                checked += 1
            ginv += 1
            if w & GMAP:
                nw &= ~GMAP
                gzap += 1
            if not to_private and (w & TE_MASK):
                nw &= ~TE_MASK
                rmp += 1
            if zero and (w & ALLOC):
                nzero += 1
                nw &= ~DATA
            moved += 1
            # ``set_word``: the page's exception changes, goes (back to the entry's word)
            # or is added (there is room)
            if slot < 0:
                for j in range(NCOUNTED >> 1):
                    lo = N1 if (base >> (2 * j)) & 1 else 0
                    hi = N1 if (base >> (2 * j + 1)) & 1 else 0
                    kept = np.int64(n1[e, F_CNT + j])
                    n1[e, F_CNT + j] = (lo | (hi << 16)) if nx == 0 else kept
                n1[e, F_X0 + nx] = q | ((nw & ~ORDER_MASK) << XW_SHIFT)
                n1[e, F_NX] = nx + 1
            elif nw == base:
                n1[e, F_X0 + slot] = n1[e, F_X0 + nx - 1]
                n1[e, F_NX] = nx - 1
            else:
                n1[e, F_X0 + slot] = q | ((nw & ~ORDER_MASK) << XW_SHIFT)
            # the counts: the private bit flips; any other counted bit that changed is
            # counted as _add_cnt does
            d = 1 if to_private else -1
            _add_cnt1(n1, e, K_PRIV, d)
            n2[b, F_CNT + K_PRIV] += d
            meta[M_GCNT + K_PRIV] += d
            if (w ^ nw) & COUNTED_MASK & ~PRIV:
                _add_cnt(n2, n1, meta, b, e, w & ~PRIV, nw & ~PRIV)
            c = n2[b, F_CNT + K_PRIV]
            if c == 0 or c == N2:       # else _fold_l1 finds the block mixed
                _fold_l1(n2, n1, meta, b)
            if merge:
                # merge_folios(p, p + 1), called where its block could merge
                t = n2[b, F_CHILD]
                if t < 0:
                    due = True
                elif order == S2:
                    due = _mergeable(n2[b, F_CNT + K_ALLOC], n2[b, F_CNT + K_PRIV],
                                     n2[b, F_CNT + K_PIN], n2[b, F_CNT + K_HUGE], N2)
                else:
                    due = _mergeable(cnt1(n1, e, K_ALLOC), cnt1(n1, e, K_PRIV), cnt1(n1, e, K_PIN),
                                     cnt1(n1, e, K_HUGE), N1)
                if due:
                    room = False
                    merge_folios(n2, n1, w0, meta, p, p + 1)
        if stop < n:
            break
    meta[C_CONVERT_CALLS] += calls
    meta[C_CONVERT_NOOP] += noop
    meta[C_FOLIOS_CHECKED] += checked
    meta[C_GUEST_INVALIDATIONS] += ginv
    meta[C_GUEST_PTES_ZAPPED] += gzap
    meta[C_RMP_UPDATES] += rmp
    _count_zero(meta, nzero, I0)
    if to_private:
        meta[C_PAGES_TO_PRIVATE] += moved
    else:
        meta[C_PAGES_TO_SHARED] += moved
    meta[C_ATTR_WRITES_RANGE] += moved
    return stop, touched


def _block_allocated(n2, n1, w0, meta, p):
    """Whether the whole backing-order block of page ``p`` is allocated (so allocating
    ``p`` widens to nothing)."""
    order = meta[M_ORDER]
    i = p >> S2
    if order == S2:
        return cnt2(n2, i, K_ALLOC) == N2
    if order == S1:
        t = n2[i, F_CHILD]
        if t < 0:
            return (n2[i, F_WORD] & ALLOC) != 0
        return cnt1(n1, t * N1 + ((p >> S1) & (N1 - 1)), K_ALLOC) == N1
    return (get_word(n2, n1, w0, p) & ALLOC) != 0


def accept_many(n2, n1, w0, meta, p0s, p1s, chunk_pages, te_state, map_pages, prefault, check,
                start, out_err, out_page, out_chunks):
    """``accept`` of the page ranges ``[p0s[x], p1s[x])`` from item ``start`` on, in order,
    each allocated first; items whose ``out_err`` is set are skipped. ``check``: an item
    with a shared page is refused (``EFAULT`` at that page, nothing done): the guest's
    private access faults. Fills ``out_chunks``; returns the item to resume at (``len``
    when done, earlier when the pools need growing)."""
    n = p0s.shape[0]
    for x in range(start, n):
        if out_err[x] != 0:
            continue
        f1, f0 = free_tables(meta)
        if f1 < RESERVE or f0 < RESERVE:
            return x
        p0 = p0s[x]
        p1 = p1s[x]
        if p1 == p0 + 1:
            # one page: one read and one write of its word where no block-level work is
            # due: nothing to allocate in its backing block, or one 4 KiB page with the
            # direct map kept
            w = get_word(n2, n1, w0, p0)
            if check and not w & PRIV:
                out_err[x] = EFAULT
                out_page[x] = p0
                continue
            if _block_allocated(n2, n1, w0, meta, p0) or (meta[M_ORDER] == 0 and meta[M_DMAP] == DMAP_KEEP):
                nw = w
                if not w & ALLOC:
                    nw |= ALLOC
                    meta[C_PAGES_ALLOCATED] += 1
                    _count_zero(meta, I1, I0)
                if (w & TE_MASK) == 0:
                    nw |= (te_state << TE_SHIFT) | GMAP
                    out_chunks[x] = _count_accept(meta, I1, chunk_pages, map_pages, prefault)
                if nw != w:
                    set_word(n2, n1, w0, meta, p0, nw)
                continue
        if check:
            f = walk_first(n2, n1, w0, p0, p1, PRIV, I0)
            if f >= 0:
                out_err[x] = EFAULT
                out_page[x] = f
                continue
        allocate(n2, n1, w0, meta, p0, p1)
        out_chunks[x] = accept(n2, n1, w0, meta, p0, p1, chunk_pages, te_state, map_pages, prefault)
    return n


def fallocate_many(n2, n1, w0, meta, punch_hole, p0s, p1s, start, out_err, out_page):
    """Allocations and hole punches (``punch_hole[x]``) of validated page ranges, in order
    from item ``start``; items whose ``out_err`` is set are skipped, empty punches do
    nothing. Fills ``out_err``/``out_page`` (a punch's ``EAGAIN`` at a pinned page);
    returns the item to resume at, as ``accept_many``."""
    n = p0s.shape[0]
    for x in range(start, n):
        if out_err[x] != 0:
            continue
        f1, f0 = free_tables(meta)
        if f1 < RESERVE or f0 < RESERVE:
            return x
        p0 = p0s[x]
        p1 = p1s[x]
        if p0 >= p1:
            continue
        if punch_hole[x]:
            e, pg = punch(n2, n1, w0, meta, p0, p1)
            out_err[x] = e
            out_page[x] = pg
        else:
            allocate(n2, n1, w0, meta, p0, p1)
    return n


def punch(n2, n1, w0, meta, p0, p1):
    """Punch a hole over ``[p0, p1)`` (already clamped to the file).

    Returns ``(errno, error_page)``. With hugetlb backing a pinned page fails the whole
    punch (``EAGAIN`` at that page); with 4 KiB backing a punch is a plain truncate and
    pinned pages leave the file like the others (the caller orphans their pins).
    """
    if meta[M_ORDER] and gcount(meta, K_PIN) > 0:
        f = walk_first(n2, n1, w0, p0, p1, PIN, PIN)
        if f >= 0:
            meta[C_PUNCH_EAGAIN] += 1
            return EAGAIN, f
    if gcount(meta, K_ALLOC) == 0:
        return 0, -1
    zap_host(n2, n1, w0, meta, p0, p1)
    zap_guest(n2, n1, w0, meta, p0, p1)
    _te_release(n2, n1, w0, meta, p0, p1)
    order = meta[M_ORDER]
    if order and gcount(meta, K_HUGE) > 0:
        bmask = (np.int64(1) << order) - 1
        # huge folios only partly punched are split; wholly punched ones are freed whole
        if p0 & bmask:
            split_folios(n2, n1, w0, meta, p0, p0 + 1)
        if p1 & bmask:
            split_folios(n2, n1, w0, meta, p1 - 1, p1)
    if gcount(meta, K_DMAP_OFF) > 0:
        dmap_change(n2, n1, w0, meta, p0, p1, DMAP_OFF, DMAP_OFF, NO)
    ch = walk_apply(n2, n1, w0, meta, p0, p1, ALLOC, ALLOC,
                    ALLOC | ORDER_MASK | HMAP | GMAP | PIN | DATA | DMAP_OFF | TE_MASK, I0)
    meta[C_PAGES_FREED] += ch
    return 0, -1


# ======================================================================================
# invariants
# ======================================================================================

def _word_ok(w, meta):
    """0 if a page word is consistent, else the ``INV_*`` number of the broken rule."""
    a = (w & ALLOC) != 0
    pv = (w & PRIV) != 0
    if (w & HMAP) and (not a or pv):
        return INV_HMAP
    if (w & PIN) and (not a or pv):
        return INV_PIN
    if (w & (DATA | GMAP | DMAP_OFF)) and not a:
        return INV_NEEDS_FOLIO
    ob = w & ORDER_MASK
    if ob and (ob != _order_bits(meta[M_ORDER]) or not a or not pv or (w & PIN)):
        return INV_HUGE
    pol = meta[M_DMAP]
    off = (w & DMAP_OFF) != 0
    if pol == DMAP_KEEP and off:
        return INV_DMAP_KEEP
    if pol == DMAP_NONE and off != a:
        return INV_DMAP_NONE
    if pol == DMAP_ONCONV and off != (a and pv):
        return INV_DMAP_ONCONV
    if (w & TE_MASK) and (not a or not pv):
        return INV_TE
    return 0


def check_tree(n2, n1, w0, meta, scratch):
    """Verify every invariant of the store. Returns ``(rule, page)``; rule 0 = all good.

    The rules are the ``INV_*`` numbers (texts in ``_layout.INVARIANTS``): 1-8 about a
    page word (``_word_ok``), the others about the tree's counts and shape. ``scratch``:
    a (3, 8) int64 array the check counts in.
    """
    nl2 = n2.shape[0]
    npages = meta[M_NPAGES]
    order = meta[M_ORDER]
    g = scratch[0]
    c1 = scratch[1]
    c2 = scratch[2]
    g[:] = 0
    for i in range(nl2):
        b0 = i << S2
        for k in range(NCOUNTED):
            g[k] += cnt2(n2, i, k)
        t = n2[i, F_CHILD]
        if t < 0:
            w = n2[i, F_WORD]
            if b0 + N2 > npages and b0 < npages and w != meta[M_INITW]:
                # a uniform partial last block: its tail must hold the initial word
                return INV_TAIL, npages
            r = _word_ok(w, meta)
            if r and b0 < npages:
                return r, b0
            continue
        c2[:] = 0
        for j in range(N1):
            e = t * N1 + j
            c0 = b0 + (j << S1)
            if n1[e, F_DSPLIT] and not n2[i, F_DSPLIT]:
                return INV_DSPLIT, c0
            u = n1[e, F_CHILD]
            nx = n1[e, F_NX]
            if u < 0 and nx == 0:
                w = n1[e, F_WORD]
                if c0 >= npages:
                    if w != meta[M_INITW]:
                        return INV_TAIL, c0
                else:
                    r = _word_ok(w, meta)
                    if r:
                        return r, c0
                for k in range(NCOUNTED):
                    c2[k] += N1 if (w >> k) & 1 else 0
                continue
            if u >= 0 and nx != 0:
                return INV_EXCEPTIONS, c0
            for x in range(nx):
                v = n1[e, F_X0 + x]
                if (v >> XW_SHIFT) & ORDER_MASK:
                    return INV_ORDER, c0 + (v & XQ_MASK)
                if ((v >> XW_SHIFT) | (n1[e, F_WORD] & ORDER_MASK)) == n1[e, F_WORD] \
                        or (v & XQ_MASK) >= N1:
                    return INV_EXCEPTIONS, c0
                for y in range(x):
                    if (n1[e, F_X0 + y] & XQ_MASK) == (v & XQ_MASK):
                        return INV_EXCEPTIONS, c0
            c1[:] = 0
            for q in range(N1):
                if u < 0:
                    w = _xword(n1, e, q)
                else:
                    w = np.int64(w0[u * N1 + q])
                    if w & ORDER_MASK:
                        return INV_ORDER, c0 + q
                    w |= n1[e, F_WORD] & ORDER_MASK
                p = c0 + q
                if p >= npages:
                    if w != meta[M_INITW]:
                        return INV_TAIL, p
                else:
                    r = _word_ok(w, meta)
                    if r:
                        return r, p
                for k in range(NCOUNTED):
                    c1[k] += (w >> k) & 1
            for k in range(NCOUNTED):
                if _get_cnt1(n1, e, k) != c1[k]:
                    return INV_COUNTS, c0
                c2[k] += c1[k]
            if order == S1 and c1[K_HUGE] != 0 and c1[K_HUGE] != N1:
                return INV_HUGE_BLOCK, c0
        for k in range(NCOUNTED):
            if n2[i, F_CNT + k] != c2[k]:
                return INV_COUNTS, b0
        if order == S2 and c2[K_HUGE] != 0 and c2[K_HUGE] != N2:
            return INV_HUGE_BLOCK, b0
    for k in range(NCOUNTED):
        if g[k] != meta[M_GCNT + k]:
            return INV_GCOUNTS, 0
    return 0, -1


def check_pools(n2, n1, w0, meta, seen1, seen0):
    """Verify that the page-table pools' free lists hold exactly the tables no entry
    uses, each once, and as many as they count (``M_NFREE1``, ``M_NFREE0``). Returns
    ``INV_POOLS`` or 0. A table that is neither used nor free is lost to the pools for
    good.
    ``seen1``, ``seen0``: zeroed uint8 arrays of ``M_USED1`` and ``M_USED0`` entries."""
    used1 = meta[M_USED1]
    used0 = meta[M_USED0]
    if used1 < 0 or used1 > meta[M_CAP1] or used1 * N1 > n1.shape[0] or seen1.shape[0] != used1:
        return INV_POOLS
    if used0 < 0 or used0 > meta[M_CAP0] or used0 * N1 > w0.shape[0] or seen0.shape[0] != used0:
        return INV_POOLS
    for i in range(n2.shape[0]):
        t = n2[i, F_CHILD]
        if t < 0:
            continue
        if t >= used1 or seen1[t]:
            return INV_POOLS
        seen1[t] = 1
        for j in range(N1):
            u = n1[t * N1 + j, F_CHILD]
            if u < 0:
                continue
            if u >= used0 or seen0[u]:
                return INV_POOLS
            seen0[u] = 1
    for level in range(2):          # the free list of each pool, followed to its end
        seen = seen0 if level == 0 else seen1
        used = used0 if level == 0 else used1
        t = meta[M_FREE0] if level == 0 else meta[M_FREE1]
        nfree = I0
        while t >= 0:
            if t >= used or seen[t] or nfree >= used:
                return INV_POOLS
            seen[t] = 2
            nfree += 1
            t = np.int64(n1[t * N1, F_CHILD]) if level == 1 else _free_link0(w0, t)
        if nfree != (meta[M_NFREE0] if level == 0 else meta[M_NFREE1]):
            return INV_POOLS
        for u in range(used):
            if seen[u] == 0:
                return INV_POOLS
    return 0


def dmap_counts(n2, meta):
    """Direct-map entries over the file by size, (1 GiB, 2 MiB, 4 KiB), from the counts
    ``dmap_change`` keeps as it breaks entries up (``dmap_entries`` counts them again)."""
    return (n2.shape[0] - meta[M_DSPLIT1], meta[M_DSPLIT1_2M] - meta[M_DSPLIT2],
            meta[M_DSPLIT2] * N1)


def count_dsplits(n2, n1, meta):
    """Set the counts ``dmap_counts`` reads from the split flags (a loaded state)."""
    npages = meta[M_NPAGES]
    meta[M_DSPLIT1] = 0
    meta[M_DSPLIT1_2M] = 0
    meta[M_DSPLIT2] = 0
    for i in range(n2.shape[0]):
        if n2[i, F_DSPLIT] == 0:
            continue
        b0 = i << S2
        meta[M_DSPLIT1] += 1
        meta[M_DSPLIT1_2M] += min(N1, (npages - b0 + N1 - 1) >> S1)
        t = n2[i, F_CHILD]
        if t < 0:
            continue
        for j in range(N1):
            if b0 + (j << S1) < npages and n1[t * N1 + j, F_DSPLIT]:
                meta[M_DSPLIT2] += 1


def dmap_entries(n2, n1, npages):
    """Direct-map entries over the file by size: (1 GiB, 2 MiB, 4 KiB), counted from the
    split flags."""
    e1g = 0
    e2m = 0
    e4k = 0
    for i in range(n2.shape[0]):
        if n2[i, F_DSPLIT] == 0:
            e1g += 1
            continue
        t = n2[i, F_CHILD]
        for j in range(N1):
            if (i << S2) + (j << S1) >= npages:
                break
            if t >= 0 and n1[t * N1 + j, F_DSPLIT]:
                e4k += N1
            else:
                e2m += 1
    return e1g, e2m, e4k


# ======================================================================================
# the saved form: every stored page word complete
# ======================================================================================

def order_bits_to_pages(n2, n1, w0, meta, on):
    """Copy (``on``) each 2 MiB entry's folio order into its page table and exceptions,
    the form a state is saved in, or take it back out (``not on``) into the entry, the
    form the kernels keep. Taking it out checks what it relies on, for a loaded state:
    returns ``(INV_HUGE_BLOCK, page)`` if the pages of a 2 MiB block differ in order,
    ``(INV_COUNTS, page)`` if a table index is out of range, else ``(0, -1)``."""
    for i in range(n2.shape[0]):
        t = n2[i, F_CHILD]
        if t < 0:
            continue
        if (t + 1) * N1 > n1.shape[0]:
            return INV_COUNTS, i << S2
        for j in range(N1):
            e = t * N1 + j
            c0 = (i << S2) + (j << S1)
            u = n1[e, F_CHILD]
            nx = n1[e, F_NX]
            if u < 0 and nx == 0:
                continue
            if (u + 1) * N1 > w0.shape[0] or nx < 0 or nx > NX:
                return INV_COUNTS, c0
            ob = n1[e, F_WORD] & ORDER_MASK
            if u >= 0:
                base = u * N1
                if not on:
                    ob = np.int64(w0[base]) & ORDER_MASK
                    for q in range(N1):
                        if (np.int64(w0[base + q]) & ORDER_MASK) != ob:
                            return INV_HUGE_BLOCK, c0 + q
                    n1[e, F_WORD] = (n1[e, F_WORD] & ~ORDER_MASK) | ob
                for q in range(N1):
                    w0[base + q] = (np.int64(w0[base + q]) & ~ORDER_MASK) | (ob if on else I0)
            for x in range(nx):
                v = n1[e, F_X0 + x]
                xw = v >> XW_SHIFT
                if not on and (xw & ORDER_MASK) != ob:
                    return INV_HUGE_BLOCK, c0 + (v & XQ_MASK)
                n1[e, F_X0 + x] = (v & XQ_MASK) | (((xw & ~ORDER_MASK) | (ob if on else I0)) << XW_SHIFT)
    return 0, -1


# ======================================================================================
# compiling
# ======================================================================================
# The kernels above are plain functions until here, where each is compiled with its
# options. numba resolves the calls between kernels when it first compiles one, by which
# time every name below refers to its compiled form. Keeping the compile options out of
# the definitions lets mutation testing (README, "Mutation testing") put its variants of
# each kernel in place under NUMBA_DISABLE_JIT=1, where ``njit`` returns the function.
_SMALL_STEPS = (  # force-inlined by LLVM into their callers
    "free_tables", "_free_link0", "cnt2", "cnt1", "_get_cnt1", "_add_cnt1", "_xword", "_init_cnt1", "_add_cnt", "_set_xpage",
    "_fold_l0", "_fold_l1", "get_word", "set_word", "_single_bit", "_match1", "_match2",
    "gcount", "_tlb_flush", "_count_zero", "_count_accept", "_block_allocated", "dmap_counts",
)
_INLINED_BEFORE_TYPING = (
    "zap_host", "_vmemmap_per_folio", "_count_split", "_order_bits", "_mergeable",
    "_te_release", "_te_split_cost", "_ranges_after", "_folios_checked",
)
_ENTRY_POINTS = (  # and the kernels they call that stay functions of their own
    "_new_l1", "_free_l1", "_new_l0", "_free_l0", "_split_l2", "_split_l1", "_xapply_whole",
    "get_words", "_xcount", "walk_count", "walk_first", "_order_l2", "walk_apply",
    "walk_transitions", "zap_guest", "dmap_change", "split_folios", "merge_folios",
    "_alloc_block", "allocate", "accept", "attribute_ranges", "convert", "convert_page",
    "group_items", "convert_many", "group_pages", "convert_pages", "accept_many",
    "fallocate_many", "punch", "_word_ok",
    "check_tree", "check_pools", "count_dsplits", "dmap_entries", "order_bits_to_pages",
)
for _options, _names in ((_INLINE, _SMALL_STEPS), (_IR_INLINE, _INLINED_BEFORE_TYPING),
                         (_KERNEL, _ENTRY_POINTS)):
    for _name in _names:
        globals()[_name] = njit(**_options)(globals()[_name])
del _options, _names, _name
