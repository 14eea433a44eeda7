"""The built-in scenarios (``gmemfast scenarios`` lists them)."""
from __future__ import annotations

from .params import (MAX_CONVERSIONS, Param, ScenarioError, parse_bool, parse_chunk, parse_conversions,
                     parse_count, parse_granule, parse_size_or_auto, parse_size_or_percent, parse_vcpus,
                     scenario)
from .runner import TWO_MIB, Runner
from .workloads import (KERNEL_GPA, TIMELINE_POINTS, do_accept_all, do_balloon, do_launch,
                        do_swiotlb, do_window, swiotlb_region)
from ..units import PAGE_SIZE, format_size

__all__ = ["OVMF_PARAM", "KERNEL_PARAM"]


OVMF_PARAM = Param("ovmf", str, "synthetic", "OVMF image file for the launch ('synthetic': a small "
                                         "generated image)")
KERNEL_PARAM = Param("kernel", parse_size_or_auto, 16 << 20, "kernel image loaded at 16M and measured "
                                                         "(0 for none)", True)


@scenario("boot", "launch firmware and kernel, accept all memory, convert SWIOTLB to shared",
          params=(
              OVMF_PARAM, KERNEL_PARAM,
              Param("vcpus", parse_vcpus, 1, "vCPUs (SNP: one VMSA each)"),
              Param("accept_chunk", parse_chunk, TWO_MIB, "guest accept granularity: 2M or 4K", True),
              Param("swiotlb", parse_size_or_auto, "auto",
                    "SWIOTLB pool size ('auto': 6% of memory in [64M, 1G])", True),
              Param("swiotlb_chunk", parse_size_or_auto, TWO_MIB,
                    "bytes per guest conversion request for SWIOTLB (0: one request)", True),
          ))
def _boot(run: Runner, p: dict) -> None:
    """Boot a confidential guest.

    1. ``set-private`` (legacy tracking only): the VMM marks all memory private per GFN.
    2. ``launch``: the firmware image (below 4 GiB, its own guest_memfd) and the kernel
       image (at 16 MiB) are loaded by the populate flow and measured.
    3. ``accept``: the guest accepts all its other memory in ``accept_chunk`` pieces.
    4. ``swiotlb``: the guest converts its SWIOTLB pool to shared.
    """
    if p["kernel"] in ("auto", "all"):
        raise ScenarioError("kernel: give a size (16M) or 0")
    if not run.in_place:
        _stage(run, "set-private")
        run.set_private_all()
        run.sample()
    _stage(run, "launch")
    with run.span(0.0, 0.1, "launch"):
        do_launch(run, p["ovmf"], p["kernel"], max(1, p["vcpus"]))
    run.sample()
    _stage(run, "accept")
    skip = [(KERNEL_GPA, p["kernel"])] if p["kernel"] else []
    with run.span(0.1, 0.9, "accept"):
        do_accept_all(run, p["accept_chunk"], skip, points=TIMELINE_POINTS)
    _stage(run, "swiotlb")
    chunk = p["swiotlb_chunk"]
    with run.span(0.9, 1.0, "swiotlb"):
        do_swiotlb(run, p["swiotlb"], 0 if chunk in ("auto", "all") else chunk)
    run.sample()


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
