"""The in-process guest: drivers that put real traffic on a device's (or the relay's) rings."""
