"""Reading and writing: checkpoints (safetensors, GGUF) and their tensor map, model sources, Orbax folders, data files, the disk cache."""
