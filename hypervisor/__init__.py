"""QEMU microvm sandboxes over QMP (boot, snapshot, restore, clone).

Not built yet: this package is the sandbox-runtime issue's work; nothing here is imported by the gateway.
"""
