"""Checkpoints: when to save and what (checkpointer), every rank's shard through DCP (shards), the
commit protocol that makes a checkpoint committed or absent (commit)."""
