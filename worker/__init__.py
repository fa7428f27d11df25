"""kiln's worker side. Importing this package imports nothing heavy: producers use its contract,
manifest, settings and store modules without torch."""
