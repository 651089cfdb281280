"""vdpa-svq: userspace shadow virtqueues (split and packed) for Linux vhost-vdpa devices."""

__version__ = "0.1.0"
