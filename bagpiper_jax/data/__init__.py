"""Input pipeline: record format, templating into [L, 8] id matrices, Grain packing/mixing."""
