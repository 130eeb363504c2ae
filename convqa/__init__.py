"""convqa: qualify model-format converters between SafeTensors, GGUF and APR."""

__version__ = "0.1.0"
