"""Software vDPA devices: stand where an open /dev/vhost-vdpa-N stands, for unit tests and hosts
without vDPA. Same method names and semantics as kernel_iface.VhostVdpa for what a session uses.

    iotlb.py     IotlbMemory: IOVA -> host mappings with permissions; the device's only way to memory
    chainio.py   gather/scatter of a descriptor chain's bytes through the IOTLB
    queue.py     SoftQueue (vring registers, running ring, stats)
    datapath.py  Datapath: the per-device thread (kick eventfds in, call eventfds out)
    base.py      SoftDevice: the control plane (features, status, vrings, IOTLB, suspend/resume)
    net.py       SoftNetDevice: loopback virtio-net (vq0 RX, vq1 TX)
    blk.py       SoftBlkDevice: virtio-blk ramdisk
"""

from vdpa_svq.softdev.base import SoftDevice
from vdpa_svq.softdev.blk import SoftBlkDevice
from vdpa_svq.softdev.iotlb import IotlbFault, IotlbMemory
from vdpa_svq.softdev.net import SoftNetDevice
from vdpa_svq.softdev.queue import QueueStats

__all__ = ["IotlbFault", "IotlbMemory", "QueueStats", "SoftBlkDevice", "SoftDevice", "SoftNetDevice"]
