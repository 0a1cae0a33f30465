"""A corpus of malformed and adversarial safetensors files and shard indexes (generated, see ``make.py``)."""
