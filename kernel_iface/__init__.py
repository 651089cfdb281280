"""The Linux vhost / vhost-vdpa / vdpa uapi, through ctypes, fcntl and mmap only. No policy here."""
