"""How a stage spreads its work: over local processes or a Dask cluster (`fanout`), and over torchrun workers
(`launch`)."""
