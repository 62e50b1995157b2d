"""Training data: `corpus` (documents), `bpe` (tokenizer training, encoding, EOS_ID), `prepare` (text -> token
shards, once) and `shards` (their format), `loader` (the one grain loader), `build` (a run's data, small corpora
prepared in memory). Nothing here imports `dsv3_jax.train`."""
