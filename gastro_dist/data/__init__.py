"""Data: synthetic frames, image validation, packing into WebDataset shards, verification, pipelines."""
