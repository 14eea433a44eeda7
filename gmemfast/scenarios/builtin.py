"""The built-in scenarios (``gmemfast scenarios`` lists them)."""
from __future__ import annotations

from .params import (MAX_CONVERSIONS, Param, ScenarioError, choice, parse_bool, parse_chunk,
                     parse_conversions, parse_count, parse_granule, parse_size_or_auto,
                     parse_size_or_percent, parse_vcpus, scenario)
from .runner import TWO_MIB, Runner
from .workloads import (do_accept_all, do_accept_rest, do_balloon, do_boot_accept,
                        do_drain, do_launch, do_swiotlb, do_window, swiotlb_region)
from ..units import PAGE_SIZE, format_size
from .swiotlb import Duration, Rate, parse_duration, parse_io_size, parse_pool, parse_rate, parse_release
from .swiotlb_io import swiotlb_io

__all__ = ["OVMF_PARAM", "KERNEL_PARAM", "VCPUS_PARAM", "parse_vcpus"]


OVMF_PARAM = Param("ovmf", str, "synthetic", "OVMF image file for the launch ('synthetic': a small "
                                         "generated image)")
KERNEL_PARAM = Param("kernel", parse_size_or_auto, 16 << 20, "kernel image loaded at 16M (0 for none)",
                     True)


VCPUS_PARAM = Param("vcpus", parse_vcpus, 1, "guest vCPUs: they run the parallel work (eager "
                                            "acceptance, the workers); SNP: one VMSA each")


@scenario("boot", "launch firmware and kernel, accept memory (all of it, or lazily only what boot "
                  "touches), convert SWIOTLB to shared",
          params=(
              OVMF_PARAM, KERNEL_PARAM,
              Param("kernel_load", choice("hashes", "measured"), "hashes",
                    "hashes: QEMU's way, the firmware loads the kernel and checks its hash; "
                    "measured: the kernel is populated as measured launch pages"),
              VCPUS_PARAM,
              Param("accept", choice("eager", "lazy"), "eager",
                    "eager: the guest accepts all memory at boot, spread over the vCPUs; lazy: "
                    "only what boot touches (firmware, memmap, free-memory reserve, SWIOTLB)"),
              Param("accept_chunk", parse_chunk, TWO_MIB, "guest accept granularity: 2M or 4K", True),
              Param("swiotlb", parse_size_or_auto, "auto",
                    "SWIOTLB pool size ('auto': 6% of memory in [64M, 1G])", True),
              Param("swiotlb_chunk", parse_size_or_auto, TWO_MIB,
                    "bytes per guest conversion request for SWIOTLB (0: one request)", True),
          ))
def _boot(run: Runner, p: dict) -> None:
    """Boot a confidential guest (docs/model.md §10.3).

    1. ``set-private`` (legacy tracking only): the VMM marks all memory private per GFN.
    2. ``launch`` (the VMM, one thread): the firmware image (below 4 GiB, its own
       guest_memfd) is populated and measured; with ``kernel_load=measured`` the kernel
       image (at 16 MiB) too, else only its hash (SNP's kernel-hashes page).
    3. ``firmware`` (boot CPU): the firmware accepts its first 512 MiB and, with
       hashes, loads the kernel there.
    4. ``accept-boot`` (boot CPU): the kernel accepts its memmap, the free-memory reserve
       and the SWIOTLB pool.
    5. ``accept`` (``accept=eager`` only, on ``vcpus``): the rest of memory.
    6. ``swiotlb`` (boot CPU): the guest converts its SWIOTLB pool to shared.
    """
    if p["kernel"] in ("auto", "all"):
        raise ScenarioError("kernel: give a size (16M) or 0")
    kernel, chunk = p["kernel"], p["accept_chunk"]
    if not run.in_place:
        _stage(run, "set-private")
        run.set_private_all()
        run.sample()
    _stage(run, "launch")
    with run.span(0.0, 0.1, "launch"):
        do_launch(run, p["ovmf"], kernel, p["vcpus"], kernel_load=p["kernel_load"])
    run.sample()
    run.mark("boot")
    with run.span(0.1, 0.2, "boot"):
        done = do_boot_accept(run, chunk, kernel=kernel, kernel_load=p["kernel_load"], swiotlb=p["swiotlb"])
    if p["accept"] == "eager":
        run.phase("accept", threads=p["vcpus"])
        run.mark("accept")
        with run.span(0.2, 0.9, "accept"):
            do_accept_rest(run, chunk, done)
    _stage(run, "swiotlb")
    sw = p["swiotlb_chunk"]
    with run.span(0.9, 1.0, "swiotlb"):
        do_swiotlb(run, p["swiotlb"], 0 if sw in ("auto", "all") else sw)
    run.sample()
    run.extra["accept"] = p["accept"]


