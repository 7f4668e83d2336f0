"""SparK KV-cache channel pruning for SGLang."""
