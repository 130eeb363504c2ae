"""The source stage: SafeTensors ground truth from a local dir, a hub id, a GGUF or a synthetic preset."""
