"""The gitlora daemon side: git ingest, the example store, shards, the live service. Never imports torch."""
