"""vlbench: vision-language dataset distillation against coreset selection, under one protocol."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
