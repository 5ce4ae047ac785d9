"""Launch helpers: AOT compilation for TPU topologies, multi-host and local multi-process runs."""
