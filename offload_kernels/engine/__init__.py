"""The transfer engine: registered bytes in exact-size pinned host storage, streamed into a ring of device
slots on a dedicated copy stream so that the copy of the next layer overlaps the compute of this one.

``TransferEngine`` is the API; ``spin``/``calibrate_spin`` give tests and benchmarks a synthetic compute
kernel; ``testing`` has the hooks that force the pinning fallback and count live host memory.
"""

from .spin import calibrate_spin, spin
from .testing import force_pin_failure, live_host_memory
from .transfer_engine import PinnedMemoryFallbackWarning, TransferEngine

__all__ = ["PinnedMemoryFallbackWarning", "TransferEngine", "calibrate_spin", "force_pin_failure",
           "live_host_memory", "spin"]
