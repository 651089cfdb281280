"""vhost-user backend: a VMM's (or DPDK virtio-user's) virtqueues relayed to a vhost-vdpa device
through shadow virtqueues. messages.py is the protocol (one table row per request), backend.py the
server and one handler per request."""