@scenario("accept-drain", "a lazily accepting guest whose workers touch all its memory: wall time "
                          "until all of it is accepted",
          params=(
              VCPUS_PARAM,
              Param("workers", parse_vcpus, 1, "processes touching memory (like 'tail /dev/zero' "
                                               "in Intel's lkvs TDX memory test)"),
              Param("accept_chunk", parse_chunk, TWO_MIB, "guest accept granularity: 2M or 4K", True),
          ))
def _accept_drain(run: Runner, p: dict) -> None:
    """A guest booted with lazy acceptance (phases ``firmware`` and ``accept-boot`` as in
    ``boot``), then ``drain``: ``workers`` processes on ``vcpus`` vCPUs allocate and fill
    memory until none is left unaccepted, the page allocator accepting it 4 MiB at a
    time as they go (docs/model.md §10.3). The drain runs on min(vcpus, workers) threads;
    its wall time is the time until all memory is accepted."""
    if not run.in_place:
        _stage(run, "set-private")
        run.set_private_all()
    run.mark("boot")
    with run.span(0.0, 0.1, "boot"):
        done = do_boot_accept(run, p["accept_chunk"])
    run.phase("drain", threads=min(p["vcpus"], p["workers"]))
    run.mark("drain")
    with run.span(0.1, 1.0, "drain"):
        run.extra["drained_bytes"] = do_drain(run, p["accept_chunk"], done)


def _stage(run: Runner, name: str) -> None:
    """Start the stage ``name``: its work is reported under that operation, and marked."""
    run.phase(name)
    run.mark(name)


def _accept_all_first(run: Runner, lo: float, hi: float) -> None:
    """Setup of the conversion scenarios: all memory accepted at 2 MiB (legacy tracking:
    marked private by the VMM first)."""
    if not run.in_place:
        _stage(run, "set-private")
        run.set_private_all()
    _stage(run, "accept")
    with run.span(lo, hi, "accept"):
        do_accept_all(run, TWO_MIB)


@scenario("swiotlb-churn", "bounce-buffer pages converted to shared and back at 4 KiB",
          params=(
              Param("region", parse_size_or_auto, "auto",
                    "bounce-buffer region ('auto': the SWIOTLB size, 6% of memory in [64M, 1G])", True),
              Param("conversions", parse_conversions, 200_000, "conversions to shared (each goes back later)"),
              Param("in_flight", parse_count, 64, "pages shared at once"),
              Param("granule", parse_granule, PAGE_SIZE, "bytes per conversion", True),
              Param("reaccept", parse_bool, True, "the guest accepts each page again after it "
                                                   "returns to private"),
          ))
def _swiotlb_churn(run: Runner, p: dict) -> None:
    """Dynamic bounce buffers: the guest converts a 4 KiB page of its bounce-buffer region
    to shared for a DMA, and back to private (accepting it again) when ``in_flight``
    later DMAs have started. Setup: all memory accepted at 2 MiB."""
    _accept_all_first(run, 0.0, 0.1)
    off, nbytes = swiotlb_region(run, p["region"])
    run.extra["region_offset"] = off
    run.extra["region_bytes"] = nbytes
    run.mark("conversions")
    with run.span(0.1, 1.0, "conversions"):
        do_window(run, off, nbytes, p["conversions"], window=p["in_flight"], granule=p["granule"],
                  reaccept=p["reaccept"])


@scenario("fragmentation", "random 4 KiB conversions over 1 GiB pages: huge pages and direct map "
                           "over time",
          params=(
              Param("conversions", parse_conversions, 200_000, "random conversions to shared"),
              Param("window", parse_count, 50_000,
                    "conversions after which a page goes back to private"),
              Param("granule", parse_granule, PAGE_SIZE, "bytes per conversion", True),
              Param("reaccept", parse_bool, False,
                    "the guest accepts each page as soon as it returns to private (default: "
                    "later, when it next uses it, outside the scenario)"),
          ),
          defaults={"page_order": 18, "direct_map": "on-conversion"})
