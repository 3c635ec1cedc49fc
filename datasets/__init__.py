"""Dataset readers, the embedded procedural dataset, encoders and the feature cache."""
