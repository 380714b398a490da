"""Data: the synthetic face world, illumination ops, real-format readers and grain pipelines."""
