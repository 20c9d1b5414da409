"""The files audiotok writes codes into: ``.atok`` code files and code datasets (manifest and shards)."""