def _fragmentation(run: Runner, p: dict) -> None:
    """All memory accepted (huge folios of the backing order), then random 4 KiB pages
    anywhere in memory go shared, each returning to private ``window`` conversions later.
    Shared pages split their huge folio; a block re-merges when all its pages are private
    again, but the direct map's broken entries never come back."""
    _accept_all_first(run, 0.0, 0.1)
    run.mark("conversions")
    with run.span(0.1, 1.0, "conversions"):
        do_window(run, 0, run.size, p["conversions"], window=p["window"], granule=p["granule"],
                  reaccept=p["reaccept"])


@scenario("balloon", "a balloon punches holes in guest memory and the guest refills them",
          params=(
              Param("balloon", parse_size_or_percent, 0.0625,
                    "balloon size per round: bytes or a percentage of memory", True),
              Param("granule", parse_granule, TWO_MIB, "bytes per balloon block (punch)", True),
              Param("rounds", parse_count, 2, "inflate/deflate rounds"),
              Param("accept_chunk", parse_chunk, TWO_MIB, "guest accept granularity on deflate", True),
          ),
          defaults={"page_order": 9})
def _balloon(run: Runner, p: dict) -> None:
    """All memory accepted, then ``rounds`` times: the balloon inflates by ``balloon``
    bytes of random ``granule`` blocks (the VMM punches them out of guest_memfd, as
    free-page reporting does) and deflates (the guest accepts the blocks again)."""
    nbytes = p["balloon"]
    if isinstance(nbytes, float):
        nbytes = int(run.size * nbytes) // p["granule"] * p["granule"]
    if run.size // p["granule"] > MAX_CONVERSIONS:      # refused before anything runs
        raise ScenarioError(f"granule {format_size(p['granule'])}: the guest holds {run.size // p['granule']:,} "
                            f"such blocks, at most {MAX_CONVERSIONS:,} (2^28); use a larger granule")
    _accept_all_first(run, 0.0, 0.1)
    with run.span(0.1, 1.0):
        do_balloon(run, nbytes, p["granule"], p["rounds"], chunk=p["accept_chunk"])
    run.extra["balloon_bytes"] = nbytes


scenario("swiotlb-io", "I/O through the guest's SWIOTLB bounce-buffer pool: bounce copies, slot "
                       "exhaustion, dynamic growth",
         params=(
             Param("vcpus", parse_vcpus, 8, "guest vCPUs doing I/O (and the pool's areas: one per "
                                            "possible CPU, rounded up to a power of two)"),
             Param("io_size", parse_io_size, 128 << 10,
                   "bytes per request (mapped in pieces of at most 256K)", True),
             Param("queue_depth", parse_count, 32, "requests in flight per vCPU"),
             Param("bursts", parse_count, 4, "bursts of requests"),
             Param("requests", parse_count, 256, "requests per vCPU in each burst"),
             Param("gap", parse_duration, Duration(1_000_000), "idle time between bursts (20us, 1ms, 2s)"),
             Param("direction", choice("read", "write"), "read",
                   "read: DMA from the device (bounced at map and at unmap); write: to it (at map)"),
             Param("pool", parse_pool, "auto", "SWIOTLB pool: auto (6% of memory in [64M, 1G], "
                                               "rounded up to a power of two), a size, or off", True),
             Param("dynamic", parse_bool, False, "CONFIG_SWIOTLB_DYNAMIC: grow the pool on demand"),
             Param("release", parse_release, "never", "release a dynamic pool unused this long (never: "
                                                   "the kernel keeps it)"),
             Param("on_full", choice("wait", "fail"), "wait", "a map that finds no slots: wait for "
                                                               "an unmap, or fail the request"),
             Param("latency", parse_duration, Duration(20_000), "the device's time per request, at least"),
             Param("device_rate", parse_rate, Rate(2_200_000_000), "the device's rate (2.2GB/s, 17.6Gbit/s)"),
         ))(swiotlb_io)
