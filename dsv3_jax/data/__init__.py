"""Training data at scale: `prepare` (text -> token shards, once) and `shards` (the format and the grain loader)."""
