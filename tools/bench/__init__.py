"""The measurements behind BENCHMARKS.md, one module per `tools bench-*` command."""
