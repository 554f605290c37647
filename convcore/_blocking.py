"""Cache sizes and the packed kernels' cache blocking (the K block and the pixel tile), computed once per plan.

The micro-kernel keeps an MR x NR tile of C in registers and streams a K block of its two panels: the panel it
reloads for every tile (the input panel for NCHW, the weight panel for NHWC) should stay in L1, and the block of
input a work item gathers (kc rows x its pixel tile) in L2. Sizes come from sysfs; when it cannot be read the
defaults are the smallest of the x86-64 cores we run on (32 KiB L1d, 512 KiB L2).
"""
import functools
import os

__all__ = ["cache_sizes", "l3_size", "k_block", "pixel_tile"]

DEFAULT_L1D = 32 * 1024
DEFAULT_L2 = 512 * 1024
DEFAULT_L3 = 8 * 1024 * 1024
#: Fraction of L1d given to the K block of the panel the micro-kernel re-reads for every tile.
L1_SHARE = 0.75
#: Fraction of L2 given to a work item's gathered input block (the rest holds the weights block and the output tile).
L2_SHARE = 0.5


def _parse_size(text):
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 * 1024, "G": 1024 ** 3}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@functools.lru_cache(maxsize=None)
def _sysfs_caches(root):
    """{level: size in bytes} of cpu0's data and unified caches, read from sysfs; {} when none can be read."""
    sizes = {}
    try:
        entries = sorted(e for e in os.listdir(root) if e.startswith("index"))
    except OSError:
        return sizes
    for entry in entries:
        try:
            with open(os.path.join(root, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(root, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, entry, "size")) as f:
                size = _parse_size(f.read())
        except (OSError, ValueError):
            continue
        if size > 0 and kind in ("Data", "Unified"):
            sizes[level] = size
    return sizes


def cache_sizes(root="/sys/devices/system/cpu/cpu0/cache"):
    """(L1 data, L2) sizes in bytes of cpu0, read from sysfs; the defaults for whatever cannot be read."""
    sizes = _sysfs_caches(root)
    return sizes.get(1, DEFAULT_L1D), sizes.get(2, DEFAULT_L2)


def l3_size(root="/sys/devices/system/cpu/cpu0/cache"):
    """The L3 (last-level) cache size in bytes of cpu0 from sysfs, DEFAULT_L3 when it cannot be read."""
    return _sysfs_caches(root).get(3, DEFAULT_L3)


def k_block(nr, itemsize, ck):
    """Rows of K per block: an NR-wide panel of that many rows fills L1_SHARE of L1d (a multiple of 8, >= 32)."""
    l1d, _ = cache_sizes()
    kc = int(l1d * L1_SHARE) // (nr * itemsize)
    kc = max(32, kc // 8 * 8)
    return min(kc, ck)


def pixel_tile(kc, itemsize, align):
    """Output pixels per work item: its gathered block (kc x tile) fills L2_SHARE of L2; a multiple of `align`."""
    _, l2 = cache_sizes()
    tile = int(l2 * L2_SHARE) // (kc * itemsize)
    return max(align, tile // align * align)
