"""Live migration of a real VM through vdpa-svq: the guest image, QEMU and QMP, the test run.

guest.py builds the guest (the kernel bench's Debian kernel and modules, a busybox initramfs with the
static traffic checker tools/migration_guest/netcheck.c); vm.py runs QEMU and talks QMP; run.py puts a
source and a destination QEMU, each on its own backend, through a migration and back, and reads the
guest's own verdict on its traffic.
"""
