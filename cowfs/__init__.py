"""cowfs: a copy-on-write union filesystem in FUSE that speaks kernel overlayfs's on-disk format."""

__version__ = "0.1.0"
