"""The chat's own benchmarks: real processes on loopback (docs/performance.md)."""
