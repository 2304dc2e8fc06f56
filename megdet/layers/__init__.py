"""MegDet's building blocks: Precise RoI Pooling, cross-device BatchNorm, norms, recomputation."""

from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d, convert_cross_device_bn
from megdet.layers.norm import get_norm
from megdet.layers.prroi_pool import PrRoIPool, prroi_pool

__all__ = ["CrossDeviceBatchNorm2d", "PrRoIPool", "convert_cross_device_bn", "get_norm", "prroi_pool"]
