"""Infrastructure shared by every layer: atomic writes, local paths and fsspec URLs, storage, checks on
untrusted input, process ranks and devices, worker processes and background prefetching."""
