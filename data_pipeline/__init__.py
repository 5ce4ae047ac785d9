"""Offline data tool: inputs -> pre-tokenised ArrayRecord shards (bagpiper_jax.data.records), on Apache Beam.

  python -m data_pipeline.write --manifest=train.jsonl --out_dir=shards/ \\
      --tokenizer=tokenizer.json --codec=xcodec:/models/xcodec-hubert-general

Modules, one job each:
  manifest.py     parse JSONL lines (and rows of other inputs) into work items, or line-level errors.
  hub.py          the published data's own files as input: Hub parquet, WebDataset tars; audio bytes.
  filters.py      the reference recipe's curation filters (caption heuristics, duration).
  build.py        work items -> records (audio -> mel / codes, text -> unified ids), or errors.
  codes.py        assistant-audio codes: the X-Codec encoder (CPU / CUDA, batched) or precomputed .npy.
  writer.py       the Beam pipeline: shard plan, shard writing, restart markers, errors.jsonl, index.json.
  fs.py           files through Beam's file systems (local, gs://).
  write.py        the command line (absl flags + Beam pipeline options).
  pool_writer.py  the multiprocessing engine the pipeline replaced: the benchmark's peer only.
  write_bench.py  records/s and audio-seconds/s per core: Beam vs the pool; mel vs codec cost.
  demo.py         synthetic demo data and its shards (the README's main command).
"""
